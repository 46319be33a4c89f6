"""Cross-dataset reward normalization statistics: ``medgrpo fit-norm`` and their loader.

MedGRPO normalizes every raw reward by the p25/p50/p75 of its (data_source, qa_type) key,
measured once on rollouts of the SFT model and then fixed (DESIGN.md §2). This module
fits them and loads them for ``medgrpo.group_advantages(..., keys=, stats=)``::

    python -m medgrpo.rewards.norm_stats rollouts.jsonl --output norm_stats.json
    stats = load_norm_stats("norm_stats.json")
    keys = stats.indices(data_sources, qa_types)           # (N,) int64 rows of stats.tensor()
    adv = medgrpo.group_advantages(rewards, group_size=8, keys=keys, stats=stats.tensor())

Input: JSONL, one rollout per line: ``{"id": ..., "data_source": str, "qa_type": str,
"reward": number | null}``. Blank lines are skipped; lines that are not such an object
(invalid JSON, bytes that are not UTF-8, a reward that is not a number or an integer too
large for a float) are malformed: counted, reported with their line numbers, left out;
null/NaN/inf rewards are counted and left out. ``_gpt``/``_gemini`` caption variants share their base type's
key (:meth:`~medgrpo.data.task_key.TaskKey.of`), at fit and at lookup alike.

Percentiles are ``torch.quantile(..., interpolation="linear")`` in float64 (numpy's
default "linear" method), the definition the tests check. Keys with fewer than
``--min-samples`` rewards are reported (and listed in the file's metadata) but kept.

Output (JSON): ``{"format": "medgrpo-norm-stats", "version": 1, "keys": [{"data_source",
"qa_type", "p25", "p50", "p75", "count", "nonfinite"}...], "metadata": {...}}``, keys sorted.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import math
import os
import sys
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, TextIO

import torch

from medgrpo.data.task_key import TaskKey

FORMAT = "medgrpo-norm-stats"
VERSION = 1
DEFAULT_MIN_SAMPLES = 32
MAX_LINES_REPORTED = 20


# ------------------------------------------------------------------------------------ the stats
@dataclass(frozen=True)
class KeyStats:
    """The fitted quartiles of one (data_source, qa_type) key."""

    data_source: str
    qa_type: str
    p25: float
    p50: float
    p75: float
    count: int  # finite rewards the quartiles come from
    nonfinite: int = 0  # null/NaN/inf rewards of this key, left out


@dataclass(frozen=True)
class NormStats:
    """Per-key reward quartiles, in the row order of :meth:`tensor`."""

    rows: tuple[KeyStats, ...]
    metadata: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def keys(self) -> list[TaskKey]:
        """``(data_source, qa_type)`` of each row."""
        return [TaskKey(r.data_source, r.qa_type) for r in self.rows]

    def tensor(self, device: Optional[torch.device | str] = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(K, 3) p25, p50, p75: the ``stats`` argument of ``group_advantages`` / ``normalize_rewards``."""
        values = [[r.p25, r.p50, r.p75] for r in self.rows]
        return torch.tensor(values, dtype=dtype, device=device).reshape(len(self.rows), 3)

    def index(self, data_source: str, qa_type: str) -> int:
        """Row of the key (``qa_type`` variants folded); KeyError naming the known keys if absent."""
        row = self._index_map().get(TaskKey.of(data_source, qa_type))
        if row is None:
            known = ", ".join(map(str, self.keys))
            raise KeyError(f"no normalization statistics for ({data_source!r}, {qa_type!r}); known keys: {known}")
        return row

    def indices(
        self,
        data_sources: Sequence[str],
        qa_types: Sequence[str],
        *,
        unknown: str = "error",
        device: Optional[torch.device | str] = None,
    ) -> torch.Tensor:
        """(N,) int64 rows of ``zip(data_sources, qa_types)``, the ``keys`` of ``group_advantages``.

        ``unknown="error"`` raises KeyError for a key without statistics; ``unknown="nan"``
        gives it row -1, which the normalization ops turn into a NaN reward (left out of
        the group statistics) instead of borrowing another key's quartiles.
        """
        if unknown not in ("error", "nan"):
            raise ValueError(f"unknown must be 'error' or 'nan', not {unknown!r}")
        if len(data_sources) != len(qa_types):
            raise ValueError(f"{len(data_sources)} data sources vs {len(qa_types)} qa types")
        mapping = self._index_map()
        rows = [mapping.get(TaskKey.of(d, q), -1) for d, q in zip(data_sources, qa_types)]
        if unknown == "error" and -1 in rows:
            bad = rows.index(-1)
            self.index(data_sources[bad], qa_types[bad])  # raises with the message
        return torch.tensor(rows, dtype=torch.int64, device=device)

    def _index_map(self) -> dict[TaskKey, int]:
        return {key: i for i, key in enumerate(self.keys)}

    def to_json(self) -> dict[str, Any]:
        """The stats file's JSON object."""
        rows = [dataclasses.asdict(r) for r in self.rows]
        return {"format": FORMAT, "version": VERSION, "keys": rows, "metadata": self.metadata}

    def save(self, path: str | os.PathLike) -> None:
        """Write the stats file (atomically: a temporary file renamed over ``path``)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        try:
            tmp.write_text(json.dumps(self.to_json(), indent=2, allow_nan=False) + "\n")
            tmp.replace(path)
        finally:
            with contextlib.suppress(OSError):  # after a failed write or rename; gone already after a rename
                tmp.unlink()


def load_norm_stats(path: str | os.PathLike) -> NormStats:
    """Read a stats file written by ``medgrpo fit-norm`` (ValueError if it is not one)."""
    obj = json.loads(Path(path).read_text())
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise ValueError(f"{path}: not a {FORMAT} file")
    if obj.get("version") != VERSION:
        raise ValueError(f"{path}: {FORMAT} version {obj.get('version')!r}, this medgrpo reads {VERSION}")
    rows = tuple(KeyStats(**row) for row in obj["keys"])
    return NormStats(rows=rows, metadata=obj.get("metadata", {}))


# ------------------------------------------------------------------------------------ fitting
@dataclass
class RolloutScan:
    """Finite rewards by key, plus what was left out and why."""

    rewards: dict[TaskKey, list[float]] = field(default_factory=lambda: defaultdict(list))
    nonfinite: dict[TaskKey, int] = field(default_factory=lambda: defaultdict(int))
    malformed: list[tuple[str, int, str]] = field(default_factory=list)  # (file, line number, reason)
    lines: int = 0


def _decode_line(raw: bytes, first: bool) -> str:
    """One line as text; ValueError naming the first byte that is not UTF-8."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"not UTF-8 text (byte 0x{raw[error.start]:02x} at column {error.start + 1})") from None
    return text.removeprefix("\ufeff") if first else text  # a byte-order mark opening the file


