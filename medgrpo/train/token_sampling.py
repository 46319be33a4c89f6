"""The next token of each row: greedy, or a temperature / top-k / top-p sample by the inverse CDF.

Both rollout decoders (the reference loop of :mod:`medgrpo.train.rollout` and the compiled static
step of :mod:`medgrpo.train.decode`) sample with :func:`sample_tokens`, so the same random numbers
give the same tokens on either path.

A sample takes one uniform number per row, drawn outside the function (:func:`draw_uniforms`: all
of a rollout's numbers in one call from the rollout's ``torch.Generator``). ``torch.multinomial``
draws its own numbers from a generator, which a compiled graph cannot trace; the inverse CDF on a
given uniform ``u`` picks the first token whose cumulative probability exceeds ``u`` times the
total, a token of probability ``p`` with probability ``p`` (up to the rounding of an fp32 sum), so
the distribution is exactly the filtered softmax's.
"""

from __future__ import annotations

from typing import Protocol

import torch


class SamplingSettings(Protocol):
    """What :func:`sample_tokens` reads from a config (``RolloutConfig`` has them)."""

    temperature: float
    top_k: int
    top_p: float


def filter_logits(logits: torch.Tensor, *, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set to ``-inf`` the logits outside the top-k and outside the top-p nucleus (HF's order: k, then p).

    The nucleus is the smallest set of most likely tokens whose probability reaches ``top_p``;
    the most likely token is always kept.
    """
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        sorted_logits = sorted_logits.masked_fill(mass_before >= top_p, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def inverse_cdf_sample(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """``(N,)`` tokens from ``(N, V)`` probabilities (rows need not sum to 1), one uniform in [0, 1) per row.

    Token ``i`` is chosen when ``cdf[i-1] <= u * total < cdf[i]``. Counting the cumulative sums at or
    below the threshold finds it without a search (one fused reduction in a compiled graph). A
    zero-probability token is never returned: where rounding at the very top of the CDF would pick
    one, the row's most likely token is taken instead.
    """
    cdf = probs.cumsum(dim=-1)
    threshold = uniforms.to(cdf.dtype) * cdf[:, -1]
    token = (cdf <= threshold[:, None]).sum(dim=-1).clamp_max(probs.shape[-1] - 1)
    picked = probs.gather(-1, token[:, None]).squeeze(-1)
    return torch.where(picked > 0, token, probs.argmax(dim=-1))


def sample_tokens(
    logits: torch.Tensor,
    config: SamplingSettings,
    uniforms: torch.Tensor | None = None,
    *,
    banned_token_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """``(N,)`` next tokens from fp32 ``(N, V)`` logits: argmax at temperature 0, else a filtered sample.

    Args:
        logits: the rows' next-token logits.
        config: ``temperature`` (0: greedy), ``top_k`` (0: all), ``top_p`` (1: all), applied as
            :func:`filter_logits` does after dividing by the temperature.
        uniforms: ``(N,)`` numbers in [0, 1), one per row (:func:`draw_uniforms`); unused when greedy.
        banned_token_ids: int64 ids on the logits' device that are never returned.
    """
    if banned_token_ids is not None:
        logits = logits.index_fill(-1, banned_token_ids, float("-inf"))
    if config.temperature == 0:
        return logits.argmax(dim=-1)
    if uniforms is None:
        raise ValueError("sampling at temperature > 0 needs one uniform number per row (draw_uniforms)")
    logits = filter_logits(logits / config.temperature, top_k=config.top_k, top_p=config.top_p)
    return inverse_cdf_sample(logits.softmax(dim=-1), uniforms)


def draw_uniforms(
    config: SamplingSettings, steps: int, rows: int, device: torch.device, generator: torch.Generator | None = None
) -> torch.Tensor | None:
    """``(steps, rows)`` uniform numbers in [0, 1) for a rollout, in one draw; None when greedy (nothing drawn).

    Drawing a rollout's numbers at once makes both decoders consume the generator identically,
    whatever step they stop at. ``generator`` must be on ``device`` (None: torch's global one).
    """
    if config.temperature == 0:
        return None
    return torch.rand((steps, rows), generator=generator, device=device, dtype=torch.float32)


__all__ = ["SamplingSettings", "draw_uniforms", "filter_logits", "inverse_cdf_sample", "sample_tokens"]
