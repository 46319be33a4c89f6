"""The ``medgrpo`` command line: lazy subcommands, ``eval`` (with judge and embedder flags) and
``fit-norm`` end to end through ``python -m medgrpo``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from medgrpo.cli import COMMANDS, main
from medgrpo.rewards.norm_stats import load_norm_stats

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}

RESULTS = {
    "0": {
        "metadata": {"fps": 1.0},
        "qa_type": "tal",
        "data_source": "AVOS",
        "question": "When?",
        "struc_info": [{"spans": [{"start": 1.0, "end": 4.0}]}],
        "answer": "1.0-3.0 seconds.",
        "gnd": "",
    },
    "1": {
        "metadata": {"fps": 1.0},
        "qa_type": "next_action",
        "data_source": "AVOS",
        "struc_info": [],
        "question": "Next?",
        "answer": "The surgeon ties a knot",
        "gnd": "tying",
    },
    "2": {
        "metadata": {"fps": 1.0},
        "qa_type": "video_summary_gpt",
        "data_source": "AVOS",
        "struc_info": [],
        "question": "Summarize.",
        "answer": "The surgeon sutures the wound.",
        "gnd": "Suturing of the wound.",
    },
}


def medgrpo(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "medgrpo", *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture
def results_file(tmp_path):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(RESULTS))
    return path


@pytest.mark.slow
def test_help_lists_commands_without_importing_them():
    done = medgrpo("--help")
    assert done.returncode == 0, done.stderr
    for name, (_, help_text) in COMMANDS.items():
        assert name in done.stdout and help_text.split()[0] in done.stdout
    probe = (
        "import sys, contextlib, io\nfrom medgrpo.cli import main\n"
        "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n    main(['--help'])\n"
        "print(sorted(m for m in ('medgrpo.rewards.evaluate', 'medgrpo.rewards.norm_stats', 'medgrpo.rewards',"
        " 'transformers', 'openai', 'matplotlib') if m in sys.modules))"
    )
    lazy = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert lazy.stdout.strip() == "[]", lazy.stdout + lazy.stderr


def test_usage_errors_exit_2(capsys):
    for argv in ([], ["no-such-command"], ["eval"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


@pytest.mark.slow
def test_eval_end_to_end_without_embedder(results_file, tmp_path):
    output = tmp_path / "metrics.json"
    done = medgrpo("eval", "--predictions", str(results_file), "--output", str(output), "--no-embedder")
    assert done.returncode == 0, done.stderr
    metrics = json.loads(output.read_text())
    assert metrics["tag_miou_03"] == pytest.approx(2 / 3) and metrics["tag_miou_05"] == pytest.approx(2 / 3)
    assert metrics["nap_acc"] == 0.0 and metrics["notes"]["nap_unresolved"] == 1
    assert metrics["vs_llm"] is None
    assert "TAG mIoU@0.3" in done.stdout


@pytest.mark.slow
def test_eval_with_judge_and_default_embedder(results_file, tmp_path):
    from medgrpo.testing.judge_server import JudgeServer, deterministic_scores

    output, cache = tmp_path / "metrics.json", tmp_path / "judge.sqlite"
    with JudgeServer() as server:
        args = [
            "eval",
            "--predictions",
            str(results_file),
            "--output",
            str(output),
            "--judge-base-url",
            server.base_url,
            "--judge-model",
            "loopback-judge",
            "--judge-cache",
            str(cache),
        ]
        done = medgrpo(*args)
        assert done.returncode == 0, done.stderr
        assert server.requests == 1
        again = medgrpo(*args)  # every score from the cache now
        assert again.returncode == 0 and server.requests == 1
    metrics = json.loads(output.read_text())
    expected = sum(deterministic_scores("Suturing of the wound.", "The surgeon sutures the wound.").values()) / 5
    assert metrics["vs_llm"] == pytest.approx(expected)
    assert metrics["nap_acc"] == 1.0  # "The surgeon ties a knot" -> nearest class "tying" (all-MiniLM-L6-v2)
    assert "1 cached" in again.stderr


@pytest.mark.slow
def test_eval_judge_needs_a_model(results_file, tmp_path):
    done = medgrpo(
        "eval",
        "--predictions",
        str(results_file),
        "--output",
        str(tmp_path / "m.json"),
        "--judge-base-url",
        "http://127.0.0.1:9/v1",
    )
    assert done.returncode == 2 and "--judge-model" in done.stderr


@pytest.mark.slow
def test_fit_norm_end_to_end(tmp_path):
    rollouts = tmp_path / "rollouts.jsonl"
    lines = [{"id": i, "data_source": "AVOS", "qa_type": "tal", "reward": i / 10} for i in range(11)]
    lines += [{"id": 99, "data_source": "AVOS", "qa_type": "video_summary_gpt", "reward": 0.5}]
    rollouts.write_text("\n".join(json.dumps(line) for line in lines) + "\nnot json\n")
    output = tmp_path / "stats.json"
    done = medgrpo("fit-norm", str(rollouts), "--output", str(output), "--min-samples", "5")
    assert done.returncode == 0, done.stderr
    stats = load_norm_stats(output)
    tal = stats.rows[stats.index("AVOS", "tal")]
    assert (tal.p25, tal.p50, tal.p75, tal.count) == (pytest.approx(0.25), pytest.approx(0.5), pytest.approx(0.75), 11)
    assert stats.index("AVOS", "video_summary") != stats.index("AVOS", "tal")
    assert "1 malformed lines" in done.stdout and "too few samples: AVOS/video_summary" in done.stdout
