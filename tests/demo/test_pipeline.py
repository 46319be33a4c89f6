"""``medgrpo demo`` on a tiny setting: the three arms run from one SFT checkpoint, and every number of the
table, the curves and the findings is computed from their runs; the report's arithmetic; ``--help``."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from medgrpo.demo import report
from medgrpo.demo.heldout import HeldOutScores, KeyScore
from medgrpo.demo.pipeline import DemoSettings, SeedRun, build_parser, main
from medgrpo.ops import reference
from medgrpo.ops.normalize_rewards import normalize_rewards
from medgrpo.rewards.evaluate import evaluate_file, lazy_embed
from medgrpo.rewards.norm_stats import load_norm_stats
from medgrpo.rewards.task_rewards import RewardFunction

TINY = {
    "num_videos": 6,
    "sft_steps": 2,
    "grpo_steps": 2,
    "eval_every": 1,
    "group_size": 2,
    "prompts_per_step": 2,
    "max_new_tokens": 8,
    "norm_rollouts": 2,
}


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("demo")
    argv = ["--out-dir", str(out)] + [a for k, v in TINY.items() for a in (f"--{k.replace('_', '-')}", str(v))]
    assert main(argv) == 0  # whatever the arms found
    return out, json.loads((out / "demo_result.json").read_text())


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def recorded(entry: dict) -> SimpleNamespace:
    """A predictions-file entry as the record the reward function reads."""
    return SimpleNamespace(
        qa_type=entry["qa_type"],
        data_source=entry["data_source"],
        answer=entry["reference"],
        question=entry["question"],
        struc_info=entry["struc_info"],
    )


def test_three_arms_run_from_one_sft_checkpoint(demo):
    out, result = demo
    seed = out / "seed0"
    assert set(result["seeds"]["0"]["scores"]) == {"constant", "sft", "grpo", "medgrpo"}
    assert [r["step"] for r in rows(seed / "sft" / "metrics.jsonl")] == [1, 2]
    for arm, stats in (("grpo", ""), ("medgrpo", str(seed / "norm_stats.json"))):
        config = json.loads((seed / arm / "config.json").read_text())
        assert config["model"]["path"] == str(seed / "sft" / "final")  # both arms start from the SFT export
        assert config["grpo"]["norm_stats"] == stats  # raw rewards vs normalized ones: the only difference
        assert (config["steps"], config["seed"], config["grpo"]["scale"]) == (2, 0, "group")
        steps = [r["step"] for r in rows(seed / arm / "metrics.jsonl") if "loss" in r]
        assert steps == [1, 2]
        assert (seed / arm / "final" / "config.json").is_file()
    plain, medgrpo = (json.loads((seed / a / "config.json").read_text()) for a in ("grpo", "medgrpo"))
    for section in ("data", "optim", "rewards"):
        assert plain[section] == medgrpo[section]
    assert {k: v for k, v in plain["grpo"].items() if k != "norm_stats"} == {
        k: v for k, v in medgrpo["grpo"].items() if k != "norm_stats"
    }


def test_every_number_is_computed_from_the_runs(demo):
    out, result = demo
    seed = result["seeds"]["0"]
    stats = load_norm_stats(seed["paths"]["norm stats"])
    rewards = RewardFunction()
    for arm, scores in seed["scores"].items():
        entries = json.loads(Path(scores["predictions"]).read_text())
        records = [recorded(e) for e in entries]
        raw = rewards([e["prediction"] for e in entries], records).rewards
        rows_ = stats.indices([r.data_source for r in records], [r.qa_type for r in records], unknown="nan")
        norm = normalize_rewards(raw, rows_, stats.tensor())
        official = evaluate_file(scores["predictions"], embed=lazy_embed())["per_dataset"]  # as `medgrpo eval` does
        for key, score in scores["per_key"].items():
            members = [i for i, r in enumerate(records) if f"{r.data_source}/{r.qa_type}" == key]
            assert score["count"] == len(members)
            assert score["reward_raw"] == pytest.approx(raw[members].mean().item(), abs=1e-6)
            assert score["reward_norm"] == pytest.approx(norm[members].mean().item(), abs=1e-6)
            for metric, value in score["official"].items():
                assert value == official[key.split("/")[0]][metric]
        assert scores["reward_raw"] == pytest.approx(
            sum(s["reward_raw"] for s in scores["per_key"].values()) / len(scores["per_key"]), abs=1e-9
        )
        if arm == "constant":  # one answer per key, whatever the video
            for key in scores["per_key"]:
                assert (
                    len({e["prediction"] for e, r in zip(entries, records) if f"{r.data_source}/{r.qa_type}" == key})
                    == 1
                )
    for arm in ("grpo", "medgrpo"):
        evaluations = [r for r in rows(out / "seed0" / arm / "metrics.jsonl") if "eval/reward_raw" in r]
        for key, points in seed["curves"][arm].items():
            assert points == [[r["step"], r[f"eval/reward_raw/{key}"]] for r in evaluations]
    summary = result["summary"]
    for arm, scores in seed["scores"].items():
        for key, score in scores["per_key"].items():
            assert summary[arm][key]["reward_raw"] == [score["reward_raw"], 0.0]  # one seed: no spread


def test_outputs_and_findings(demo):
    out, result = demo
    for name in ("demo_arms.png", "demo_curves.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result["paths"]["result JSON"] == str(out / "demo_result.json")
    assert len(result["findings"]) == 5 and "paper's pattern" in result["findings"][3]
    assert "correlate at" in result["findings"][4]
    timings = result["seeds"]["0"]["timings"]
    assert {"prepare", "sft", "fit-norm", "eval sft", "grpo", "medgrpo"} <= set(timings)
    assert all(t["wall_s"] >= 0 and t["cpu_s"] >= 0 for t in timings.values())
    advantages = result["advantages"]
    assert set(advantages) == set(result["seeds"]["0"]["scores"]["sft"]["per_key"])


def scores(values: dict[str, float]) -> HeldOutScores:
    per_key = {k: KeyScore(4, v, v / 2, {"metric": v}) for k, v in values.items()}
    return HeldOutScores(per_key, sum(values.values()) / len(values), sum(values.values()) / len(values) / 2)


def seed_run(seed: int, sft: dict, grpo: dict, medgrpo: dict) -> SeedRun:
    arms = {"constant": scores(dict.fromkeys(sft, 0.1)), "sft": scores(sft), "grpo": scores(grpo)}
    arms["medgrpo"] = scores(medgrpo)
    curves = {arm: {k: [(0, 0.5), (5, 0.6 + seed)] for k in sft} for arm in ("grpo", "medgrpo")}
    advantages = {k: {"grpo_mean_abs": 0.5, "medgrpo_mean_abs": 0.7, "correlation": 0.9} for k in sft}
    return SeedRun(seed, arms, curves, advantages)


def test_seed_summary_is_mean_and_std_and_findings_follow_the_numbers():
    runs = [
        seed_run(0, {"a/x": 0.2, "b/y": 0.8}, {"a/x": 0.1, "b/y": 0.9}, {"a/x": 0.3, "b/y": 0.8}),
        seed_run(1, {"a/x": 0.4, "b/y": 0.6}, {"a/x": 0.3, "b/y": 0.7}, {"a/x": 0.5, "b/y": 0.6}),
    ]
    summary = report.summarize_seeds(runs)
    mean, std = summary["medgrpo"]["a/x"]["reward_raw"]
    assert mean == pytest.approx(0.4) and std == pytest.approx(math.sqrt(0.02))
    assert summary["sft"][report.ALL_KEYS]["reward_raw"][0] == pytest.approx(0.5)
    assert report.mean_curves(runs)["grpo"]["a/x"] == [(0, 0.5), (5, 1.1)]
    lines = report.findings(summary, seeds=2)
    assert "higher on 1 of 2 keys (a/x)" in lines[0] and "equal on 1" in lines[0]
    assert lines[-1].startswith("This run shows the paper's pattern")  # a/x is the low key: GRPO 0.2 < MedGRPO 0.4
    runs[1].scores["medgrpo"].per_key["a/x"].reward_raw = 0.0
    assert "does not show" in report.findings(report.summarize_seeds(runs), seeds=2)[-1]
    table = report.format_tables(summary, seeds=2)
    assert "0.40+-0.14" in table and "a/x" in table and report.RAW_VS_NORM in table


def test_smoothing_is_an_exponential_moving_average():
    assert report.smooth([1.0, 0.0, 0.0]) == pytest.approx([1.0, 0.6, 0.36])
    assert report.smooth([]) == []


def test_help_lists_every_option_with_its_default():
    text = build_parser().format_help()
    for name, value in vars(DemoSettings()).items():
        assert f"--{name.replace('_', '-')}" in text
        assert f"(default: {value})" in " ".join(text.split()), name


def test_advantage_weights_match_the_ops(tmp_path):
    from medgrpo.demo.advantages import advantage_weights
    from medgrpo.rewards.norm_stats import KeyStats, NormStats

    stats = NormStats(rows=(KeyStats("S", "stg", p25=0.0, p50=0.1, p75=0.3, count=8, nonfinite=0),))
    rewards = [0.0, 0.1, 0.2, 0.9, 0.0, 0.0, 0.05, 0.4]
    lines = [{"id": str(i), "data_source": "S", "qa_type": "stg", "reward": r} for i, r in enumerate(rewards)]
    path = tmp_path / "rollouts.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    weights = advantage_weights(path, stats, group_size=4, scale="group")["S/stg"]
    plain = reference.group_advantages(torch.tensor(rewards, dtype=torch.float64), group_size=4).advantages
    assert weights["grpo_mean_abs"] == pytest.approx(plain.abs().mean().item(), rel=1e-6)
    assert -1.0 <= weights["correlation"] <= 1.0 and weights["medgrpo_mean_abs"] > 0
