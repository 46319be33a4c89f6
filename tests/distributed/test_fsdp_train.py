"""`torchrun --nproc_per_node 2 -m medgrpo train`: FSDP2 (gloo, CPU) SFT and GRPO steps on the tiny model."""

from __future__ import annotations

import json
import math

import pytest
import yaml

from medgrpo.testing.distributed import torchrun


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


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sft", "grpo"])
def test_two_rank_fsdp_run(tiny_run, tmp_path, mode):
    _, dataset, model_dir = tiny_run
    out = tmp_path / "run"
    write_config(tmp_path / "config.yaml", out, dataset, model_dir, mode)
    result = torchrun(["-m", "medgrpo", "train", "--config", str(tmp_path / "config.yaml")])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in rows)
    assert (out / "checkpoints" / "step_000003").is_dir() and list((out / "final").glob("*.safetensors"))
