"""The training loop on the tiny model: SFT and GRPO run, resume is exact, bad steps and bad data are counted."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from medgrpo.train.config import TrainConfig, config_from_dict
from medgrpo.train.loop import train
from medgrpo.train.optim import optimizer_step
from medgrpo.train.sampler import BalancedSampler


def config(tiny_run_config, out: Path, mode: str, steps: int, **overrides) -> TrainConfig:
    changes = {
        "model.activation_checkpointing": False,
        "model.freeze_vision": mode == "grpo",
        "grpo.prompts_per_step": 2,
        "grpo.rollout.max_new_tokens": 12,
        "sft.batch_size": 4,
        "sft.micro_batch_size": 4,
    }
    if "train_file" in overrides:
        changes["data.train_file"] = str(overrides.pop("train_file"))
    return config_from_dict(tiny_run_config(out, mode=mode, seed=3, steps=steps, **changes, **overrides))


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_sft_then_grpo_run_and_export(tiny_run_config, tmp_path):
    sft = train(config(tiny_run_config, tmp_path / "sft", "sft", 3))
    rows = metrics(tmp_path / "sft")
    assert [r["step"] for r in rows] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in rows)
    assert (sft.export_dir / "model.safetensors").exists()  # the tiny model fits one safetensors file
    grpo_config = config(tiny_run_config, tmp_path / "grpo", "grpo", 2)
    grpo_config.model.path = str(sft.export_dir)
    train(grpo_config)
    rows = metrics(tmp_path / "grpo")
    for name in (
        "loss",
        "reward_raw",
        "advantage_std",
        "zero_std_group_fraction",
        "clip_fraction",
        "entropy",
        "time_rollout_s",
        "time_update_s",
        "tokens_per_s",
        "completion_tokens",
    ):
        assert name in rows[-1], name
    assert any(key.startswith("reward_raw/") for key in rows[-1])
    assert any(key.startswith("reward_norm/") for key in rows[-1])
    assert (tmp_path / "grpo" / "reward_curves.png").exists()  # matplotlib is a [dev] dependency


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sft", "grpo"])
def test_resume_continues_exactly(tiny_run_config, tmp_path, mode):
    straight = tmp_path / "straight"
    train(config(tiny_run_config, straight, mode, 4, save_every=2))
    resumed = tmp_path / "resumed"
    train(config(tiny_run_config, resumed, mode, 2, save_every=2))
    shutil.rmtree(resumed / "checkpoints" / "step_000002.tmp", ignore_errors=True)
    train(config(tiny_run_config, resumed, mode, 4, save_every=2, resume=True))
    keys = ("loss", "grad_norm", "reward_raw", "entropy")
    expected = [{k: r.get(k) for k in keys} for r in metrics(straight)[2:]]
    got = [{k: r.get(k) for k in keys} for r in metrics(resumed)[2:]]
    assert got == expected


def test_nonfinite_step_is_skipped_and_weights_untouched():
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    loss = model(torch.tensor([[1.0, float("inf"), 0.0]])).sum()
    loss.backward()
    stepped, grad_norm = optimizer_step(list(model.parameters()), optimizer, None, loss=loss, max_grad_norm=1.0)
    assert not stepped and not torch.isfinite(grad_norm)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(p.grad is None for p in model.parameters()) and not optimizer.state
    loss = model(torch.ones(1, 3)).sum()
    loss.backward()
    assert optimizer_step(list(model.parameters()), optimizer, None, loss=loss, max_grad_norm=1.0)[0]


@pytest.mark.slow
def test_bad_records_are_skipped_and_counted(tiny_run, tiny_run_config, tmp_path):
    _, dataset, _ = tiny_run
    lines = Path(dataset.train).read_text().splitlines()
    broken = json.loads(lines[0])
    broken["video"] = ["frames/missing/000000.jpg", "frames/missing/000001.jpg"]
    bad_file = Path(dataset.train).parent / "train_with_bad.jsonl"
    bad_file.write_text("\n".join(lines + [json.dumps(broken), "{not json"] * 3) + "\n")
    summary = train(config(tiny_run_config, tmp_path / "bad", "sft", 6, train_file=bad_file))
    assert summary.steps == 6
    assert summary.skipped_records.get("unreadable_video", 0) + summary.skipped_records.get("bad_record", 0) > 0
    assert metrics(tmp_path / "bad")[-1]["skipped_records"] == sum(summary.skipped_records.values())


def test_balanced_sampler_is_balanced_and_resumable():
    keys = ["A/tal"] * 90 + ["B/tal"] * 10
    sampler = BalancedSampler(keys, samples_per_epoch=2000, seed=1)
    draws = list(sampler)
    share_b = sum(keys[i] == "B/tal" for i in draws) / len(draws)
    assert 0.45 < share_b < 0.55  # equal weights: equal shares despite 9x fewer records
    weighted = BalancedSampler(keys, {"B": 3.0}, samples_per_epoch=2000, seed=1)
    assert 0.7 < sum(keys[i] == "B/tal" for i in weighted) / 2000 < 0.8
    ranks = [list(BalancedSampler(keys, rank=r, world_size=2, samples_per_epoch=10, seed=1)) for r in range(2)]
    assert ranks[0] != ranks[1]
    sampler.advance(5)
    state = sampler.state_dict()
    again = BalancedSampler(keys, samples_per_epoch=2000, seed=1)
    again.load_state_dict(state)
    assert list(again) == draws[5:]


@pytest.mark.slow
def test_judge_down_and_unparseable_answers_are_counted_not_fatal(tiny_run, tiny_run_config, tmp_path):
    """Caption records with the judge unreachable: NaN rewards, counted; training and eval go on."""
    _, dataset, _ = tiny_run
    lines = Path(dataset.train).read_text().splitlines()
    caption = json.loads(lines[0])
    caption["qa_type"] = "video_summary"
    caption["conversations"][1]["value"] = "The grasper retracts the gallbladder while the hook dissects."
    caption["struc_info"] = None
    mixed = Path(dataset.train).parent / "train_with_captions.jsonl"
    mixed.write_text("\n".join(lines[:3] + [json.dumps(caption)] * 3) + "\n")
    judge = {"base_url": "http://127.0.0.1:9/v1", "model": "judge"}  # discard port: nothing listens
    run = config(
        tiny_run_config, tmp_path / "judge_down", "grpo", 2, train_file=mixed, eval_every=2, rewards={"judge": judge}
    )
    run.data.eval_file = str(mixed)
    summary = train(run)
    rows = metrics(tmp_path / "judge_down")
    assert summary.steps == 2 and rows[-1]["step"] == 2 and "eval/reward_raw" in rows[-1]
    counts = {k: v for row in rows for k, v in row.items() if k.startswith("reward_count/")}
    assert "reward_count/total" in counts
    missing = sum(row.get("reward_count/judge_missing", 0) or 0 for row in rows)
    missing_fraction = [row["reward_missing"] for row in rows if "reward_missing" in row]
    assert missing > 0 and max(missing_fraction) > 0
    assert all(row["loss"] is None or math.isfinite(row["loss"]) for row in rows if "loss" in row)


@pytest.mark.slow
def test_dali_backend_trains(tiny_run_config, tmp_path):
    """`data.loader: dali` runs the same loop with DALI decoding (its CPU operators here)."""
    pytest.importorskip("nvidia.dali")
    run = config(tiny_run_config, tmp_path / "dali", "sft", 2)
    run.data.loader = "dali"
    summary = train(run)
    rows = metrics(tmp_path / "dali")
    assert summary.steps == 2 and all(math.isfinite(r["loss"]) for r in rows)
