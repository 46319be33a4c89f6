"""``medgrpo eval`` end to end on small results files in both input formats."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from medgrpo.rewards.evaluate import build_parser, evaluate_file, format_table, main

ROOT = Path(__file__).resolve().parents[2]

OFFICIAL = {
    "0": {
        "metadata": {"fps": "1.0", "video_id": "kcOqlifSukA"},
        "qa_type": "tal",
        "data_source": "AVOS",
        "struc_info": [{"spans": [{"start": 1.0, "end": 4.0}, {"start": 6.0, "end": 9.0}]}],
        "question": "When?",
        "answer": "1.0-3.0, 5.0-9.0 seconds.",
        "gnd": "1.0-4.0, 6.0-9.0 seconds.",
        "extra_field": "ignored",
    },
    "1": {
        "metadata": {"fps": "1.0"},
        "qa_type": "stg",
        "data_source": "CoPESD",
        "struc_info": [{"bbox_dict": {"1.0": [0, 0, 10, 10], "2.0": [0, 0, 10, 10]}}],
        "question": "Where?",
        "answer": "1.0 seconds: [0, 0, 10, 10] 2.0 seconds: [0, 0, 5, 5]",
        "gnd": "",
    },
    "2": {
        "metadata": {"fps": "1.0"},
        "qa_type": "cvs_assessment",
        "data_source": "Cholec80_CVS",
        "struc_info": [],
        "question": "CVS?",
        "answer": "Two structures: 2, Cystic plate: 1, Hepatocystic triangle: 0",
        "gnd": "Two structures: 2, Cystic plate: 0, Hepatocystic triangle: 0",
    },
    "3": {
        "metadata": {"fps": "1.0"},
        "qa_type": "next_action",
        "data_source": "AVOS",
        "struc_info": [],
        "question": "Next?",
        "answer": "tying",
        "gnd": "tying",
    },
    "4": {
        "metadata": {"fps": "1.0"},
        "qa_type": "video_summary_gpt",
        "data_source": "AVOS",
        "struc_info": [],
        "question": "Summarize.",
        "answer": "The surgeon sutures.",
        "gnd": "Suturing of the wound.",
    },
    "5": {
        "metadata": {"fps": "1.0"},
        "qa_type": "dense_captioning_gemini",
        "data_source": "AVOS",
        "struc_info": [{"start": 0, "end": 10, "caption": "cut"}],
        "question": "Describe.",
        "answer": "0-10 seconds: cutting: the surgeon cuts",
        "gnd": "0-10 seconds: cut",
    },
    "6": "not an object",
    "7": {
        "metadata": {"fps": "fast"},
        "qa_type": "tal",
        "data_source": "AVOS",
        "struc_info": [],
        "question": "When?",
        "answer": "1-2 seconds.",
        "gnd": "",
    },
    "8": {"qa_type": "tal", "data_source": "AVOS", "answer": None, "gnd": ""},
}


@pytest.fixture
def results_file(tmp_path):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(OFFICIAL))
    return path


def test_official_format_without_judge(results_file, tmp_path, capsys):
    output = tmp_path / "metrics.json"
    assert main(["--predictions", str(results_file), "--output", str(output)]) == 0
    metrics = json.loads(output.read_text())
    assert metrics["tag_miou_03"] == pytest.approx((2 / 3 + 0.75) / 2)
    assert metrics["stg_miou"] == pytest.approx((1.0 + 0.25) / 2)
    assert metrics["cvs_acc"] == pytest.approx(2 / 3)
    assert metrics["nap_acc"] == 1.0 and metrics["dvc_f1"] == 1.0
    assert metrics["sa_acc"] is None  # no skill records
    assert metrics["dvc_llm"] is None and metrics["vs_llm"] is None and metrics["rc_llm"] is None
    assert metrics["per_dataset"]["AVOS"]["nap_acc"] == 1.0
    assert metrics["per_dataset"]["CoPESD"]["stg_miou"] == pytest.approx(0.625)
    assert {m["key"] for m in metrics["malformed"]} == {"6", "7", "8"}
    assert metrics["normalized"]["vs_llm"] is None
    out = capsys.readouterr().out
    assert "Overall" in out and "TAG mIoU@0.3" in out and "malformed entries: 3" in out


def test_injected_judge_and_normalized_average(results_file):
    summary = evaluate_file(results_file, judge=lambda requests: [3.0 for _ in requests])
    assert summary["vs_llm"] == 3.0 and summary["dvc_llm"] == 3.0 and summary["rc_llm"] is None
    assert summary["normalized"]["vs_llm"] == 0.5
    available = [v for v in summary["normalized"].values() if v is not None]
    assert summary["average"] == pytest.approx(sum(available) / len(available))
    assert summary["notes"]["vs_judge_requests"] == 1


def test_list_format(tmp_path):
    entries = [
        {
            "id": "a",
            "qa_type": "skill_assessment",
            "data_source": "JIGSAWS",
            "prediction": "Respect for tissue: 2/5, Time and motion: 4/5",
            "reference": "Respect for tissue: 2/5, Time and motion: 3/5",
        },
        {
            "qa_type": "tal",
            "data_source": "AVOS",
            "prediction": "0.0-5.0 seconds.",
            "fps": 2,
            "struc_info": [{"spans": [{"start": 0.0, "end": 10.0}]}],
        },
        7,
    ]
    path = tmp_path / "ours.json"
    path.write_text(json.dumps(entries))
    summary = evaluate_file(path)
    assert summary["sa_acc"] == pytest.approx(0.5)
    assert summary["tag_miou_03"] == 0.5 and summary["tag_miou_05"] == 0.5
    assert summary["malformed"] == [{"key": "2", "reason": "entry is not an object"}]


def test_empty_and_unreadable_files(tmp_path, capsys):
    empty = tmp_path / "empty.json"
    empty.write_text("{}")
    summary = evaluate_file(empty)
    assert all(summary[k] is None for k in ("cvs_acc", "tag_miou_03", "rc_llm")) and summary["average"] is None
    assert "Overall" in format_table(summary)
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    assert main(["--predictions", str(broken), "--output", str(tmp_path / "m.json")]) == 2
    assert "cannot read" in capsys.readouterr().err
    assert not (tmp_path / "m.json").exists()


def test_comparison_plot(results_file, tmp_path):
    first = tmp_path / "first.json"
    assert main(["--predictions", str(results_file), "--output", str(first)]) == 0
    plot = tmp_path / "runs.png"
    args = [
        "--predictions",
        str(results_file),
        "--output",
        str(tmp_path / "second.json"),
        "--plot",
        str(plot),
        "--compare",
        str(first),
        "--label",
        "second",
    ]
    assert main(args) == 0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_registers_on_a_top_level_cli(results_file, tmp_path):
    top = argparse.ArgumentParser(prog="medgrpo")
    build_parser(top.add_subparsers(dest="command"))
    args = top.parse_args(["eval", "--predictions", str(results_file), "--output", str(tmp_path / "m.json")])
    assert args.command == "eval" and args.func(args) == 0
    assert json.loads((tmp_path / "m.json").read_text())["cvs_acc"] == pytest.approx(2 / 3)


def test_python_dash_m(results_file, tmp_path):
    output = tmp_path / "metrics.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [
        sys.executable,
        "-m",
        "medgrpo.rewards.evaluate",
        "--predictions",
        str(results_file),
        "--output",
        str(output),
    ]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(output.read_text())["nap_acc"] == 1.0
