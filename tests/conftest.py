"""Shared fixtures: which backends run here, Triton's interpreter on CPU-only machines, and the tiny
Qwen2.5-VL the trainer, distributed and data tests share (built once per session)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path

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
    config.addinivalue_line(
        "markers", "slow: an integration test (whole runs, subprocesses, many processes); -m 'not slow' skips them"
    )


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
def head_chunks(request: pytest.FixtureRequest) -> Callable[[str], tuple[contextlib.AbstractContextManager, str]]:
    """``head_chunks(backend)`` -> (context, device) that run the lm head's row kernels of ``backend``:
    "torch" on CPU tensors; "triton" on CUDA, or on CPU tensors through the interpreter (skipped without triton)."""

    def select(backend: str) -> tuple[contextlib.AbstractContextManager, str]:
        if backend != "triton":
            return contextlib.nullcontext(), "cpu"
        from medgrpo.ops.linear_logprob import triton_chunks_on_cpu

        device = request.getfixturevalue("triton_device")
        return (triton_chunks_on_cpu() if device == "cpu" else contextlib.nullcontext()), device

    return select


@pytest.fixture
def native_cpu() -> None:
    """Skip unless the C++ CPU kernels of csrc/ are built and loaded."""
    import medgrpo

    if not medgrpo.has_native_cpu_kernels():
        pytest.skip("medgrpo._C (C++ CPU kernels) is not built")


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    """The offline Qwen2.5-VL-style tokenizer (512 tokens)."""
    from medgrpo.demo.tiny_model import build_tokenizer

    return build_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    """The tiny random Qwen2.5-VL (seed 0) saved with ``tokenizer``: what ``from_pretrained`` loads."""
    from medgrpo.demo.tiny_model import build_tiny_model

    directory = tmp_path_factory.mktemp("tiny_model")
    tokenizer.save_pretrained(directory)
    build_tiny_model(directory, tokenizer)
    return directory


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """``(root, dataset, model_dir)``: what ``medgrpo demo`` prepares, small: 8 synthetic videos and a tiny
    model whose tokenizer learned the dataset's text (seed 1)."""
    from medgrpo.demo.pipeline import DemoSettings, prepare

    root = tmp_path_factory.mktemp("tiny_run")
    dataset, model_dir = prepare(DemoSettings(out_dir=str(root), num_videos=8, seed=1))
    return root, dataset, model_dir


@pytest.fixture(scope="session")
def tiny_run_config(tiny_run) -> Callable[..., dict]:
    """``make(out, **changes)``: the config, as plain data (what a YAML file holds), of a short GRPO run on the CPU
    over ``tiny_run``'s records and model, writing to ``out``: 2 steps, saved at the last only, one prompt of 4
    completions of up to 8 tokens per step, 56×56 frames decoded in this process. ``changes`` set fields by
    dotted name (``make(out, steps=4, **{"grpo.rollout.group_size": 1})``); a section's name sets all of it."""
    from medgrpo.train.config import set_dotted

    _, dataset, model_dir = tiny_run

    def make(out: Path, **changes) -> dict:
        config = {
            "mode": "grpo",
            "output_dir": str(out),
            "steps": 2,
            "save_every": 0,
            "device": "cpu",
            "model": {"path": str(model_dir), "dtype": "float32", "attention": "sdpa", "freeze_vision": True},
            "data": {
                "train_file": str(dataset.train),
                "num_workers": 0,
                "decode": {"min_pixels": 3136, "max_pixels": 3136},
            },
            "grpo": {"prompts_per_step": 1, "micro_batch_size": 4, "rollout": {"group_size": 4, "max_new_tokens": 8}},
            "optim": {"lr": 1e-3},
        }
        for dotted, value in changes.items():
            set_dotted(config, dotted, value)
        return config

    return make
