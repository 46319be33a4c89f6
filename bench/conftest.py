"""Shared benchmark machinery: the device, timed calls, and bench/results/<device_name>.json.

Every benchmark calls the ``measure`` fixture, which warms the function up, times it
(plus a device synchronize, so CUDA timings are real) with pytest-benchmark, and tags
the result with its group, provider and parameters. At the end of the session the
providers of each group are compared (provider time / medgrpo time; medgrpo's achieved
bandwidth over the ``copy_floor`` provider's) and merged into the device's results file.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Optional

import pytest
import torch

import medgrpo

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
OURS = "medgrpo"  # the provider every ratio is taken against
FLOOR_PROVIDER = "copy_floor"
MEASURED = pytest.StashKey[list]()


def bench_device() -> str:
    """ "cuda" when a GPU is visible, else "cpu"."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def device_name() -> str:
    """Results-file name of this machine: the slugified GPU name, or ``cpu-<N>cores``."""
    if torch.cuda.is_available():
        return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(0).lower()).strip("-")
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return f"cpu-{cores}cores"


def synchronize(device: str) -> None:
    """Wait for queued device work, so a timed call ends when its kernels end."""
    if device == "cuda":
        torch.cuda.synchronize()


def medgrpo_backend(device: str) -> str:
    """What "medgrpo" runs here: Triton on CUDA, the C++ kernels on CPU, else the reference."""
    if device == "cuda":
        return "triton"
    return "cpp" if medgrpo.has_native_cpu_kernels() else "reference (medgrpo._C missing)"


def _cpu_seconds() -> Optional[tuple[float, float, float]]:
    """(wall clock, busy CPU seconds of the whole machine, CPU seconds of this process); Linux only."""
    try:
        with open("/proc/stat") as stat:
            ticks = [int(v) for v in stat.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
    except (OSError, ValueError):
        return None
    busy = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")
    return time.perf_counter(), busy, time.process_time()


def other_cpu_cores(start: Optional[tuple[float, float, float]]) -> Optional[float]:
    """Cores kept busy by OTHER processes since ``start``: > ~0.1 means a contended timing."""
    end = _cpu_seconds()
    if start is None or end is None or end[0] <= start[0]:
        return None
    wall, busy, own = (e - s for e, s in zip(end, start))
    return round(max(busy - own, 0.0) / wall, 3)


@pytest.fixture(scope="session")
def device() -> str:
    return bench_device()


@pytest.fixture
def measure(benchmark, request: pytest.FixtureRequest, device: str) -> Callable[..., None]:
    """``measure(fn, group=..., provider=..., params=..., bytes_moved=None)`` times ``fn``.

    ``bytes_moved`` is the memory traffic the provider's work implies (see each bench
    file); with it, the achieved GB/s is stored and compared to ``copy_floor``.
    ``rounds`` fixes the number of timed calls (for calls of seconds, where pytest.ini's
    ``--benchmark-min-rounds`` would take minutes); None leaves it to pytest-benchmark.
    """

    def run(
        fn: Callable[[], Any],
        *,
        group: str,
        provider: str,
        params: dict[str, Any],
        bytes_moved: Optional[int] = None,
        warmup: int = 3,
        rounds: Optional[int] = None,
    ) -> None:
        def timed() -> None:
            fn()
            synchronize(device)

        for _ in range(warmup):  # compile, autotune, allocator and cache warm-up
            timed()
        benchmark.group = group
        benchmark.extra_info.update(provider=provider, params=params, bytes_moved=bytes_moved)
        if provider == OURS:
            benchmark.extra_info["backend"] = medgrpo_backend(device)
        start = _cpu_seconds()
        if rounds is None:
            benchmark(timed)
        else:
            benchmark.pedantic(timed, rounds=rounds, iterations=1)
        benchmark.extra_info["other_cpu_cores"] = other_cpu_cores(start)
        if benchmark.stats is not None:
            request.config.stash.setdefault(MEASURED, []).append(benchmark.stats)

    return run


# ------------------------------------------------------------------------------ results file
def _git_commit() -> Optional[str]:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=BENCH_DIR, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _environment() -> dict[str, Any]:
    try:
        import triton

        triton_version: Optional[str] = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": _git_commit(),
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
        "medgrpo_backend": medgrpo_backend(bench_device()),
        "command": " ".join(["pytest", *sys.argv[1:]]),
    }


def _compare(providers: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Ratios of a group: every provider's median over medgrpo's, and medgrpo's bandwidth share."""
    ours = providers.get(OURS)
    if ours is None:
        return {}
    summary: dict[str, Any] = {
        "ratio_to_medgrpo": {name: p["median_s"] / ours["median_s"] for name, p in providers.items()},
    }
    floor = providers.get(FLOOR_PROVIDER)
    if floor and ours.get("bytes_moved") and floor.get("bytes_moved"):
        ours_bw = ours["bytes_moved"] / ours["median_s"]
        copy_bw = floor["bytes_moved"] / floor["median_s"]
        summary.update(
            medgrpo_gb_per_s=ours_bw / 1e9,
            copy_gb_per_s=copy_bw / 1e9,
            medgrpo_fraction_of_copy_bandwidth=ours_bw / copy_bw,
        )
    return summary


def _merge_results(measured: list, path: Path) -> dict[str, Any]:
    """Fold this session's measurements into the results file (provider by provider)."""
    results: dict[str, Any] = {"device_name": device_name(), "groups": {}}
    if path.exists():
        try:
            results = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            pass  # a corrupt file is replaced, not fatal
    env = _environment()
    results["device_name"] = device_name()
    results["last_run"] = env
    touched: set[str] = set()
    for meta in measured:
        info, stats = meta.extra_info, meta.stats
        group = results["groups"].setdefault(meta.group, {"params": info["params"], "providers": {}})
        group["params"] = info["params"]
        group["providers"][info["provider"]] = {
            "median_s": stats.median,
            "mean_s": stats.mean,
            "min_s": stats.min,
            "stddev_s": stats.stddev,
            "rounds": stats.rounds,
            "iterations": meta.iterations,
            **{k: v for k, v in info.items() if k not in ("provider", "params")},
            "date": env["date"],
            "commit": env["commit"],
        }
        touched.add(meta.group)
    for name in touched:
        group = results["groups"][name]
        group.update(_compare(group["providers"]))
        ours = measured_by_group(measured, name).get(OURS)
        if ours is not None:  # also shown by --benchmark-json / --benchmark-save
            ours.extra_info.update({k: v for k, v in group.items() if k.startswith("medgrpo_")})
    return results


def measured_by_group(measured: list, group: str) -> dict[str, Any]:
    """This session's pytest-benchmark metadata of one group, by provider."""
    return {m.extra_info["provider"]: m for m in measured if m.group == group}


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> Iterator[None]:
    """Write bench/results/<device_name>.json before pytest-benchmark prints its tables."""
    measured = session.config.stash.get(MEASURED, [])
    if measured:
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        path = RESULTS_DIR / f"{device_name()}.json"
        results = _merge_results(measured, path)
        path.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    yield