def _parse_line(line: str, reward_field: str) -> tuple[TaskKey, float]:
    """(key, reward) of one rollout line; ValueError with the reason if malformed."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"invalid JSON ({error.msg})") from None
    except (ValueError, RecursionError) as error:  # an integer of > 4300 digits, nesting too deep
        raise ValueError(f"invalid JSON ({type(error).__name__}: {str(error).split(';')[0]})") from None
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    for name in ("data_source", "qa_type"):
        if not isinstance(obj.get(name), str) or not obj[name]:
            raise ValueError(f"{name} missing or not a non-empty string")
    if reward_field not in obj:
        raise ValueError(f"no {reward_field!r} field")
    reward = obj[reward_field]
    if reward is None:
        reward = math.nan
    if isinstance(reward, bool) or not isinstance(reward, (int, float)):
        raise ValueError(f"{reward_field} is not a number")
    try:
        value = float(reward)
    except OverflowError:
        raise ValueError(
            f"{reward_field} is an integer too large for a float ({len(str(abs(reward)))} digits)"
        ) from None
    return TaskKey.of(obj["data_source"], obj["qa_type"]), value


def scan_rollouts(paths: Iterable[str | os.PathLike], *, reward_field: str = "reward") -> RolloutScan:
    """Read rollout JSONL files (module docstring) into per-key finite rewards and problem reports."""
    scan = RolloutScan()
    for path in paths:
        with open(path, "rb") as f:  # bytes: a line that is not UTF-8 is one malformed line, not the file's end
            for number, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                scan.lines += 1
                try:
                    key, reward = _parse_line(_decode_line(raw, number == 1), reward_field)
                except ValueError as error:
                    scan.malformed.append((str(path), number, str(error)))
                    continue
                if math.isfinite(reward):
                    scan.rewards[key].append(reward)
                else:
                    scan.nonfinite[key] += 1
    return scan


def quartiles(values: Sequence[float]) -> tuple[float, float, float]:
    """p25, p50, p75 as ``torch.quantile`` (linear interpolation) in float64."""
    q = torch.quantile(torch.tensor(values, dtype=torch.float64), torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64))
    return tuple(q.tolist())  # type: ignore[return-value]


def fit_norm_stats(scan: RolloutScan, *, metadata: Optional[dict[str, Any]] = None) -> NormStats:
    """Quartiles of every key with at least one finite reward, sorted by key."""
    rows = []
    for key in sorted(scan.rewards):
        p25, p50, p75 = quartiles(scan.rewards[key])
        rows.append(
            KeyStats(
                *key, p25=p25, p50=p50, p75=p75, count=len(scan.rewards[key]), nonfinite=scan.nonfinite.get(key, 0)
            )
        )
    return NormStats(rows=tuple(rows), metadata=dict(metadata or {}))


# ------------------------------------------------------------------------------------ the command
def build_parser(parser: Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    """Arguments of ``fit-norm``, added to ``parser`` (e.g. a subcommand's) or a new parser."""
    if parser is None:
        parser = argparse.ArgumentParser(prog="medgrpo fit-norm", description=__doc__.split("\n\n")[0])
    parser.add_argument("rollouts", nargs="+", help="rollout JSONL file(s) of the SFT model")
    parser.add_argument("-o", "--output", required=True, help="stats file to write (JSON)")
    parser.add_argument(
        "--min-samples",
        type=int,
        default=DEFAULT_MIN_SAMPLES,
        help=f"report keys with fewer finite rewards than this (default {DEFAULT_MIN_SAMPLES})",
    )
    parser.add_argument("--reward-field", default="reward", help="the raw reward's field name (default: reward)")
    parser.add_argument(
        "--strict",
        action="store_true",
        help="exit 1 (after writing) if any line is malformed or any key is under --min-samples",
    )
    return parser


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``fit-norm`` on a top-level CLI's ``subparsers``; its ``func`` default runs it."""
    description = "Per-(data_source, qa_type) reward quartiles p25/p50/p75 from rollouts of the SFT model."
    parser = subparsers.add_parser("fit-norm", help=description, description=description)
    build_parser(parser)
    parser.set_defaults(func=run)
    return parser


def _report(scan: RolloutScan, stats: NormStats, low: list[KeyStats], empty: list[TaskKey], out: TextIO) -> None:
    nonfinite = sum(scan.nonfinite.values())
    total = sum(len(v) for v in scan.rewards.values())
    print(
        f"fit-norm: {scan.lines} rollouts, {total} finite rewards over {len(stats.rows)} keys; "
        f"{nonfinite} null/NaN/inf rewards left out; {len(scan.malformed)} malformed lines",
        file=out,
    )
    for path, number, reason in scan.malformed[:MAX_LINES_REPORTED]:
        print(f"  malformed {path}:{number}: {reason}", file=out)
    if len(scan.malformed) > MAX_LINES_REPORTED:
        print(f"  ... and {len(scan.malformed) - MAX_LINES_REPORTED} more malformed lines", file=out)
    for row in low:
        print(f"  too few samples: {TaskKey(row.data_source, row.qa_type)} has {row.count}", file=out)
    for key in empty:
        print(f"  no finite reward: {key} (left out of the stats file)", file=out)


def run(args: argparse.Namespace, *, out: Optional[TextIO] = None) -> int:
    """Execute ``fit-norm`` with parsed ``args`` (report to ``out``, default stdout); returns the exit status."""
    out = out or sys.stdout
    try:
        scan = scan_rollouts(args.rollouts, reward_field=args.reward_field)
    except OSError as error:
        print(f"fit-norm: {error}", file=sys.stderr)
        return 2
    stats = fit_norm_stats(scan)
    if not stats.rows:
        print(f"fit-norm: no finite rewards in {', '.join(map(str, args.rollouts))}; nothing written", file=sys.stderr)
        return 2
    low = [r for r in stats.rows if r.count < args.min_samples]
    empty = sorted(k for k in scan.nonfinite if k not in scan.rewards)
    metadata = {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "inputs": [str(p) for p in args.rollouts],
        "reward_field": args.reward_field,
        "percentiles": "torch.quantile linear interpolation, float64",
        "min_samples": args.min_samples,
        "rollouts": scan.lines,
        "malformed_lines": len(scan.malformed),
        "nonfinite_rewards": sum(scan.nonfinite.values()),
        "low_sample_keys": [[r.data_source, r.qa_type] for r in low],
        "keys_without_rewards": [list(k) for k in empty],
    }
    stats = NormStats(rows=stats.rows, metadata=metadata)
    _report(scan, stats, low, empty, out)
    try:
        stats.save(args.output)
    except OSError as error:
        print(f"fit-norm: cannot write {args.output}: {error.strerror or error}; nothing written", file=sys.stderr)
        return 2
    print(f"fit-norm: wrote {args.output}", file=out)
    return 1 if args.strict and (scan.malformed or low or empty) else 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``medgrpo fit-norm`` / ``python -m medgrpo.rewards.norm_stats``: fit and write the stats file."""
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
