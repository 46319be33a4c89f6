"""Every bad input of ``medgrpo train`` in one place, with what the user sees.

A user mistake (a config or its files) is one line per problem on stderr, every problem at once,
exit status 2, found before the model is loaded and before anything is written to the output
directory. Bad records never end a run: they are counted by kind and the run trains on the rest.
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from medgrpo.cli import main
from medgrpo.testing.corrupt import flip_middle_bytes, write_undecodable_frames

ROOT = Path(__file__).resolve().parents[2]


class ModelLoaded(AssertionError):
    """Raised if a refused run got as far as loading the model."""


@pytest.fixture
def no_model_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise ModelLoaded("the model was loaded for a run that should have been refused")

    monkeypatch.setattr("medgrpo.train.loop.build_model", refuse)


@pytest.fixture
def run_dir(tiny_run_config, tmp_path):
    """``(write, out)``: ``write(**changes)`` writes the config of a GRPO run on the tiny model (``tiny_run_config``,
    changed by the dotted ``changes``, e.g. ``{"grpo.rollout.group_size": 1}``) and returns its path; ``out``: its
    output_dir."""
    out = tmp_path / "run"

    def write(**changes) -> Path:
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(tiny_run_config(out, **changes)))
        return path

    return write, out


def refused(capsys, argv: list[str]) -> list[str]:
    """Run ``medgrpo train`` in this process; assert exit status 2 and no traceback; the lines printed."""
    status = main(["train", *argv])
    captured = capsys.readouterr()
    assert status == 2, captured.err
    assert "Traceback" not in captured.err + captured.out
    lines = [line for line in captured.err.splitlines() if line.startswith("medgrpo train: ")]
    assert lines, captured.err
    return [line.removeprefix("medgrpo train: ") for line in lines]


def empty_file(tmp_path: Path) -> str:
    (tmp_path / "empty.jsonl").write_text("\n\n")
    return str(tmp_path / "empty.jsonl")


def bad_stats(tmp_path: Path) -> str:
    (tmp_path / "stats.json").write_text('{"format": "medgrpo-norm-stats", "version": 1, "keys": [{"p25": ')
    return str(tmp_path / "stats.json")


def blocked_output(tmp_path: Path) -> str:
    (tmp_path / "a_file").write_text("in the way")
    return str(tmp_path / "a_file" / "run")


# (name, config changes (values may be functions of tmp_path), overrides, the problem lines expected)
CASES = [
    ("model path missing", {"model.path": "no/such/model"}, [], ["model.path: no such directory: no/such/model"]),
    ("train file unset", {"data.train_file": ""}, [], ["data.train_file is not set"]),
    ("train file missing", {"data.train_file": "no/such.jsonl"}, [], ["data.train_file: no such file: no/such.jsonl"]),
    ("records file empty", {"data.train_file": empty_file}, [], ["holds no records (the file is empty)"]),
    ("norm stats missing", {"grpo.norm_stats": "no/stats.json"}, [], ["grpo.norm_stats: no such file: no/stats.json"]),
    ("norm stats invalid", {"grpo.norm_stats": bad_stats}, [], ["is not a statistics file of medgrpo fit-norm"]),
    ("group size 0", {"grpo.rollout.group_size": 0}, [], ["grpo.rollout: group_size must be >= 1, got 0"]),
    ("group size 1", {"grpo.rollout.group_size": 1}, [], ["grpo.rollout.group_size is 1: a group-relative advantage"]),
    ("micro batch 0", {"grpo.micro_batch_size": 0}, [], ["grpo.micro_batch_size must be >= 1, got 0"]),
    ("sft micro batch 0", {"mode": "sft", "sft.micro_batch_size": 0}, [], ["sft.micro_batch_size must be >= 1"]),
    ("steps negative", {}, ["steps=-1"], ["steps must be >= 0, got -1"]),
    ("lr nan", {}, ["optim.lr=nan"], ["optim.lr must be a finite number >= 0, got nan"]),
    ("lr inf", {"optim.lr": float("inf")}, [], ["optim.lr must be a finite number >= 0, got inf"]),
    ("output blocked", {"output_dir": blocked_output}, [], ["output_dir: cannot create", "a_file is a file"]),
    ("max length too small", {"data.max_length": 8}, [], ["data.max_length 8 leaves no room for a prompt"]),
    ("unknown field", {"grpo.rollout.grop_size": 4}, [], ["grpo.rollout: unknown field(s) ['grop_size']"]),
    ("bad override", {}, ["grpo.group_size"], ["override 'grpo.group_size' is not of the form section.field=value"]),
]


@pytest.mark.parametrize("name,changes,overrides,expected", CASES, ids=[case[0] for case in CASES])
def test_a_user_mistake_is_one_line_and_status_2(
    run_dir, tmp_path, capsys, no_model_load, name, changes, overrides, expected
):
    write, out = run_dir
    changes = {k: v(tmp_path) if callable(v) else v for k, v in changes.items()}
    lines = refused(capsys, ["--config", str(write(**changes)), *overrides])
    assert len(lines) == 1, lines
    assert all(part in lines[0] for part in expected), lines
    assert not out.exists()  # nothing written to the output directory


def test_every_problem_is_listed_at_once(run_dir, capsys, no_model_load):
    write, out = run_dir
    config = write(**{"model.path": "no/model", "data.train_file": "no/train.jsonl", "grpo.rollout.group_size": 1})
    lines = refused(capsys, ["--config", str(config), "steps=-3", "optim.lr=.nan", "sft.micro_batch_size=0"])
    assert [line.split(":")[0].split(" ")[0] for line in lines] == [
        "model.path",
        "data.train_file",
        "steps",
        "optim.lr",
        "grpo.rollout.group_size",
    ]  # sft.micro_batch_size is not used by a GRPO run
    assert not out.exists()


def test_type_errors_in_several_sections_are_listed_at_once(run_dir, capsys):
    write, _ = run_dir
    lines = refused(capsys, ["--config", str(write()), "steps=many", "grpo.k=steep", "model.compile=maybe"])
    assert sorted(lines) == [
        "grpo.k: expected float, got 'steep'",
        "model.compile: expected bool, got 'maybe'",
        "steps: expected int, got 'many'",
    ]


def test_malformed_yaml_names_the_line(tmp_path, capsys):
    path = tmp_path / "broken.yaml"
    path.write_text("mode: grpo\ngrpo:\n  rollout: {group_size: 8\n")
    (line,) = refused(capsys, ["--config", str(path)])
    assert line.startswith(f"--config {path}: malformed YAML: line ")


def test_missing_config_file(tmp_path, capsys):
    (line,) = refused(capsys, ["--config", str(tmp_path / "nope.yaml")])
    assert line == f"--config {tmp_path / 'nope.yaml'}: No such file or directory"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_output_directory_not_writable(run_dir, tmp_path, capsys, no_model_load):
    write, _ = run_dir
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    (line,) = refused(capsys, ["--config", str(write(output_dir=str(locked / "run")))])
    assert line == f"output_dir: cannot create {locked / 'run'}: {locked} is not writable"


def test_dali_loader_without_dali_says_how_to_install_or_switch(run_dir, capsys, monkeypatch, no_model_load):
    monkeypatch.setattr("medgrpo.train.validate._dali_installed", lambda: False)
    shipped = yaml.safe_load((ROOT / "configs" / "medgrpo_qwen2_5_vl_7b.yaml").read_text())
    assert shipped["data"]["loader"] == "dali"  # what the 7B configs set
    write, out = run_dir
    (line,) = refused(capsys, ["--config", str(write(**{"data.loader": "dali"}))])
    assert "NVIDIA DALI is not installed: pip install nvidia-dali-cuda120" in line and "data.loader=cpu" in line
    assert not out.exists()


def test_no_usable_record_stops_before_anything_is_written(run_dir, tmp_path, capsys, no_model_load):
    path = tmp_path / "bad.jsonl"
    path.write_text('{not json\n{"video": []}\n')
    write, out = run_dir
    (line,) = refused(capsys, ["--config", str(write(**{"data.train_file": str(path)}))])
    usable = "none of its 2 records is usable (skipped by kind: bad_record: 2; each is logged with its id)"
    assert line == f"data.train_file {path}: {usable}"
    assert not out.exists()


@pytest.mark.parametrize(
    "name,text,expected",
    [
        ("records.json", '[{"video": "a.mp4"}, {"vid', "cannot read its records: Unterminated string"),
        ("records.json", "[]", "holds no records"),
        ("records.json", '{"video": "a.mp4"}', "cannot read its records: "),
        ("records.jsonl", "\xff\xfe not text", "none of its 1 records is usable (skipped by kind: bad_record: 1"),
    ],
    ids=["truncated JSON list", "empty JSON list", "one object in a .json file", "not UTF-8"],
)
def test_a_records_file_that_is_not_records_is_one_line(run_dir, tmp_path, capsys, no_model_load, name, text, expected):
    path = tmp_path / name
    path.write_bytes(text.encode("latin-1"))
    write, out = run_dir
    (line,) = refused(capsys, ["--config", str(write(**{"data.train_file": str(path)}))])
    assert line.startswith(f"data.train_file {path}: ") and expected in line, line
    assert not out.exists()


def test_group_size_1_gives_zero_advantages_with_every_scale():
    """Why grpo.rollout.group_size=1 is refused: r - mean(group) is 0 for a group of one, whatever the scale."""
    import torch

    from medgrpo.ops.reference import group_advantages

    rewards = torch.tensor([0.1, 0.9, 0.4, 0.7])
    for scale in ("group", "batch", "none"):
        assert torch.equal(group_advantages(rewards, group_size=1, scale=scale).advantages, torch.zeros(4))


@pytest.mark.slow
def test_refusal_from_the_command_line_has_no_traceback(run_dir):
    write, out = run_dir
    config = write(**{"model.path": "no/such/model"})
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "medgrpo", "train", "--config", str(config)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "medgrpo train: model.path: no such directory: no/such/model (models load from local directories only)"
    ]
    assert not out.exists()


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_one_malformed_line_does_not_kill_a_grpo_run(run_dir, tiny_run, tmp_path, capsys, caplog):
    """The issue's repro: one prompt per step and a line that is not JSON (on main: 'the batch has no prompts')."""
    _, dataset, _ = tiny_run
    path = Path(dataset.train).parent / "train_one_bad_line.jsonl"  # frame paths are relative to its folder
    path.write_text(Path(dataset.train).read_text() + "{not json\n")
    write, out = run_dir
    status = main(["train", "--config", str(write(**{"data.train_file": str(path), "steps": 4}))])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    assert "records skipped by kind: {'bad_record': 1}" in captured.out
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(r["skipped_records"] == 1 and r["skipped_records/bad_record"] == 1 for r in rows)
    assert sum("skipped record" in r.message and "bad_record" in r.message for r in caplog.records) == 1


