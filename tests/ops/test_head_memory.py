"""The fused head's extra memory stays bounded as tokens grow; the full-logits path's does not.

Measured as allocation (medgrpo.testing.memory.PeakMemory), never as time.
"""

from __future__ import annotations

import pytest
import torch

import medgrpo
from medgrpo.ops import reference
from medgrpo.testing.memory import PeakMemory

HIDDEN, VOCAB, CHUNK_ROWS = 16, 4096, 64
CHUNK_BYTES = CHUNK_ROWS * VOCAB * 4  # one fp32 logits chunk


def peak_extra(fn, tokens: int) -> int:
    gen = torch.Generator().manual_seed(tokens)
    hidden = torch.randn(tokens, HIDDEN, generator=gen).requires_grad_(True)
    weight = (torch.randn(VOCAB, HIDDEN, generator=gen) / 4).requires_grad_(True)
    targets = torch.randint(0, VOCAB, (tokens,), generator=gen)
    with PeakMemory("cpu") as meter:
        logp, entropy = fn(hidden, weight, targets)
        (logp.sum() + entropy.sum()).backward()
    return meter.peak_extra_bytes


def medgrpo_head(hidden, weight, targets):
    return medgrpo.linear_logprob(hidden, weight, targets, return_entropy=True, chunk_rows=CHUNK_ROWS)


def reference_head(hidden, weight, targets):
    return reference.linear_logprob(hidden, weight, targets, return_entropy=True)


@pytest.mark.slow
def test_linear_logprob_extra_memory_is_bounded_by_a_chunk():
    small, large = peak_extra(medgrpo_head, 256), peak_extra(medgrpo_head, 4096)
    per_token_outputs = (HIDDEN + 8) * 4  # grad_hidden row, logp / lse / entropy and their gradients
    # Growing tokens 16x adds only the per-token outputs, never logits.
    assert large - small <= (4096 - 256) * per_token_outputs * 2
    # The whole peak: the weight gradient accumulator and its output, the chunk's logits and the
    # few chunk-sized temporaries of the CPU chunk math (z, p, its gradient), per-token outputs.
    assert large <= 2 * VOCAB * HIDDEN * 4 + 8 * CHUNK_BYTES + 4096 * per_token_outputs * 2
    # The full-logits reference holds (tokens x V) logits several times over.
    assert peak_extra(reference_head, 4096) > 4096 * VOCAB * 4
