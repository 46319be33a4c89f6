"""medgrpo fit-norm: quartiles per (data_source, qa_type) equal to numpy/torch, problem reports, the loader."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import medgrpo
from medgrpo.ops import reference
from medgrpo.rewards.norm_stats import (
    build_parser,
    load_norm_stats,
    main,
)

ROOT = Path(__file__).resolve().parents[2]


def write_jsonl(path: Path, lines: list) -> Path:
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def rollouts(seed: int = 0) -> tuple[list[dict], dict[tuple[str, str], list[float]]]:
    """Rollouts of 3 keys with different scales (and variant qa types), and their finite rewards by key."""
    rng = np.random.default_rng(seed)
    spec = {
        ("CholecT50", "tal"): (0.4, 0.2, 97),
        ("NurViD", "dense_captioning"): (0.7, 0.05, 50),
        ("AVOS", "stg"): (0.1, 0.3, 5),
    }
    rows, by_key = [], {}
    for (source, qa_type), (mu, sigma, n) in spec.items():
        values = rng.normal(mu, sigma, n)
        by_key[(source, qa_type)] = values.tolist()
        for i, v in enumerate(values):
            variant = qa_type + ("_gpt" if qa_type == "dense_captioning" and i % 2 else "")
            rows.append({"id": f"{source}-{i}", "data_source": source, "qa_type": variant, "reward": float(v)})
    return rows, by_key


def test_quartiles_equal_numpy_and_torch(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rows, by_key = rollouts()
    path = write_jsonl(tmp_path / "rollouts.jsonl", rows)
    assert main([str(path), "--output", str(tmp_path / "stats.json"), "--min-samples", "10"]) == 0
    stats = load_norm_stats(tmp_path / "stats.json")
    assert stats.keys == sorted(by_key)
    for row in stats.rows:
        values = by_key[(row.data_source, row.qa_type)]
        expected = np.percentile(np.asarray(values), [25, 50, 75])  # numpy's default: linear
        assert [row.p25, row.p50, row.p75] == pytest.approx(expected.tolist(), rel=0, abs=1e-12)
        q = torch.quantile(
            torch.tensor(values, dtype=torch.float64), torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)
        )
        assert [row.p25, row.p50, row.p75] == q.tolist()
        assert row.count == len(values) and row.nonfinite == 0
    report = capsys.readouterr().out
    assert "too few samples: AVOS/stg has 5" in report
    assert stats.metadata["low_sample_keys"] == [["AVOS", "stg"]]


def test_malformed_lines_and_nonfinite_rewards_are_reported(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    good = [
        {"id": i, "data_source": "JIGSAWS", "qa_type": "skill_assessment", "reward": r}
        for i, r in enumerate([0.0, 0.25, 0.5, 1.0])
    ]
    lines = [
        good[0],
        "{not json",  # line 2
        good[1],
        "",  # blank: skipped, not malformed
        ["a", "list"],  # line 5
        {"data_source": "JIGSAWS", "qa_type": "skill_assessment"},  # line 6: no reward
        {"data_source": "JIGSAWS", "qa_type": "skill_assessment", "reward": "0.5"},  # line 7
        {"data_source": "", "qa_type": "tal", "reward": 0.1},  # line 8
        {"data_source": "JIGSAWS", "qa_type": "skill_assessment", "reward": None},
        '{"data_source": "JIGSAWS", "qa_type": "skill_assessment", "reward": NaN}',
        {"data_source": "JIGSAWS", "qa_type": "skill_assessment", "reward": True},  # line 11
        good[2],
        {"data_source": "EgoSurgery", "qa_type": "tal", "reward": None},  # a key with no finite reward
        good[3],
    ]
    path = write_jsonl(tmp_path / "r.jsonl", lines)
    out = tmp_path / "stats.json"
    assert main([str(path), "-o", str(out), "--min-samples", "4"]) == 0
    assert main([str(path), "-o", str(out), "--min-samples", "4", "--strict"]) == 1
    report = capsys.readouterr().out
    for number in (2, 5, 6, 7, 8, 11):
        assert f"malformed {path}:{number}:" in report
    assert f"malformed {path}:3:" not in report and f"malformed {path}:4:" not in report
    assert "6 malformed lines" in report and "3 null/NaN/inf rewards left out" in report
    assert "no finite reward: EgoSurgery/tal" in report
    stats = load_norm_stats(out)
    assert stats.keys == [("JIGSAWS", "skill_assessment")]
    (row,) = stats.rows
    assert (row.p25, row.p50, row.p75, row.count, row.nonfinite) == (0.1875, 0.375, 0.625, 4, 2)
    meta = stats.metadata
    assert (meta["malformed_lines"], meta["nonfinite_rewards"], meta["rollouts"]) == (6, 3, 13)
    assert meta["keys_without_rewards"] == [["EgoSurgery", "tal"]] and meta["low_sample_keys"] == []


def test_no_rewards_writes_nothing(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "r.jsonl", [{"data_source": "A", "qa_type": "tal", "reward": None}])
    assert main([str(path), "-o", str(tmp_path / "s.json")]) == 2
    assert not (tmp_path / "s.json").exists()
    assert main([str(tmp_path / "absent.jsonl"), "-o", str(tmp_path / "s.json")]) == 2


def test_loaded_stats_drive_group_advantages(tmp_path: Path) -> None:
    rows, _ = rollouts(seed=1)
    path = write_jsonl(tmp_path / "rollouts.jsonl", rows)
    assert main([str(path), "-o", str(tmp_path / "stats.json")]) == 0
    stats = load_norm_stats(tmp_path / "stats.json")
    table = stats.tensor()
    assert table.shape == (3, 3) and table.dtype == torch.float32
    assert stats.index("NurViD", "dense_captioning_gemini") == stats.keys.index(("NurViD", "dense_captioning"))

    gen = torch.Generator().manual_seed(0)
    sources = ["CholecT50"] * 8 + ["NurViD"] * 8 + ["AVOS"] * 8
    qa_types = ["tal"] * 8 + ["dense_captioning_gpt"] * 8 + ["stg"] * 8
    keys = stats.indices(sources, qa_types)
    rewards = torch.rand(24, generator=gen)
    adv = medgrpo.group_advantages(rewards, group_size=8, keys=keys, stats=table)
    rows = torch.stack([table[stats.index(s, q)] for s, q in zip(sources, qa_types)])  # (24, 3) by hand
    normalized = torch.sigmoid(3.0 * (rewards - rows[:, 1]) / (rows[:, 2] - rows[:, 0])).view(3, 8)
    expected = (normalized - normalized.mean(1, keepdim=True)) / (normalized.std(1, keepdim=True) + 1e-4)
    torch.testing.assert_close(adv, expected.flatten())
    # every key's median maps to 0.5
    medians = reference.normalize_rewards(table[:, 1], torch.arange(3), table)
    torch.testing.assert_close(medians, torch.full((3,), 0.5))


def test_unknown_keys(tmp_path: Path) -> None:
    rows, _ = rollouts()
    path = write_jsonl(tmp_path / "rollouts.jsonl", rows)
    main([str(path), "-o", str(tmp_path / "stats.json")])
    stats = load_norm_stats(tmp_path / "stats.json")
    with pytest.raises(KeyError, match="no normalization statistics for \\('CoPESD', 'tal'\\); known keys: AVOS/stg"):
        stats.index("CoPESD", "tal")
    with pytest.raises(KeyError):
        stats.indices(["AVOS", "CoPESD"], ["stg", "tal"])
    keys = stats.indices(["AVOS", "CoPESD"], ["stg", "tal"], unknown="nan")
    assert keys.tolist() == [stats.index("AVOS", "stg"), -1]
    normalized = reference.normalize_rewards(torch.tensor([0.3, 0.3]), keys, stats.tensor())
    assert not math.isnan(normalized[0]) and math.isnan(normalized[1])


def test_loader_rejects_other_files(tmp_path: Path) -> None:
    (tmp_path / "x.json").write_text(json.dumps({"keys": []}))
    with pytest.raises(ValueError, match="not a medgrpo-norm-stats file"):
        load_norm_stats(tmp_path / "x.json")


def test_build_parser_registers_as_a_subcommand() -> None:
    import argparse

    top = argparse.ArgumentParser(prog="medgrpo")
    sub = top.add_subparsers(dest="command")
    build_parser(sub.add_parser("fit-norm"))
    args = top.parse_args(["fit-norm", "a.jsonl", "b.jsonl", "-o", "s.json", "--min-samples", "8"])
    assert (args.rollouts, args.output, args.min_samples, args.strict) == (["a.jsonl", "b.jsonl"], "s.json", 8, False)


def test_python_dash_m_entry_point(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "r.jsonl", [{"data_source": "A", "qa_type": "tal", "reward": r} for r in (1, 2, 3)])
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "medgrpo.rewards.norm_stats",
            str(path),
            "-o",
            str(tmp_path / "s.json"),
            "--min-samples",
            "2",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert "wrote" in result.stdout
    assert load_norm_stats(tmp_path / "s.json").tensor().tolist() == [[1.5, 2.0, 2.5]]