@pytest.mark.slow
def test_bad_records_of_every_kind_are_counted_and_sft_trains_on_the_rest(run_dir, tiny_run, tmp_path, capsys):
    """A 100,000-character answer and a 10,000-frame list are skipped before any decode (on main the answer
    stalled SFT for minutes); corrupt frames are found by decoding, once; the run trains on the good records."""
    _, dataset, _ = tiny_run
    good = [json.loads(line) for line in Path(dataset.train).read_text().splitlines()]
    long_answer = {**good[0], "conversations": [good[0]["conversations"][0], {"from": "gpt", "value": "x " * 50_000}]}
    many_frames = {**good[1], "video": [f"frames/none/{i:06d}.jpg" for i in range(10_000)]}
    missing = {**good[2], "video": ["frames/none/000000.jpg", "frames/none/000001.jpg"]}
    corrupt = {**good[3], "video": write_undecodable_frames(Path(dataset.train).parent, "frames/corrupt")}
    path = Path(dataset.train).parent / "train_bad_kinds.jsonl"
    lines = [*map(json.dumps, good), "{not json", *map(json.dumps, [long_answer, many_frames, missing, corrupt])]
    path.write_text("\n".join(lines) + "\n")
    changes = {"mode": "sft", "data.train_file": str(path), "steps": 6, "sft": {"batch_size": 4, "micro_batch_size": 4}}
    status = main(["train", "--config", str(write_sft(run_dir, changes))])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    _, out = run_dir
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6] and all(math.isfinite(r["loss"]) for r in rows)
    counts = {k.split("/", 1)[1]: v for k, v in rows[-1].items() if k.startswith("skipped_records/")}
    assert {k: counts[k] for k in ("bad_record", "too_long", "too_many_frames")} == dict.fromkeys(
        ("bad_record", "too_long", "too_many_frames"), 1
    )
    assert counts["unreadable_video"] in (1, 2)  # the missing frames always; the corrupt ones once drawn
    assert rows[-1]["skipped_records"] == sum(counts.values())


