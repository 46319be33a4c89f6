"""``medgrpo eval`` on bad input: every case in one place, with what the user sees.

Each case asserts the exit status, the one line that says what happened, what was counted
(malformed entries with their id and reason), and what is on disk afterwards: the metrics
file as strict JSON (no bare NaN/Infinity), or an earlier file left untouched. Exit status:
0 metrics written, 1 nothing evaluated, 2 a file could not be read or written.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from medgrpo.rewards.evaluate import main, metrics_judge
from medgrpo.testing.judge_server import JudgeServer

ROOT = Path(__file__).resolve().parents[2]
EARLIER = '{"earlier": "metrics"}\n'
BOX = [0, 0, 10, 10]


def stg(key: str, box: Any) -> dict:
    return {"id": key, "qa_type": "stg", "data_source": "AVOS", "prediction": "1.0 seconds: [0, 0, 10, 10]",
            "struc_info": [{"bbox_dict": {"1.0": box}}]}  # fmt: skip


def tal(key: str, start: Any = 1.0, end: Any = 3.0, **extra: Any) -> dict:
    return {"id": key, "qa_type": "tal", "data_source": "AVOS", "prediction": "1.0-3.0 seconds.",
            "struc_info": [{"spans": [{"start": start, "end": end}]}], **extra}  # fmt: skip


def cvs(key: str, score: Any) -> dict:
    struc = [{"cvs_scores": {"two_structures": score, "cystic_plate": 1, "hepatocystic_triangle": 0}}]
    return {"id": key, "qa_type": "cvs_assessment", "data_source": "Cholec80-CVS", "struc_info": struc,
            "prediction": "Two structures: 2, Cystic plate: 1, Hepatocystic triangle: 0"}  # fmt: skip


def strict_load(path: Path) -> dict:
    """The output JSON, failing on any NaN/Infinity token."""

    def refuse(token: str) -> None:
        raise AssertionError(f"{path} holds a bare {token}")

    return json.loads(path.read_text(), parse_constant=refuse)


NAN, INF = float("nan"), float("inf")
NOT_FINITE_BOX = "ground-truth box at time '1.0' {} is not finite"
# name: (the bad entry, beside good tal and stg records; the reason it is listed with)
MALFORMED = {
    "NaN stg box": (stg("bad", [NAN, 0, 10, 10]), NOT_FINITE_BOX.format("[nan, 0, 10, 10]")),
    "infinite stg box": (stg("bad", [0, 0, INF, 10]), NOT_FINITE_BOX.format("[0, 0, inf, 10]")),
    "NaN tal span (a perfect 1.0 before)": (tal("bad", start=NAN), "ground-truth span [nan, 3.0] is not finite"),
    "infinite tal span": (tal("bad", end=INF), "ground-truth span [1.0, inf] is not finite"),
    "fps 0 (scored 0 before)": (tal("bad", fps=0), "fps 0 is not a positive finite number"),
    "fps NaN": (tal("bad", fps=NAN), "fps nan is not a positive finite number"),
    "fps NaN as a string": (tal("bad", fps="nan"), "fps 'nan' is not a positive finite number"),
    "negative fps": (tal("bad", fps=-2), "fps -2 is not a positive finite number"),
    "NaN cvs score": (cvs("bad", NAN), "ground-truth scores [nan, 1, 0] is not finite"),
}


@pytest.mark.parametrize("name", MALFORMED)
def test_non_finite_ground_truth_is_malformed(name: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    entry, reason = MALFORMED[name]
    extra = [cvs("good-cvs", 2)] if entry["qa_type"] == "cvs_assessment" else []
    path = tmp_path / "predictions.json"
    path.write_text(json.dumps([tal("good-tal"), stg("good-stg", BOX), *extra, entry]))  # NaN tokens on purpose
    output = tmp_path / "metrics.json"
    assert main(["--predictions", str(path), "--output", str(output), "--no-embedder"]) == 0
    metrics = strict_load(output)
    assert metrics["malformed"] == [{"key": "bad", "reason": reason}]
    assert metrics["tag_miou_03"] == 1.0 and metrics["stg_miou"] == 1.0  # the good records alone
    assert sum(c["malformed"] for c in metrics["counts"].values()) == 1
    out = capsys.readouterr().out
    assert f"malformed entries: 1\n  bad: {reason}" in out


@pytest.mark.parametrize("content", ["[]", "{}"])
def test_nothing_to_evaluate(content: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "predictions.json"
    path.write_text(content)
    output = tmp_path / "metrics.json"
    assert main(["--predictions", str(path), "--output", str(output), "--no-embedder"]) == 1
    (line,) = capsys.readouterr().err.splitlines()
    assert line == f"medgrpo eval: nothing evaluated: {path} holds no entries"
    metrics = strict_load(output)
    assert metrics["average"] is None and metrics["counts"] == {} and metrics["malformed"] == []


def test_every_entry_malformed(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "predictions.json"
    path.write_text(json.dumps([7, {"qa_type": 3}, tal("nan-fps", fps=float("nan"))]))
    output = tmp_path / "metrics.json"
    assert main(["--predictions", str(path), "--output", str(output), "--no-embedder"]) == 1
    (line,) = capsys.readouterr().err.splitlines()
    assert line == (
        f"medgrpo eval: nothing evaluated: none of the 3 entries of {path} could be scored "
        "(3 malformed, 0 skipped; see the report)"
    )
    assert [m["key"] for m in strict_load(output)["malformed"]] == ["0", "1", "nan-fps"]


def test_integer_past_the_digit_limit_is_one_malformed_record(tmp_path: Path) -> None:
    path = tmp_path / "predictions.json"
    good = json.dumps(tal("good"))
    bad = json.dumps(tal("huge")).replace('"end": 3.0', '"end": ' + "9" * 5000)
    path.write_text(f"[{good}, {bad}]")
    output = tmp_path / "metrics.json"
    assert main(["--predictions", str(path), "--output", str(output), "--no-embedder"]) == 0
    (malformed,) = strict_load(output)["malformed"]
    assert malformed["key"] == "huge" and malformed["reason"] == "ground-truth span [1.0, inf] is not finite"


UNREADABLE = {
    "not JSON": (b"{not json", "Expecting property name enclosed in double quotes"),
    "not UTF-8": (b'[{"qa_type": "tal", "prediction": "\xff"}]', "'utf-8' codec can't decode byte 0xff"),
    "nested too deep": (b"[" * 100_000, "maximum recursion depth exceeded"),
    "a number": (b"42", "expected a JSON object keyed by index or a list of records"),
}


@pytest.mark.parametrize("name", UNREADABLE)
def test_unreadable_predictions(name: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    content, says = UNREADABLE[name]
    path = tmp_path / "predictions.json"
    path.write_bytes(content)
    output = tmp_path / "metrics.json"
    output.write_text(EARLIER)
    assert main(["--predictions", str(path), "--output", str(output), "--no-embedder"]) == 2
    seen = capsys.readouterr()
    (line,) = seen.err.splitlines()
    assert line.startswith("medgrpo eval: ") and str(path) in line and says in line
    assert seen.out == "" and output.read_text() == EARLIER


def test_missing_predictions_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    output = tmp_path / "metrics.json"
    assert main(["--predictions", str(tmp_path / "absent.json"), "--output", str(output)]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"medgrpo eval: cannot read {tmp_path / 'absent.json'}: [Errno 2]")
    assert not output.exists()


def test_output_into_a_missing_directory_is_created(tmp_path: Path) -> None:
    path = tmp_path / "predictions.json"
    path.write_text(json.dumps([tal("a")]))
    output = tmp_path / "new" / "dir" / "metrics.json"
    assert main(["--predictions", str(path), "--output", str(output), "--no-embedder"]) == 0
    assert strict_load(output)["tag_miou_03"] == 1.0


def test_output_that_cannot_be_written_still_prints_the_metrics(
    unwritable_output, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    path = tmp_path / "predictions.json"
    path.write_text(json.dumps([tal("a")]))
    argv = ["--predictions", str(path), "--output", str(unwritable_output.path), "--no-embedder"]
    assert main(argv) == 2
    seen = capsys.readouterr()
    (line,) = seen.err.splitlines()
    assert line.startswith(f"medgrpo eval: cannot write {unwritable_output.path}: ")
    assert "Overall |" in seen.out and "1.0000" in seen.out  # the computed table
    assert unwritable_output.untouched()


def test_unreadable_comparison_run_keeps_the_metrics(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "predictions.json"
    path.write_text(json.dumps([tal("a")]))
    (tmp_path / "other.json").write_text("{broken")
    output = tmp_path / "metrics.json"
    args = ["--predictions", str(path), "--output", str(output), "--no-embedder", "--plot", str(tmp_path / "p.png")]
    assert main([*args, "--compare", str(tmp_path / "other.json")]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"medgrpo eval: cannot read {tmp_path / 'other.json'}: ")
    assert strict_load(output)["tag_miou_03"] == 1.0 and not (tmp_path / "p.png").exists()


def test_judge_option_without_model(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "predictions.json"
    path.write_text(json.dumps([tal("a")]))
    output = tmp_path / "metrics.json"
    assert main(["--predictions", str(path), "--output", str(output), "--judge-base-url", "http://127.0.0.1:9/v1"]) == 2
    assert capsys.readouterr().err.splitlines() == ["medgrpo eval: --judge-base-url needs --judge-model"]
    assert not output.exists()


def caption(key: str) -> dict:
    return {"id": key, "qa_type": "video_summary", "data_source": "CholecT50",
            "prediction": "The hook dissects the cystic duct.",
            "reference": "The grasper retracts the gallbladder."}  # fmt: skip


class BrokenJudge:
    """A judge whose every batch raises (a bug, a lost connection pool...)."""

    def score_batch(self, predictions: list[str], references: list[str]) -> list:
        raise RuntimeError("connection pool is closed")


def test_a_judge_that_raises_costs_its_scores_not_the_metrics(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "predictions.json"
    path.write_text(json.dumps([tal("a"), caption("b")]))
    output = tmp_path / "metrics.json"
    argv = ["--predictions", str(path), "--output", str(output), "--no-embedder"]
    assert main(argv, judge=metrics_judge(BrokenJudge())) == 0
    assert capsys.readouterr().err.splitlines() == [
        "medgrpo eval: the judge failed on 1 pairs (RuntimeError: connection pool is closed); their scores are missing",
        "medgrpo eval: the judge scored none of 1 pairs; not asking it again "
        "(0 more pairs of this task and all later ones are missing)",
    ]
    metrics = strict_load(output)
    assert metrics["tag_miou_03"] == 1.0 and metrics["vs_llm"] is None
    assert metrics["notes"]["vs_judge_missing"] == 1


def judged_file(tmp_path: Path) -> Path:
    """A tal record, two video summaries and one region caption: three judge pairs over two tasks."""
    path = tmp_path / "predictions.json"
    region = {**caption("rc"), "qa_type": "region_caption"}
    path.write_text(json.dumps([tal("a"), caption("vs1"), {**caption("vs2"), "prediction": "Another."}, region]))
    return path


@pytest.mark.parametrize("reply", ["not_json", "untyped", "string", "no_choices", "418"])
def test_judge_replies_that_are_no_score(reply: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = judged_file(tmp_path)
    output = tmp_path / "metrics.json"
    with JudgeServer() as server:
        server.rule("", reply)
        judge = ["--judge-base-url", server.base_url, "--judge-model", "loopback-judge"]
        assert main(["--predictions", str(path), "--output", str(output), "--no-embedder", *judge]) == 0
        asked = server.requests
    err = capsys.readouterr().err
    assert "Traceback" not in err and "judge scored none of 2 pairs; not asking it again" in err
    assert "judge: 2 pairs, 0 cached, 0 scored, 2 missing" in err  # the region caption was never asked
    metrics = strict_load(output)
    assert metrics["tag_miou_03"] == 1.0 and metrics["vs_llm"] is None and metrics["rc_llm"] is None
    assert metrics["notes"]["vs_judge_missing"] == 2 and metrics["notes"]["rc_judge_missing"] == 1
    assert asked <= 2 * 5  # two pairs, each with at most its retries


def test_a_judge_that_never_answers_costs_one_deadline(
    tmp_path: Path, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture
) -> None:
    path = judged_file(tmp_path)
    output = tmp_path / "metrics.json"
    with JudgeServer() as server:
        server.rule("", "hang")
        judge = ["--judge-base-url", server.base_url, "--judge-model", "m", "--judge-deadline-s", "1"]
        assert main(["--predictions", str(path), "--output", str(output), "--no-embedder", *judge]) == 0
        assert server.requests == 2  # the region caption is not asked
    assert "not asking it again" in capsys.readouterr().err
    assert "2 of 2 scores missing after retries (batch deadline x2)" in caplog.text
    assert strict_load(output)["vs_llm"] is None


def test_command_line_shows_no_traceback(tmp_path: Path) -> None:
    path = tmp_path / "predictions.json"
    path.write_text(json.dumps([tal("good"), tal("nan", start=float("nan")), stg("box", [float("nan"), 0, 1, 1])]))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "medgrpo", "eval", "--predictions", str(path), "--output", str(tmp_path / "m.json"),
         "--no-embedder"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr and "malformed entries: 2" in done.stdout
    strict_load(tmp_path / "m.json")
