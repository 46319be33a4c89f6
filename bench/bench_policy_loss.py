"""Clipped policy loss, forward + backward w.r.t. logp: medgrpo vs the reference, TRL and the copy floor.

MedGRPO's setting: loss_type "dapo", epsilon 0.2 / 0.3, old_logp given, one advantage
per sequence, beta = 0 (no ref_logp). The mask is int32, as TRL builds completion_mask.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

import medgrpo
from medgrpo.ops import reference
from medgrpo.testing import peers

EPS_LOW, EPS_HIGH = 0.2, 0.3
MASK_DTYPE = torch.int32
ADVANTAGE_DTYPE = torch.float32
PROVIDERS = ["medgrpo", "reference", "reference_compiled", "trl", "copy_floor"]

# (B, T): 64 prompts x G=8 = 512 sequences of 1024 tokens everywhere; bigger batches on GPU only.
if torch.cuda.is_available():
    SHAPES = [(512, 1024), (4096, 1024), (8192, 1024)]
    DTYPES = [torch.float32, torch.bfloat16]
else:
    SHAPES = [(64, 1024), (512, 1024)]
    DTYPES = [torch.float32]

_compiled_reference = torch.compile(reference.policy_loss, dynamic=False)


def fused_bytes(batch: int, tokens: int, logp_dtype: torch.dtype) -> int:
    """Bytes a fused forward + backward must move at least.

    Forward reads logp, old_logp (logp's dtype), the mask and the (B,) advantages;
    backward reads them all again and writes grad_logp (logp's dtype). The (B,) partial
    sums, the scalar loss and the metrics are negligible and not counted.
    """
    elem = torch.finfo(logp_dtype).bits // 8
    mask = torch.iinfo(MASK_DTYPE).bits // 8
    adv = torch.finfo(ADVANTAGE_DTYPE).bits // 8
    reads = batch * tokens * (2 * elem + mask) + batch * adv
    return 2 * reads + batch * tokens * elem


def make_inputs(batch: int, tokens: int, dtype: torch.dtype, device: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Log-probs in (-6, 0), old log-probs off by ~0.2 (so some tokens clip), ragged completions."""
    gen = torch.Generator().manual_seed(seed)
    logp = -6.0 * torch.rand(batch, tokens, generator=gen)
    old_logp = logp + 0.2 * torch.randn(batch, tokens, generator=gen)
    lengths = torch.randint(tokens // 4, tokens + 1, (batch, 1), generator=gen)
    mask = (torch.arange(tokens) < lengths).to(MASK_DTYPE)
    advantages = torch.randn(batch, generator=gen, dtype=ADVANTAGE_DTYPE)
    return {
        "logp": logp.to(device, dtype).requires_grad_(True),
        "old_logp": old_logp.to(device, dtype),
        "mask": mask.to(device),
        "advantages": advantages.to(device),
    }


def provider_fn(provider: str, x: dict[str, torch.Tensor], nbytes: int) -> Callable[[], object]:
    """One forward + backward of the provider's loss (or the floor's copy)."""
    logp, old_logp, mask, adv = x["logp"], x["old_logp"], x["mask"], x["advantages"]
    if provider == "copy_floor":
        # A copy of nbytes/2 reads nbytes/2 and writes nbytes/2: the same traffic as the fused op.
        src = torch.empty(nbytes // 2, dtype=torch.uint8, device=logp.device)
        dst = torch.empty_like(src)
        return lambda: dst.copy_(src)
    options = dict(loss_type="dapo", epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH)
    if provider == "medgrpo":

        def loss() -> torch.Tensor:
            return medgrpo.policy_loss(logp, adv, mask, old_logp=old_logp, **options).loss
    elif provider == "reference":

        def loss() -> torch.Tensor:
            return reference.policy_loss(logp, adv, mask, old_logp=old_logp, **options).loss
    elif provider == "reference_compiled":

        def loss() -> torch.Tensor:
            return _compiled_reference(logp, adv, mask, old_logp=old_logp, **options).loss
    else:

        def loss() -> torch.Tensor:
            return peers.trl_grpo_loss(
                logp,
                adv,
                mask,
                old_per_token_logps=old_logp,
                loss_type="dapo",
                epsilon_low=EPS_LOW,
                epsilon_high=EPS_HIGH,
            )

    def forward_backward() -> None:
        logp.grad = None  # a fresh gradient each call, no accumulation pass
        loss().backward()

    return forward_backward


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def bench_policy_loss(measure, device: str, shape: tuple[int, int], dtype: torch.dtype, provider: str) -> None:
    batch, tokens = shape
    x = make_inputs(batch, tokens, dtype, device)
    nbytes = fused_bytes(batch, tokens, dtype)
    dtype_name = str(dtype).removeprefix("torch.")
    params = {
        "op": "policy_loss",
        "batch": batch,
        "tokens": tokens,
        "dtype": dtype_name,
        "device": device,
        "mask_dtype": str(MASK_DTYPE).removeprefix("torch."),
        "loss_type": "dapo",
        "epsilon_low": EPS_LOW,
        "epsilon_high": EPS_HIGH,
        "old_logp": True,
        "advantages": "per-sequence",
    }
    measure(
        provider_fn(provider, x, nbytes),
        group=f"policy_loss fwd+bwd B={batch} T={tokens} {dtype_name}",
        provider=provider,
        params=params,
        bytes_moved=nbytes,
    )
