"""lm-head + clipped policy loss, forward + backward w.r.t. hidden and weight: medgrpo vs Liger, TRL and the GEMM floor.

MedGRPO's setting, as in bench_policy_loss.py: loss_type "dapo", epsilon 0.2 / 0.3,
old_logp given, one advantage per sequence, beta = 0 (no reference model). Completions
fill the (B, T) batch except ragged tails (lengths in [7T/8, T]); the mask is int32, as
TRL builds completion_mask. Shapes, the floor, the memory meter and the summary are
bench_linear_logprob.py's. The floor runs the head's three GEMMs over the masked-in rows
only (what medgrpo's packed head needs); Liger, TRL and the reference run all B x T rows.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from bench_linear_logprob import (
    CUDA,
    DTYPE_NAME,
    HIDDEN,
    RESULTS,
    ROWS,
    TEMPERATURE,
    TOKENS,
    VOCAB,
    backward_step,
    gemm_floor,
    head_flops,
    make_head,
    run_provider,
    summarize,
    trl_logps,
)

from medgrpo.ops import reference
from medgrpo.ops.fused_linear_policy_loss import fused_linear_policy_loss
from medgrpo.ops.linear_logprob import linear_logprob
from medgrpo.testing import peers

EPS_LOW, EPS_HIGH = 0.2, 0.3
MASK_DTYPE = torch.int32
PROVIDERS = ["gemm_floor", "liger", "medgrpo", "trl_eager", "reference"]


@pytest.fixture(scope="module", autouse=True)
def _summary():
    yield
    summarize(RESULTS)


def make_inputs(batch: int, tokens: int, device: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """The head's inputs plus a ragged int32 mask, (B,) advantages, and old log-probs near the current ones."""
    x = make_head(batch, tokens, device, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    lengths = tokens - torch.randint(0, tokens // 8 + 1, (batch, 1), generator=gen)
    mask = (torch.arange(tokens) < lengths).to(MASK_DTYPE)
    with torch.no_grad():
        logp, _ = linear_logprob(x["hidden"], x["weight"], x["targets"], temperature=TEMPERATURE)
    old_logp = logp.cpu() + 0.2 * torch.randn(batch, tokens, generator=gen)  # some tokens clip
    x.update(
        mask=mask.to(device), advantages=torch.randn(batch, generator=gen).to(device), old_logp=old_logp.to(device)
    )
    return x


def make_provider(provider: str, x: dict[str, torch.Tensor]) -> Callable[[], None]:
    hidden, weight, targets = x["hidden"], x["weight"], x["targets"]
    mask, adv, old = x["mask"], x["advantages"], x["old_logp"]
    options = dict(loss_type="dapo", epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH)
    if provider == "gemm_floor":
        return gemm_floor(hidden[mask != 0], weight)
    if provider == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

        module = LigerFusedLinearGRPOLoss(
            beta=0.0,
            compiled=CUDA,
            use_ref_model=False,
            epsilon_low=EPS_LOW,
            epsilon_high=EPS_HIGH,
            loss_type="dapo",
            temperature=TEMPERATURE,
        )

        def loss() -> torch.Tensor:
            return module(hidden, weight, targets, mask, adv, old_per_token_logps=old)[0]
    elif provider == "medgrpo":

        def loss() -> torch.Tensor:
            return fused_linear_policy_loss(
                hidden, weight, targets, mask, adv, temperature=TEMPERATURE, old_logp=old, **options
            ).loss
    elif provider == "trl_eager":

        def loss() -> torch.Tensor:
            return peers.trl_grpo_loss(
                trl_logps(hidden, weight, targets),
                adv,
                mask,
                old_per_token_logps=old,
                loss_type="dapo",
                epsilon_low=EPS_LOW,
                epsilon_high=EPS_HIGH,
            )
    else:

        def loss() -> torch.Tensor:
            return reference.fused_linear_policy_loss(
                hidden, weight, targets, mask, adv, temperature=TEMPERATURE, old_logp=old, **options
            ).loss

    return backward_step(loss, hidden, weight)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("rows", ROWS, ids=lambda m: f"M{m}")
def bench_fused_linear_policy_loss(measure, benchmark, device: str, rows: int, provider: str) -> None:
    batch = rows // TOKENS
    x = make_inputs(batch, TOKENS, device)
    tokens_in = int((x["mask"] != 0).sum())
    params = {
        "op": "fused_linear_policy_loss",
        "rows": rows,
        "batch": batch,
        "tokens": TOKENS,
        "masked_in_tokens": tokens_in,
        "hidden": HIDDEN,
        "vocab": VOCAB,
        "dtype": DTYPE_NAME,
        "device": device,
        "mask_dtype": str(MASK_DTYPE).removeprefix("torch."),
        "loss_type": "dapo",
        "epsilon_low": EPS_LOW,
        "epsilon_high": EPS_HIGH,
        "old_logp": True,
        "beta": 0.0,
        "advantages": "per-sequence",
        "flops_all_rows": head_flops(rows),
        "grads": "hidden, weight",
    }
    run_provider(
        measure,
        benchmark,
        device,
        lambda: make_provider(provider, x),
        group=f"fused_linear_policy_loss fwd+bwd B={batch} T={TOKENS} H={HIDDEN} V={VOCAB} {DTYPE_NAME}",
        provider=provider,
        params=params,
        flops=head_flops(tokens_in),
        params_grad=(x["hidden"], x["weight"]),
    )