def write_sft(run_dir, changes: dict) -> Path:
    write, _ = run_dir
    sft = changes.pop("sft")
    return write(**changes, **{f"sft.{k}": v for k, v in sft.items()})


def corrupt_largest_shard(checkpoint: Path) -> str:
    """Flip 4 KiB in the middle of the checkpoint's largest DCP shard (same size); its file name."""
    shard = max(checkpoint.glob("*.distcp"), key=lambda p: p.stat().st_size)
    flip_middle_bytes(shard)
    return shard.name


@pytest.mark.slow
def test_resume_passes_over_a_corrupted_checkpoint_and_stops_when_none_verifies(run_dir, capsys, caplog):
    """The issue's repro: 4 KiB flipped in a shard of the newest checkpoint (on main: resumed with weights of
    7.6e27). The run names the file, resumes from the newest checkpoint that verifies, and with none left says so."""
    caplog.set_level(logging.INFO, logger="medgrpo.train.state")
    changes = {"mode": "sft", "steps": 2, "save_every": 1, "sft": {"batch_size": 2, "micro_batch_size": 2}}
    assert main(["train", "--config", str(write_sft(run_dir, dict(changes)))]) == 0
    _, out = run_dir
    checkpoints = out / "checkpoints"
    bad = corrupt_largest_shard(checkpoints / "step_000002")
    status = main(["train", "--config", str(write_sft(run_dir, {**changes, "steps": 3, "resume": True}))])
    assert status == 0, capsys.readouterr().err
    assert any(f"step_000002/{bad}: SHA-256 differs" in r.getMessage() for r in caplog.records)
    assert any("resumed from" in r.getMessage() and "step_000001" in r.getMessage() for r in caplog.records)
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in rows)
    capsys.readouterr()
    for checkpoint in checkpoints.glob("step_*"):
        corrupt_largest_shard(checkpoint)
    status = main(["train", "--config", str(write_sft(run_dir, {**changes, "steps": 4, "resume": True}))])
    said = [line for line in capsys.readouterr().err.splitlines() if line.startswith("medgrpo train:")]
    assert status == 2 and len(said) == 1 and "no checkpoint under" in said[0] and "verifies" in said[0], said
