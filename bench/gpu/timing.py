"""What the GPU validation's benchmark stages share: timers, the two ceilings, and an incremental JSON result.

* :func:`time_calls`: the median time of one call, after a warm-up, cycling through several
  input sets (so that inputs smaller than the L2 cache are not timed from the cache). CUDA:
  events around each call; CPU (the dry run): the wall clock.
* :func:`time_back_to_back`: the time per call of many calls issued back to back, host work
  included: what a launch-latency-bound op costs a training step.
* :func:`copy_rate` and :func:`gemm_rate`: the copy bandwidth and the matrix-product rate of
  this device, measured, not read off a datasheet (bench/gpu/ceilings.py prints both).
* :class:`StageResult`: a stage's JSON, rewritten after every measurement, so that a stage
  stopped at its timeout still leaves what it measured.

Peak memory is medgrpo.testing.memory.PeakMemory (bench_linear_logprob.peak_extra_mib).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

BENCH_DIR = Path(__file__).resolve().parent.parent
if str(BENCH_DIR) not in sys.path:  # the bench/bench_*.py modules whose providers the stages reuse
    sys.path.insert(0, str(BENCH_DIR))

DEFAULT_L2_BYTES = 64 * 2**20  # when torch does not report the L2 size


def bench_device() -> str:
    """ "cuda" when a GPU is visible, else "cpu" (the dry run)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def l2_bytes(device: str) -> int:
    """The device's L2 cache size (the CPU dry run: a nominal 64 MiB)."""
    if device != "cuda":
        return DEFAULT_L2_BYTES
    return int(getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 0) or DEFAULT_L2_BYTES)


def rotation_count(set_bytes: int, device: str, *, cover: int = 4, most: int = 64) -> int:
    """How many input sets of ``set_bytes`` to cycle through so that together they span ``cover`` x L2 (CPU: 2)."""
    if device != "cuda":
        return 2
    return max(1, min(most, math.ceil(cover * l2_bytes(device) / max(set_bytes, 1))))


def _summary(seconds: Sequence[float]) -> dict[str, float]:
    return {
        "median_s": statistics.median(seconds),
        "min_s": min(seconds),
        "mean_s": statistics.fmean(seconds),
        "reps": len(seconds),
    }


def time_calls(fns: Sequence[Callable[[], object]], device: str, *, warmup: int = 3, reps: int = 20) -> dict:
    """Median, min and mean seconds of one call, cycling through ``fns`` (one per input set).

    CUDA: an event pair around each call; calls are queued without a synchronize between them,
    so for GPU-bound work an event pair measures the kernels, not the Python that issued them.
    """
    for i in range(warmup):
        fns[i % len(fns)]()
    synchronize(device)
    if device == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for i, (start, end) in enumerate(events):
            start.record()
            fns[i % len(fns)]()
            end.record()
        torch.cuda.synchronize()
        return _summary([start.elapsed_time(end) / 1e3 for start, end in events])
    seconds = []
    for i in range(reps):
        start = time.perf_counter()
        fns[i % len(fns)]()
        seconds.append(time.perf_counter() - start)
    return _summary(seconds)


def time_back_to_back(
    fns: Sequence[Callable[[], object]], device: str, *, calls: int = 200, warmup: int = 20, repeats: int = 5
) -> dict:
    """Seconds per call of ``calls`` calls issued back to back (host work included), median of ``repeats``.

    The rate at which a loop can issue the op: for a tiny op this is its launch latency (Python
    argument handling + the launch), which the per-call event timing of :func:`time_calls` hides.
    """
    for i in range(warmup):
        fns[i % len(fns)]()
    per_call = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        for i in range(calls):
            fns[i % len(fns)]()
        synchronize(device)
        per_call.append((time.perf_counter() - start) / calls)
    return _summary(per_call) | {"calls": calls}


_SLEEP_HZ: list[float] = []


def _sleep_cycles_per_second() -> float:
    """Clock cycles per second of ``torch.cuda._sleep`` (its argument is in cycles), measured once."""
    if not _SLEEP_HZ:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for _ in range(2):  # the first one lets the clocks ramp up
            torch.cuda.synchronize()
            start.record()
            torch.cuda._sleep(10_000_000)
            end.record()
            torch.cuda.synchronize()
        _SLEEP_HZ.append(10_000_000 / (start.elapsed_time(end) / 1e3))
    return _SLEEP_HZ[0]


def time_queued(fns: Sequence[Callable[[], object]], device: str, *, calls: int = 100, repeats: int = 5) -> dict:
    """Device seconds per call with the host's work hidden: the GPU's own time for the op.

    CUDA: the GPU is first kept busy (``torch.cuda._sleep``, twice as long as the host takes to
    issue the calls), so that all ``calls`` calls are queued before it reaches the start event;
    the event pair around them then times their kernels back to back, launch gaps between
    dependent kernels included, host overhead excluded. ``queue_covered`` is False if the host
    was still issuing when the sleep ended (the time is then an upper bound). Elsewhere (the CPU
    dry run, or a torch without ``_sleep``) this is :func:`time_back_to_back`.
    """
    if device != "cuda" or not hasattr(torch.cuda, "_sleep"):
        return time_back_to_back(fns, device, calls=calls, repeats=repeats) | {"method": "back_to_back"}
    issue_s = time_back_to_back(fns, device, calls=calls, repeats=1)["median_s"] * calls
    sleep_s = 2 * issue_s + 1e-3
    hz = _sleep_cycles_per_second()
    per_call, covered = [], True
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(repeats):
        torch.cuda.synchronize()
        torch.cuda._sleep(int(hz * sleep_s))
        begin = time.perf_counter()
        start.record()
        for i in range(calls):
            fns[i % len(fns)]()
        end.record()
        covered &= time.perf_counter() - begin < 0.9 * sleep_s
        torch.cuda.synchronize()
        per_call.append(start.elapsed_time(end) / 1e3 / calls)
    return _summary(per_call) | {"calls": calls, "method": "queued", "queue_covered": covered, "sleep_s": sleep_s}


def copy_rate(device: str, nbytes: int | None = None, reps: int = 10) -> dict[str, float]:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    nbytes = nbytes or (2 * 2**30 if device == "cuda" else 64 * 2**20)
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    timing = time_calls([lambda: dst.copy_(src)], device, warmup=3, reps=reps)
    return {"bytes": nbytes, "bytes_per_s": 2 * nbytes / timing["median_s"], **timing}


def gemm_rate(device: str, size: int | None = None, reps: int = 10) -> dict[str, Any]:
    """Matrix-product rate (FLOP/s) of a size^3 product on random data: bf16 on CUDA, fp32 on the CPU."""
    size = size or (8192 if device == "cuda" else 512)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    out = torch.empty(size, size, device=device, dtype=dtype)
    timing = time_calls([lambda: torch.mm(a, b, out=out)], device, warmup=3, reps=reps)
    return {"size": size, "dtype": str(dtype).removeprefix("torch."), "flop_per_s": 2 * size**3 / timing["median_s"]}


class StageResult:
    """A stage's result dict, written to ``path`` (atomically) at every :meth:`save`."""

    def __init__(self, path: str | os.PathLike | None, **fields: Any) -> None:
        self.path = Path(path) if path else None
        self.data: dict[str, Any] = {"device": bench_device(), **fields}
        self.save()

    def save(self) -> None:
        if self.path is None:
            return
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str) + "\n")
        os.replace(tmp, self.path)


def out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is the device running out of memory (a result to record, not a crash)."""
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower()


def free_device_memory(device: str) -> None:
    import gc

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
