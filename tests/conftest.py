"""Shared fixtures: which backends run here, and Triton's interpreter on CPU-only machines."""

from __future__ import annotations

import os

import torch

# Without a GPU, Triton kernels run under the interpreter (must be set before triton imports).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return HAS_CUDA or os.environ.get("TRITON_INTERPRET") == "1"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")


def pytest_collection_modifyitems(config: pytest.Config, items: list) -> None:
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def triton_device() -> str:
    """Device the Triton launchers run on: CUDA, or CPU through TRITON_INTERPRET=1."""
    if not triton_available():
        pytest.skip("triton is not installed")
    return "cuda" if HAS_CUDA else "cpu"


@pytest.fixture
def native_cpu() -> None:
    """Skip unless the C++ CPU kernels of csrc/ are built and loaded."""
    import medgrpo

    if not medgrpo.has_native_cpu_kernels():
        pytest.skip("medgrpo._C (C++ CPU kernels) is not built")
