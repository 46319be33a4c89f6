"""`torchrun --nproc_per_node 2 -m medgrpo train`: FSDP2 (gloo, CPU) SFT and GRPO steps on the tiny model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from medgrpo.testing.corrupt import write_undecodable_frames
from medgrpo.testing.distributed import torchrun


def write_config(tiny_run_config, path: Path, out: Path, mode: str) -> None:
    """The tiny run's config (``tiny_run_config``) for two ranks: 3 steps, saved at step 2, 2 sequences per pass."""
    changes = {
        "model.activation_checkpointing": True,
        "sft.batch_size": 2,
        "sft.micro_batch_size": 2,
        "grpo.micro_batch_size": 2,
    }
    config = tiny_run_config(out, mode=mode, steps=3, save_every=2, **changes)
    path.write_text(yaml.safe_dump(config))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sft", "grpo"])
def test_two_rank_fsdp_run(tiny_run_config, tmp_path, mode):
    out = tmp_path / "run"
    write_config(tiny_run_config, tmp_path / "config.yaml", out, mode)
    result = torchrun(["-m", "medgrpo", "train", "--config", str(tmp_path / "config.yaml")])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in rows)
    assert (out / "checkpoints" / "step_000003").is_dir() and list((out / "final").glob("*.safetensors"))


def corrupt_records(dataset, count: int) -> list[str]:
    """Record lines whose frames exist but do not decode: found only when a rank draws them."""
    first = json.loads(Path(dataset.train).read_text().splitlines()[0])
    lines = []
    for n in range(count):
        frames = write_undecodable_frames(Path(dataset.train).parent, f"frames/corrupt_two_ranks_{n}")
        lines.append(json.dumps({**first, "id": f"corrupt_{n}", "video": frames}))
    return lines


@pytest.mark.slow
def test_two_ranks_refill_their_batches_from_good_records(tiny_run, tiny_run_config, tmp_path):
    """Ranks skip different records while drawing, refill their batches, and step together; each rank's data
    position and skips are checkpointed."""
    _, dataset, _ = tiny_run
    mixed = Path(dataset.train).parent / "train_two_ranks_mixed.jsonl"
    mixed.write_text("\n".join(Path(dataset.train).read_text().splitlines() + corrupt_records(dataset, 6)) + "\n")
    out = tmp_path / "run"
    write_config(tiny_run_config, tmp_path / "config.yaml", out, "grpo")
    result = torchrun(
        ["-m", "medgrpo", "train", "--config", str(tmp_path / "config.yaml"), f"data.train_file={mixed}", "steps=4"]
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    state = torch.load(out / "checkpoints" / "step_000004" / "trainer_state.pt", weights_only=True)
    ranks = state["extra_state"]["ranks"]
    assert len(ranks) == 2 and ranks[0]["sampler"] != ranks[1]["sampler"]
    assert any(r["sampler"]["skipped"].get("unreadable_video") for r in ranks)  # a corrupt record was drawn


@pytest.mark.slow
def test_two_ranks_without_a_usable_record_stop_together(tiny_run, tiny_run_config, tmp_path):
    """Every record passes the screen but none decodes: both ranks stop at the first step, with one line."""
    _, dataset, _ = tiny_run
    broken = Path(dataset.train).parent / "train_two_ranks_broken.jsonl"
    broken.write_text("\n".join(corrupt_records(dataset, 3)) + "\n")
    out = tmp_path / "run"
    write_config(tiny_run_config, tmp_path / "config.yaml", out, "grpo")
    result = torchrun(
        ["-m", "medgrpo", "train", "--config", str(tmp_path / "config.yaml"), f"data.train_file={broken}"]
    )
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.startswith("medgrpo train: ")]
    assert len(lines) == 1 and "no usable record left to draw at step 1" in lines[0], result.stderr[-6000:]
    assert "the batch has no prompts" not in result.stderr
