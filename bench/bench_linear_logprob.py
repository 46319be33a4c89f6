"""lm-head token log-probs, forward + backward w.r.t. hidden and weight: medgrpo vs the GEMM floor and eager peers.

The loss is the sum of the log-probs (plus the sum of the entropies for
``medgrpo_entropy``), so every provider does one head forward and its backward. Each
provider's time is compared to ``gemm_floor`` (the three bare GEMMs of the head) and its
peak extra memory is measured in a separate, untimed call (medgrpo.testing.memory).

This file also holds what bench_fused_linear_policy_loss.py shares: the head shapes, the
floor, TRL's selective log-softmax, and the per-group summary (ratios, memory, TFLOP/s).
"""

from __future__ import annotations

import gc
import os
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from medgrpo.ops import reference
from medgrpo.ops.linear_logprob import linear_logprob
from medgrpo.testing.memory import PeakMemory

CUDA = torch.cuda.is_available()
TEMPERATURE = 1.0
if CUDA:  # Qwen2.5-VL-7B's lm-head, bf16; M = B x T rows with T = 1024
    HIDDEN, VOCAB, DTYPE, TOKENS = 3584, 152064, torch.bfloat16, 1024
    ROWS = [2048, 8192, 32768]
    FLOOR_CHUNK_BYTES = 4 * 2**30  # the floor's (rows, V) logits / gradient buffers, each
else:  # small shapes that keep both head files well within 3 minutes on 2 cores
    HIDDEN, VOCAB, DTYPE, TOKENS = 256, 8192, torch.float32, 256
    ROWS = [512, 2048]
    FLOOR_CHUNK_BYTES = 2**62  # one chunk: the floor is the three whole GEMMs
# Size knob: MEDGRPO_BENCH_HEAD="H,V" and MEDGRPO_BENCH_ROWS="M1,M2,..." replace the shapes above
# (e.g. "2048,151936" and "1024,4096": a Qwen2.5-VL-3B-sized head on CPU; see bench/README.md).
if os.environ.get("MEDGRPO_BENCH_HEAD"):
    HIDDEN, VOCAB = (int(v) for v in os.environ["MEDGRPO_BENCH_HEAD"].split(","))
if os.environ.get("MEDGRPO_BENCH_ROWS"):
    ROWS = [int(v) for v in os.environ["MEDGRPO_BENCH_ROWS"].split(",")]
# CPU: the untimed memory call and pytest-benchmark's calibration call are the warm-ups.
WARMUP = 3 if CUDA else 0
PROVIDERS = ["gemm_floor", "medgrpo", "medgrpo_entropy", "trl_eager", "reference"]
DTYPE_NAME = str(DTYPE).removeprefix("torch.")


# ------------------------------------------------------------------------------ shared pieces
def head_flops(rows: int) -> int:
    """Forward logits GEMM + the two backward GEMMs: 3 x 2·rows·H·V."""
    return 6 * rows * HIDDEN * VOCAB


_WEIGHTS: dict[tuple[str, int], torch.Tensor] = {}


