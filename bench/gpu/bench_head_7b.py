"""Qwen2.5-VL-7B's lm-head + clipped policy loss, fwd+bwd, providers side by side: time and peak memory.

``python bench/gpu/bench_head_7b.py --json PATH [--budget-s S]``. The shapes, inputs and
providers are bench/bench_fused_linear_policy_loss.py's (on CUDA: H 3,584, V 152,064, bf16,
T = 1,024; MedGRPO's loss settings: dapo, epsilon 0.2 / 0.3, beta 0, old log-probs given, one
advantage per sequence, ragged int32 mask):

    gemm_floor  the head's three bare GEMMs (logits, grad-hidden, grad-weight) over the masked-in rows
    medgrpo     medgrpo.ops.fused_linear_policy_loss
    trl_eager   TRL's way: full logits, selective log-softmax, peers.trl_grpo_loss
    liger       Liger-Kernel's LigerFusedLinearGRPOLoss (compiled on CUDA); "missing" without liger_kernel

Completion tokens M = B x T in {4096, 8192, 16384} on CUDA ({128, 256} at the bench file's CPU
head in the dry run). Providers run in the outer loop, so a provider that is slow to compile
(Liger's torch.compile) or runs past ``--budget-s`` costs only its own numbers. Per provider and
M: the median of event-timed calls after a warm-up (the inputs are many times the L2 cache, so
one input set), and the peak extra memory of one separate call (max_memory_allocated).
"""

from __future__ import annotations

import argparse
import importlib.util
import time

import torch
from timing import StageResult, bench_device, free_device_memory, out_of_memory, time_calls

from bench_fused_linear_policy_loss import EPS_HIGH, EPS_LOW, make_inputs, make_provider  # isort: skip
from bench_linear_logprob import DTYPE_NAME, HIDDEN, VOCAB, head_flops, peak_extra_mib  # isort: skip

PROVIDERS = ["gemm_floor", "medgrpo", "trl_eager", "liger"]
TOKENS = 1024 if torch.cuda.is_available() else 128
ROWS = [4096, 8192, 16384] if torch.cuda.is_available() else [128, 256]
WARMUP, REPS = (2, 10) if torch.cuda.is_available() else (1, 3)


def provider_available(provider: str) -> bool:
    return provider != "liger" or importlib.util.find_spec("liger_kernel") is not None


def measure(provider: str, x: dict[str, torch.Tensor], device: str) -> dict:
    """One provider at one shape: warm-up (compiles), peak memory of one call, then the timed calls."""
    make_provider(provider, x)()  # compile / autotune before the memory call
    peak = peak_extra_mib(lambda: make_provider(provider, x), device, x["hidden"], x["weight"])
    timing = time_calls([make_provider(provider, x)], device, warmup=WARMUP, reps=REPS)
    x["hidden"].grad = x["weight"].grad = None
    return {**timing, "peak_extra_mib": peak}


def compare(group: dict) -> None:
    """Ratios of one shape: time / gemm_floor, time / liger, liger / medgrpo, memory / liger's."""
    timed = {name: e for name, e in group["providers"].items() if "median_s" in e}
    floor, liger, ours = timed.get("gemm_floor"), timed.get("liger"), timed.get("medgrpo")
    for entry in timed.values():
        entry["tflop_per_s"] = group["flops"] / entry["median_s"] / 1e12
        if floor:
            entry["ratio_to_gemm_floor"] = entry["median_s"] / floor["median_s"]
        if liger:
            entry["ratio_to_liger"] = entry["median_s"] / liger["median_s"]
    if ours and liger:
        group["medgrpo_speedup_over_liger"] = liger["median_s"] / ours["median_s"]
        group["medgrpo_memory_over_liger"] = ours["peak_extra_mib"] / max(liger["peak_extra_mib"], 1e-9)
    if ours and floor:
        group["medgrpo_ratio_to_gemm_floor"] = ours["median_s"] / floor["median_s"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", default=None)
    parser.add_argument("--budget-s", type=float, default=float("inf"), help="skip what would start after this")
    args = parser.parse_args(argv)
    device, start = bench_device(), time.perf_counter()
    result = StageResult(
        args.json,
        hidden=HIDDEN,
        vocab=VOCAB,
        dtype=DTYPE_NAME,
        tokens_per_sequence=TOKENS,
        loss={"loss_type": "dapo", "epsilon_low": EPS_LOW, "epsilon_high": EPS_HIGH, "beta": 0.0, "old_logp": True},
        timing={"warmup": WARMUP, "reps": REPS, "stat": "median", "input_sets": 1},
        groups={},
    )
    inputs = {rows: make_inputs(rows // TOKENS, TOKENS, device) for rows in ROWS}
    for rows, x in inputs.items():
        masked_in = int((x["mask"] != 0).sum())
        result.data["groups"][f"M={rows}"] = {
            "rows": rows,
            "batch": rows // TOKENS,
            "masked_in_tokens": masked_in,
            "flops": head_flops(masked_in),
            "providers": {},
        }
    for provider in PROVIDERS:
        for rows, x in inputs.items():
            group = result.data["groups"][f"M={rows}"]
            if not provider_available(provider):
                group["providers"][provider] = {"status": "missing", "error": "liger_kernel is not installed"}
            elif time.perf_counter() - start > args.budget_s:
                group["providers"][provider] = {"status": "skipped", "error": "stage time budget spent"}
            else:
                try:
                    group["providers"][provider] = {"status": "ok", **measure(provider, x, device)}
                except Exception as error:  # one provider's failure is a result, not the end of the stage
                    status = "oom" if out_of_memory(error) else "failed"
                    group["providers"][provider] = {"status": status, "error": f"{type(error).__name__}: {error}"[:500]}
                free_device_memory(device)
            compare(group)
            result.save()
            entry = group["providers"][provider]
            shown = f"{entry['median_s'] * 1e3:.2f} ms" if "median_s" in entry else entry["status"]
            print(f"head M={rows} {provider}: {shown}", flush=True)
    statuses = [e["status"] for g in result.data["groups"].values() for e in g["providers"].values()]
    return 1 if "failed" in statuses else 0  # missing (no Liger), oom and skipped are results, not failures


if __name__ == "__main__":
    raise SystemExit(main())
