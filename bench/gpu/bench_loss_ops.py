"""Group advantages against the launch-latency floor, and the policy loss against the copy-bandwidth floor.

``python bench/gpu/bench_loss_ops.py advantages --json PATH`` and ``... policy-loss --json PATH``.
Inputs and providers are bench/bench_group_advantages.py's and bench/bench_policy_loss.py's.

advantages: reward normalization + group advantages (G = 8, 16 keys), N = 512 .. 65,536;
providers medgrpo (one Triton launch), reference (eager PyTorch) and trl (TRL's eager way). The
data is a few KiB, so the floor is latency: an empty Triton kernel with one pointer argument.
Each is timed two ways: back to back (``per_call``: seconds per call of a loop of calls, the
host's work included; the target's measure) and queued (``device``: the GPU's time with the
host's hidden, timing.time_queued). On CUDA the profiler counts the kernels of one medgrpo call.

policy-loss: the clipped loss (dapo, epsilon 0.2 / 0.3, old log-probs, per-sequence advantages,
int32 mask), forward + backward, (B, T) = (512, 2048) in fp32 and bf16; providers medgrpo,
reference, trl and a copy of the same bytes. The floor is ``fused_bytes`` (what a fused pass
must read and write) over the device's copy bandwidth measured in this run (a 2 GiB copy).
At ~7 us of traffic the host's Python would dominate a per-call timing, so the device time is
the queued one (timing.time_queued: kernels back to back, host hidden); ``per_call`` keeps the
host-inclusive time too. The inputs are smaller than the L2 cache, so every provider cycles
through enough input sets to span 4 x L2.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
import triton
from timing import (
    StageResult,
    bench_device,
    copy_rate,
    free_device_memory,
    rotation_count,
    time_back_to_back,
    time_queued,
)

import bench_group_advantages  # isort: skip
import bench_policy_loss  # isort: skip

CUDA = torch.cuda.is_available()
ADVANTAGE_SIZES = [512, 2048, 8192, 32768, 65536] if CUDA else [512, 4096]
ADVANTAGE_PROVIDERS = ["medgrpo", "reference", "trl"]
LOSS_SHAPE = (512, 2048) if CUDA else (16, 256)
LOSS_DTYPES = [torch.float32, torch.bfloat16]
LOSS_PROVIDERS = ["medgrpo", "reference", "trl", "copy_floor"]


# --------------------------------------------------------------------------- launch-latency floor
@triton.jit
def _empty_kernel(x_ptr):
    pass


def empty_kernel_launcher(x: torch.Tensor) -> Callable[[], None]:
    """A launch of an empty Triton kernel with one pointer argument: the launch-latency floor."""
    return lambda: _empty_kernel[(1,)](x)


def count_cuda_kernels(fn: Callable[[], object]) -> dict:
    """Kernels launched by one call of ``fn`` (CUDA, through torch.profiler); {} on the CPU or on error."""
    if not CUDA:
        return {}
    from torch.profiler import ProfilerActivity, profile

    try:
        fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        names = [
            e.name
            for e in prof.events()
            if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA
            and not e.name.lower().startswith(("memcpy", "memset"))
        ]
    except Exception as error:  # the profiler is a nicety: a failure is recorded, not fatal
        return {"error": f"{type(error).__name__}: {error}"[:300]}
    return {"kernels": len(names), "names": sorted(set(names))}


def bench_advantages(result: StageResult, device: str) -> None:
    result.data.update(group_size=bench_group_advantages.GROUP_SIZE, num_keys=bench_group_advantages.NUM_KEYS)
    groups = result.data.setdefault("groups", {})
    for n in ADVANTAGE_SIZES:
        sets = [bench_group_advantages.make_inputs(n, device, seed) for seed in range(4)]
        fns = {p: [bench_group_advantages.provider_fn(p, *s) for s in sets] for p in ADVANTAGE_PROVIDERS}
        fns["empty_kernel"] = [empty_kernel_launcher(s[0]) for s in sets]
        group = groups[f"N={n}"] = {"n": n, "providers": {}}
        for name, calls in fns.items():
            group["providers"][name] = {
                "per_call": time_back_to_back(calls, device, calls=200 if CUDA else 20, repeats=5 if CUDA else 2),
                "device": time_queued(calls, device, calls=200 if CUDA else 20, repeats=5 if CUDA else 2),
            }
            result.save()
        floor = group["providers"]["empty_kernel"]["per_call"]["median_s"]
        ours = group["providers"]["medgrpo"]["per_call"]["median_s"]
        group["medgrpo_ratio_to_launch_floor"] = ours / floor
        group["speedup_over"] = {
            p: group["providers"][p]["per_call"]["median_s"] / ours for p in ADVANTAGE_PROVIDERS if p != "medgrpo"
        }
        group["medgrpo_launches"] = count_cuda_kernels(fns["medgrpo"][0])
        result.save()
        print(f"advantages N={n}: medgrpo {ours * 1e6:.1f} us/call, empty kernel {floor * 1e6:.1f} us", flush=True)


# ------------------------------------------------------------------------------- copy floor
def bench_policy_loss_floor(result: StageResult, device: str) -> None:
    batch, tokens = LOSS_SHAPE
    copy = copy_rate(device)
    result.data["copy"] = copy
    groups = result.data.setdefault("groups", {})
    for dtype in LOSS_DTYPES:
        name = str(dtype).removeprefix("torch.")
        nbytes = bench_policy_loss.fused_bytes(batch, tokens, dtype)
        count = rotation_count(nbytes, device)
        sets = [bench_policy_loss.make_inputs(batch, tokens, dtype, device, seed) for seed in range(count)]
        group = groups[f"B={batch} T={tokens} {name}"] = {
            "batch": batch,
            "tokens": tokens,
            "dtype": name,
            "bytes_moved": nbytes,
            "input_sets": count,
            "floor_s": nbytes / copy["bytes_per_s"],
            "providers": {},
        }
        for provider in LOSS_PROVIDERS:
            calls = [bench_policy_loss.provider_fn(provider, x, nbytes) for x in sets]
            # 50 calls: few enough that the eager providers' ~50 kernels a call stay within the launch queue
            timing = time_queued(calls, device, calls=50 if CUDA else 10, repeats=5 if CUDA else 3)
            timing["fraction_of_copy_bandwidth"] = group["floor_s"] / timing["median_s"]
            timing["per_call"] = time_back_to_back(calls, device, calls=100 if CUDA else 10, repeats=3)
            group["providers"][provider] = timing
            result.save()
        ours = group["providers"]["medgrpo"]
        group["medgrpo_fraction_of_copy_bandwidth"] = ours["fraction_of_copy_bandwidth"]
        group["medgrpo_host_hidden"] = ours.get("queue_covered")  # False: the time is an upper bound
        group["medgrpo_gb_per_s"] = nbytes / ours["median_s"] / 1e9
        group["speedup_over"] = {
            p: group["providers"][p]["median_s"] / ours["median_s"] for p in ("reference", "trl") if p in LOSS_PROVIDERS
        }
        del sets
        free_device_memory(device)
        result.save()
        print(
            f"policy loss {batch}x{tokens} {name}: medgrpo {ours['median_s'] * 1e6:.1f} us, "
            f"{group['medgrpo_fraction_of_copy_bandwidth']:.0%} of copy bandwidth",
            flush=True,
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["advantages", "policy-loss"])
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    device = bench_device()
    result = StageResult(args.json, op=args.what)
    if args.what == "advantages":
        bench_advantages(result, device)
    else:
        bench_policy_loss_floor(result, device)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
