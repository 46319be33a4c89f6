"""``medgrpo fit-norm`` on bad input: every case in one place, with what the user sees.

Each case asserts the exit status, the one line that says what happened (stdout for the
report, stderr for a refusal), what was counted, and what is on disk afterwards (a stats
file written from the good lines, or nothing written and an earlier file left untouched).
No case may end in a traceback.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from medgrpo.rewards.norm_stats import load_norm_stats, main

ROOT = Path(__file__).resolve().parents[2]
GOOD = [json.dumps({"data_source": "AVOS", "qa_type": "tal", "reward": r}).encode() for r in (0.1, 0.4, 0.6, 0.9)]
EARLIER = '{"earlier": "stats file"}\n'


def rollout(reward: str) -> bytes:
    """A rollout line whose reward is the raw JSON text ``reward``."""
    return b'{"data_source": "AVOS", "qa_type": "tal", "reward": ' + reward.encode() + b"}"


@dataclass(frozen=True)
class Case:
    """One bad input: the file's lines (bytes), the exit status and what the user reads."""

    lines: list[bytes]
    status: int
    says: str  # a substring of the one line that reports the problem ({path} = the input file)
    malformed: list[int] = field(default_factory=list)  # reported line numbers
    written: bool = True  # whether a stats file is written


CASES = {
    "integer too large for a float": Case(
        [GOOD[0], rollout("1" + "0" * 400), *GOOD[1:]],
        0,
        "malformed {path}:2: reward is an integer too large for a float (401 digits)",
        [2],
    ),
    "integer beyond Python's digit limit": Case(
        [*GOOD[:2], rollout("9" * 5000), *GOOD[2:]], 0, "malformed {path}:3: invalid JSON (ValueError", [3]
    ),
    "byte that is not UTF-8": Case(
        [GOOD[0], b'{"data_source": "\xffAVOS", "qa_type": "tal", "reward": 0.5}', *GOOD[1:]],
        0,
        "malformed {path}:2: not UTF-8 text (byte 0xff at column 18)",
        [2],
    ),
    "Latin-1 text in a caption field": Case(
        [*GOOD, b'{"data_source": "AVOS", "qa_type": "tal", "reward": 0.2, "note": "r\xe9sum\xe9"}'],
        0,
        "malformed {path}:5: not UTF-8 text (byte 0xe9 at column 68)",
        [5],
    ),
    "nesting too deep": Case([*GOOD, b"[" * 100_000], 0, "malformed {path}:5: invalid JSON (RecursionError", [5]),
    "byte-order mark on the first line": Case([b"\xef\xbb\xbf" + GOOD[0], *GOOD[1:]], 0, "0 malformed lines"),
    "infinite float reward is not malformed": Case(
        [*GOOD, rollout("1e400"), rollout("-Infinity")], 0, "2 null/NaN/inf rewards left out"
    ),
    "only blank lines": Case(
        [b"", b"  ", b"\t"], 2, "fit-norm: no finite rewards in {path}; nothing written", [], False
    ),
    "empty file": Case([], 2, "fit-norm: no finite rewards in {path}; nothing written", [], False),
    "every line malformed": Case(
        [b"{not json", b"\xff\xfe", rollout("1" + "0" * 400)],
        2,
        "fit-norm: no finite rewards in {path}; nothing written",
        [],
        False,
    ),
}


def write_lines(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path


@pytest.mark.parametrize("name", CASES)
def test_bad_rollout_lines(name: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    case = CASES[name]
    path = write_lines(tmp_path / "rollouts.jsonl", case.lines)
    output = tmp_path / "stats.json"
    output.write_text(EARLIER)
    assert main([str(path), "-o", str(output), "--min-samples", "1"]) == case.status
    seen = capsys.readouterr()
    said = case.says.format(path=path)
    assert said in (seen.out if case.status == 0 else seen.err)
    if case.status == 0:
        prefix = f"  malformed {path}:"
        reported = [int(line[len(prefix) :].split(":")[0]) for line in seen.out.splitlines() if line.startswith(prefix)]
        assert reported == case.malformed
        assert f"{len(case.malformed)} malformed lines" in seen.out
    assert "Traceback" not in seen.err
    if case.written:
        stats = load_norm_stats(output)
        assert [(r.data_source, r.qa_type, r.count) for r in stats.rows] == [("AVOS", "tal", 4)]
        assert stats.metadata["malformed_lines"] == len(case.malformed)
    else:
        assert output.read_text() == EARLIER
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rollouts.jsonl", "stats.json"]  # no temporary file left


def test_missing_input_and_directory_input(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    output = tmp_path / "stats.json"
    assert main([str(tmp_path / "absent.jsonl"), "-o", str(output)]) == 2
    assert main([str(tmp_path), "-o", str(output)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("fit-norm: [Errno 2] No such file or directory") and "absent.jsonl" in err[0]
    assert err[1].startswith("fit-norm: [Errno 21] Is a directory")
    assert len(err) == 2 and not output.exists()


def test_output_into_a_missing_directory_is_created(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "rollouts.jsonl", GOOD)
    output = tmp_path / "new" / "dir" / "stats.json"
    assert main([str(path), "-o", str(output), "--min-samples", "1"]) == 0
    assert load_norm_stats(output).rows[0].count == 4


def test_output_that_cannot_be_written(unwritable_output, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = write_lines(tmp_path / "rollouts.jsonl", GOOD)
    assert main([str(path), "-o", str(unwritable_output.path), "--min-samples", "1"]) == 2
    seen = capsys.readouterr()
    (line,) = seen.err.splitlines()
    assert line.startswith(f"fit-norm: cannot write {unwritable_output.path}: ") and line.endswith("; nothing written")
    assert "4 finite rewards over 1 keys" in seen.out  # the report of what was read still comes
    assert unwritable_output.untouched()  # and no temporary file is left beside it


def test_strict_exits_1_after_writing(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "rollouts.jsonl", [*GOOD, b"\xff"])
    output = tmp_path / "stats.json"
    assert main([str(path), "-o", str(output), "--min-samples", "1", "--strict"]) == 1
    assert load_norm_stats(output).metadata["malformed_lines"] == 1


def test_command_line_shows_no_traceback(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "rollouts.jsonl", [*GOOD, rollout("1" + "0" * 400), b"\xff"])
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "medgrpo", "fit-norm", str(path), "-o", str(tmp_path / "s.json"), "--min-samples", "1"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr and "2 malformed lines" in done.stdout
