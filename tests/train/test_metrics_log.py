"""The run's reports: one metrics row and one TensorBoard point per step, also across a resume; the counters of
the whole run; the reward curves of the whole run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from medgrpo.testing.corrupt import write_undecodable_frames
from medgrpo.train import loop
from medgrpo.train.config import config_from_dict
from medgrpo.train.loop import train
from medgrpo.train.metrics import MetricsLog, read_metrics, truncate_metrics


def test_truncate_keeps_the_rows_up_to_the_step_and_drops_torn_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "loss": 0.1 * s} for s in (1, 2, 2, 3, 4)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 5, "lo')
    truncate_metrics(path, 2)
    assert read_metrics(path) == rows[:3]
    assert not (tmp_path / "metrics.jsonl.tmp").exists()
    truncate_metrics(tmp_path / "absent.jsonl", 3)  # nothing to keep: nothing written
    assert not (tmp_path / "absent.jsonl").exists()


def test_a_log_that_starts_at_a_step_replaces_the_later_rows(tmp_path):
    first = MetricsLog(tmp_path, 4, True, 0)
    for step in (1, 2, 3):
        first.log(step, {"loss": torch.tensor(float(step))})
    first.close()
    again = MetricsLog(tmp_path, 4, True, 2)
    for step in (3, 4):
        again.log(step, {"loss": torch.tensor(10.0 * step)})
    again.close()
    assert [(r["step"], r["loss"]) for r in read_metrics(first.path)] == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]
    assert scalars(tmp_path / "tensorboard", "loss") == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]


def scalars(directory: Path, tag: str) -> list[tuple[int, float]]:
    """The (step, value) points TensorBoard shows for ``tag`` (purged steps dropped, as it drops them)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(directory), purge_orphaned_data=True)
    events.Reload()
    return [(e.step, round(e.value, 6)) for e in events.Scalars(tag)]


def corrupt_record(dataset) -> dict:
    """A record of the dataset whose frames exist but do not decode (found only when drawn)."""
    first = json.loads(Path(dataset.train).read_text().splitlines()[0])
    return {**first, "video": write_undecodable_frames(Path(dataset.train).parent, "frames/corrupt_for_resume")}


def grpo_config(tiny_run_config, train_file: Path, out: Path, steps: int, **extra):
    sizes = {"grpo.prompts_per_step": 2, "grpo.micro_batch_size": 8}
    changes = {"seed": 4, "steps": steps, "save_every": 2, "data.train_file": str(train_file), **sizes, **extra}
    return config_from_dict(tiny_run_config(out, **changes))


@pytest.mark.slow
def test_reports_after_a_resume_are_those_of_an_uninterrupted_run(tiny_run, tiny_run_config, tmp_path, monkeypatch):
    _, dataset, _ = tiny_run
    train_file = Path(dataset.train).parent / "train_resume_reports.jsonl"  # paths are relative to its folder
    bad = ["{not json", json.dumps(corrupt_record(dataset))]
    train_file.write_text("\n".join(Path(dataset.train).read_text().splitlines() + bad * 2) + "\n")
    plotted, plot = {}, loop.plot_reward_curves

    def capture(rows, path):
        plotted[path] = rows
        return plot(rows, path)

    monkeypatch.setattr(loop, "plot_reward_curves", capture)

    straight = tmp_path / "straight"
    train(grpo_config(tiny_run_config, train_file, straight, 5))
    resumed = tmp_path / "resumed"
    train(grpo_config(tiny_run_config, train_file, resumed, 3))  # checkpoints at steps 2 and 3, rows 1-3
    shutil.rmtree(resumed / "checkpoints" / "step_000003")  # as if killed after step 3's row, before its save
    summary = train(grpo_config(tiny_run_config, train_file, resumed, 5, resume=True))

    keys = ("step", "loss", "grad_norm", "reward_raw", "skipped_steps", "skipped_records")
    expected = [{k: r.get(k) for k in keys} for r in read_metrics(straight / "metrics.jsonl")]
    got = [{k: r.get(k) for k in keys} for r in read_metrics(resumed / "metrics.jsonl")]
    assert got == expected and [r["step"] for r in got] == [1, 2, 3, 4, 5]
    assert got[-1]["skipped_records"] >= 2  # the two lines that are not JSON, counted before the first draw
    assert summary.skipped_records == {
        k.split("/", 1)[1]: v
        for k, v in read_metrics(straight / "metrics.jsonl")[-1].items()
        if "skipped_records/" in k
    }
    assert [s for s, _ in scalars(resumed / "tensorboard", "loss")] == [1, 2, 3, 4, 5]
    assert [r["step"] for r in plotted[resumed / "reward_curves.png"]] == [1, 2, 3, 4, 5]
    saved = torch.load(resumed / "checkpoints" / "step_000004" / "trainer_state.pt", weights_only=True)
    assert saved["extra_state"]["ranks"][0]["sampler"]["skipped"]["bad_record"] == 2