def make_head(batch: int, tokens: int, device: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """(B, T, H) hidden and (V, H) weight (logits ~ N(0, 1)), both requiring grad; (B, T) targets.

    Generated on the device; the weight (1 GiB in bf16 on CUDA) is made once per device and seed.
    """
    gen = torch.Generator(device).manual_seed(seed)
    if (device, seed) not in _WEIGHTS:
        weight = torch.randn(VOCAB, HIDDEN, generator=gen, device=device) * HIDDEN**-0.5
        _WEIGHTS[device, seed] = weight.to(DTYPE).requires_grad_(True)
    gen.manual_seed(seed + 1)
    hidden = torch.randn(batch, tokens, HIDDEN, generator=gen, device=device, dtype=DTYPE)
    targets = torch.randint(0, VOCAB, (batch, tokens), generator=gen, device=device)
    return {"hidden": hidden.requires_grad_(True), "weight": _WEIGHTS[device, seed], "targets": targets}


def selective_log_softmax(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """TRL's trl.trainer.utils.selective_log_softmax: gather, then a per-sequence logsumexp loop."""
    if logits.dtype in (torch.float32, torch.float64):
        selected_logits = torch.gather(logits, dim=-1, index=index.unsqueeze(-1)).squeeze(-1)
        logsumexp_values = torch.stack([torch.logsumexp(lg, dim=-1) for lg in logits])  # loop: less peak memory
        return selected_logits - logsumexp_values
    per_token_logps = []  # bf16: logsumexp is unstable, log_softmax row by row
    for row_logits, row_labels in zip(logits, index):
        row_logps = F.log_softmax(row_logits, dim=-1)
        per_token_logps.append(row_logps.gather(dim=-1, index=row_labels.unsqueeze(-1)).squeeze(-1))
    return torch.stack(per_token_logps)


def trl_logps(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """TRL GRPOTrainer._get_per_token_logps: full lm-head logits, / temperature, selective log-softmax."""
    logits = F.linear(hidden, weight) / TEMPERATURE
    return selective_log_softmax(logits, targets)


def gemm_floor(hidden: torch.Tensor, weight: torch.Tensor) -> Callable[[], None]:
    """The head's three bare GEMMs over hidden's rows, into preallocated buffers.

    Forward logits = h @ W.T; backward g @ W (d hidden) and g.T @ h (d weight) with a
    preallocated (rows, V) gradient g. When a (rows, V) buffer exceeds FLOOR_CHUNK_BYTES
    (CUDA, large M) it runs over row chunks: the same FLOPs, smaller buffers.
    """
    h = hidden.detach().reshape(-1, hidden.shape[-1])
    w = weight.detach()
    rows = max(1, min(h.shape[0], FLOOR_CHUNK_BYTES // (VOCAB * h.element_size())))
    logits = h.new_empty(rows, VOCAB)
    grad_logits = torch.randn_like(logits)
    grad_hidden, grad_weight = torch.empty_like(h), torch.empty_like(w)

    def run() -> None:
        for start in range(0, h.shape[0], rows):
            end = min(start + rows, h.shape[0])
            g, hc = grad_logits[: end - start], h[start:end]
            torch.mm(hc, w.t(), out=logits[: end - start])
            torch.mm(g, w, out=grad_hidden[start:end])
            if start == 0:
                torch.mm(g.t(), hc, out=grad_weight)
            else:
                grad_weight.addmm_(g.t(), hc)

    return run


def backward_step(loss: Callable[[], torch.Tensor], *params: torch.Tensor) -> Callable[[], None]:
    """A forward + backward of ``loss()``; the parameters' grads are reset to None first."""

    def run() -> None:
        for p in params:
            p.grad = None
        loss().backward()

    return run


def peak_extra_mib(make: Callable[[], Callable[[], None]], device: str, *params: torch.Tensor) -> float:
    """Peak extra memory (MiB) of one call of ``make()()``, building the provider inside the block."""
    for p in params:
        p.grad = None
    gc.collect()
    with PeakMemory(device) as meter:
        make()()
    for p in params:
        p.grad = None
    return meter.peak_extra_mib


# group -> provider -> {"median_s", "peak_extra_mib", "flops", "info"} (or {"oom": True})
RESULTS: dict[str, dict[str, dict[str, Any]]] = {}


def run_provider(
    measure,
    benchmark,
    device: str,
    make: Callable[[], Callable[[], None]],
    *,
    group: str,
    provider: str,
    params: dict[str, Any],
    flops: int,
    params_grad: tuple,
) -> None:
    """Memory (untimed call), then time; record both. On CUDA OOM: record "oom" and skip."""
    entry = RESULTS.setdefault(group, {}).setdefault(provider, {"flops": flops})
    oom = False
    try:
        if CUDA:
            make()()  # compile / autotune before the memory call
        entry["peak_extra_mib"] = peak_extra_mib(make, device, *params_grad)
        measure(make(), group=group, provider=provider, params=params, warmup=WARMUP)
    except torch.cuda.OutOfMemoryError:
        oom = True
    if oom:  # outside the except block: its traceback no longer holds the provider's tensors
        entry["oom"] = True
        gc.collect()
        torch.cuda.empty_cache()
        pytest.skip(f"{provider}: CUDA out of memory")
    if benchmark.stats is None:  # --benchmark-disable: called once, nothing timed
        return
    entry["median_s"] = benchmark.stats.stats.median
    entry["info"] = benchmark.extra_info
    benchmark.extra_info.update(
        peak_extra_mib=entry["peak_extra_mib"], flops=flops, tflop_per_s=flops / entry["median_s"] / 1e12
    )


def summarize(results: dict[str, dict[str, dict[str, Any]]]) -> None:
    """Per provider: time / gemm_floor, time / liger; medgrpo also gets the whole group's table."""
    for providers in results.values():
        timed = {name: e for name, e in providers.items() if "median_s" in e}
        floor, liger = timed.get("gemm_floor"), timed.get("liger")
        for e in timed.values():
            if floor:
                e["info"]["ratio_to_gemm_floor"] = e["median_s"] / floor["median_s"]
            if liger:
                e["info"]["ratio_to_liger"] = e["median_s"] / liger["median_s"]
        if "medgrpo" in timed:
            ours = timed["medgrpo"]["info"]
            ours["peak_extra_mib_by_provider"] = {
                n: "oom" if e.get("oom") else e.get("peak_extra_mib") for n, e in providers.items()
            }
            ours["tflop_per_s_by_provider"] = {n: e["info"]["tflop_per_s"] for n, e in timed.items()}
            for key in ("ratio_to_gemm_floor", "ratio_to_liger"):
                if key in ours:
                    ours[f"{key}_by_provider"] = {n: e["info"][key] for n, e in timed.items()}


@pytest.fixture(scope="module", autouse=True)
def _summary():
    yield
    summarize(RESULTS)  # before conftest's session end writes the results file


# ------------------------------------------------------------------------------ this benchmark
def make_provider(provider: str, x: dict[str, torch.Tensor]) -> Callable[[], None]:
    hidden, weight, targets = x["hidden"], x["weight"], x["targets"]
    if provider == "gemm_floor":
        return gemm_floor(hidden, weight)
    if provider == "medgrpo":

        def loss() -> torch.Tensor:
            return linear_logprob(hidden, weight, targets, temperature=TEMPERATURE)[0].sum()
    elif provider == "medgrpo_entropy":

        def loss() -> torch.Tensor:
            logp, entropy = linear_logprob(hidden, weight, targets, temperature=TEMPERATURE, return_entropy=True)
            return logp.sum() + entropy.sum()
    elif provider == "trl_eager":

        def loss() -> torch.Tensor:
            return trl_logps(hidden, weight, targets).sum()
    else:

        def loss() -> torch.Tensor:
            return reference.linear_logprob(hidden, weight, targets, temperature=TEMPERATURE)[0].sum()

    return backward_step(loss, hidden, weight)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("rows", ROWS, ids=lambda m: f"M{m}")
def bench_linear_logprob(measure, benchmark, device: str, rows: int, provider: str) -> None:
    x = make_head(rows // TOKENS, TOKENS, device)
    params = {
        "op": "linear_logprob",
        "rows": rows,
        "batch": rows // TOKENS,
        "tokens": TOKENS,
        "hidden": HIDDEN,
        "vocab": VOCAB,
        "dtype": DTYPE_NAME,
        "device": device,
        "temperature": TEMPERATURE,
        "loss": "logp.sum() (+ entropy.sum() for medgrpo_entropy)",
        "grads": "hidden, weight",
    }
    run_provider(
        measure,
        benchmark,
        device,
        lambda: make_provider(provider, x),
        group=f"linear_logprob fwd+bwd M={rows} H={HIDDEN} V={VOCAB} {DTYPE_NAME}",
        provider=provider,
        params=params,
        flops=head_flops(rows),
        params_grad=(x["hidden"], x["weight"]),
    )
