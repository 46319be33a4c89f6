"""`torchrun --nproc_per_node 2 -m medgrpo train`: FSDP2 (gloo, CPU) SFT and GRPO steps on the tiny model."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys

import pytest
import yaml

from medgrpo.demo.synthetic import demo_tokenizer_corpus, generate_dataset
from medgrpo.demo.tiny_model import build_tiny_model, build_tokenizer


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(config_path, timeout: int = 400) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        "-m",
        "medgrpo",
        "train",
        "--config",
        str(config_path),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp_train")
    dataset = generate_dataset(root / "data", num_videos=8, seed=2)
    model_dir = root / "init"
    tokenizer = build_tokenizer(model_dir, corpus=demo_tokenizer_corpus(dataset))
    build_tiny_model(model_dir, tokenizer, seed=2)
    return root, dataset, model_dir


def write_config(path, out, dataset, model_dir, mode: str) -> None:
    config = {
        "mode": mode,
        "output_dir": str(out),
        "steps": 3,
        "save_every": 2,
        "device": "cpu",
        "model": {
            "path": str(model_dir),
            "dtype": "float32",
            "attention": "sdpa",
            "activation_checkpointing": True,
            "freeze_vision": True,
        },
        "data": {
            "train_file": str(dataset.train),
            "num_workers": 0,
            "decode": {"min_pixels": 3136, "max_pixels": 3136},
        },
        "sft": {"batch_size": 2, "micro_batch_size": 2},
        "grpo": {"prompts_per_step": 1, "micro_batch_size": 2, "rollout": {"group_size": 4, "max_new_tokens": 8}},
        "optim": {"lr": 1e-3},
    }
    path.write_text(yaml.safe_dump(config))


@pytest.mark.parametrize("mode", ["sft", "grpo"])
def test_two_rank_fsdp_run(setup, tmp_path, mode):
    _, dataset, model_dir = setup
    out = tmp_path / "run"
    write_config(tmp_path / "config.yaml", out, dataset, model_dir, mode)
    result = torchrun(tmp_path / "config.yaml")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in rows)
    assert (out / "checkpoints" / "step_000003").is_dir() and list((out / "final").glob("*.safetensors"))
