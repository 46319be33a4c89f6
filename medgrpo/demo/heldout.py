"""Held-out scores of the demo's arms and of a constant-answer baseline, per (data_source, qa_type) key.

Every arm is scored the same way on the same held-out records (the val and test splits): its
greedy answers → the MedGRPO reward of each answer, raw and normalized with the SFT statistics
(:func:`medgrpo.train.evaluation.score_completions`), and the official MedVidBench metrics of the
same answers (``medgrpo eval``: a predictions file in its list format, read by
:func:`medgrpo.rewards.evaluate.evaluate_file`). Means are per key; "all keys" is the mean over
keys, each key counting once (as the balanced sampler trains them).

The baseline ignores the video: for each key it gives every held-out record the one answer that
scores best on that key's train records, chosen among the key's most common train references
(for a classification key, the majority label).
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from medgrpo.data.task_key import format_task_key
from medgrpo.rewards.metrics import TASK_METRICS
from medgrpo.train.evaluation import score_completions
from medgrpo.train.metrics import mean_finite

BASELINE_CANDIDATES = 32


@dataclass
class KeyScore:
    """One key's held-out numbers: records, mean raw and normalized reward, official metrics (None: unavailable)."""

    count: int
    reward_raw: float
    reward_norm: float
    official: dict[str, float | None] = field(default_factory=dict)


@dataclass
class HeldOutScores:
    """An arm's held-out numbers per key and over keys, and where its answers were written."""

    per_key: dict[str, KeyScore]
    reward_raw: float
    reward_norm: float
    predictions: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def key_of(record) -> str:
    return format_task_key(record.data_source, record.qa_type)


def write_predictions(path: Path, records: Sequence[Any], texts: Sequence[str]) -> Path:
    """The answers as a ``medgrpo eval`` predictions file (its list format)."""
    entries = [
        {
            "id": record.id or str(i),
            "qa_type": record.qa_type_raw,
            "data_source": record.data_source,
            "question": record.question,
            "prediction": text,
            "reference": record.answer or "",
            "struc_info": record.struc_info,
            "fps": record.metadata.get("fps", record.fps),
        }
        for i, (record, text) in enumerate(zip(records, texts))
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(entries, indent=1) + "\n")
    return path


def official_metrics(predictions: Path, records: Sequence[Any]) -> dict[str, dict[str, float | None]]:
    """``medgrpo eval``'s numbers of a predictions file, per key (its data source's value of its task's metrics)."""
    from medgrpo.rewards.evaluate import evaluate_file, lazy_embed

    summary = evaluate_file(predictions, embed=lazy_embed())
    per_key = {}
    for record in records:
        dataset = summary["per_dataset"].get(record.data_source, {})
        per_key[key_of(record)] = {name: dataset.get(name) for name in TASK_METRICS.get(record.qa_type, ())}
    return per_key


def score_answers(records: Sequence[Any], texts: Sequence[str], reward_fn, stats, predictions: Path) -> HeldOutScores:
    """Rewards (raw, normalized) and official metrics of ``texts`` as answers to ``records``, per key."""
    result = score_completions(list(records), list(texts), reward_fn, stats)
    official = official_metrics(write_predictions(predictions, records, texts), records)
    counts = Counter(key_of(r) for r in records)
    per_key = {
        key: KeyScore(counts[key], result.per_key_raw[key], result.per_key_norm.get(key, float("nan")), official[key])
        for key in sorted(counts)
    }
    return HeldOutScores(
        per_key,
        mean_finite([s.reward_raw for s in per_key.values()]),
        mean_finite([s.reward_norm for s in per_key.values()]),
        str(predictions),
    )


def load_policy(model_dir: Path) -> tuple[Any, Any]:
    """The exported model in ``model_dir`` (float32, SDPA, on the CPU, in eval mode) and its tokenizer."""
    from transformers import AutoTokenizer

    from medgrpo.train.model import ModelConfig, load_model

    model = load_model(ModelConfig(path=str(model_dir), dtype="float32", attention="sdpa"), "cpu").eval()
    return model, AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)


def model_answers(
    model_dir: Path,
    files: Sequence[Path],
    options,
    *,
    max_new_tokens: int,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[list[Any], list[str]]:
    """Greedy answers of the model in ``model_dir`` to every record of ``files``, with the records."""
    from medgrpo.train.evaluation import rollouts

    model, tokenizer = load_policy(model_dir)
    sizes = [sum(1 for line in Path(f).read_text().splitlines() if line.strip()) for f in files]
    records, texts = [], []
    for i, path in enumerate(files):
        offset = sum(sizes[:i])
        step = None if progress is None else (lambda done, _, offset=offset: progress(offset + done, sum(sizes)))
        found, answers = rollouts(model, tokenizer, path, options, max_new_tokens=max_new_tokens, progress=step)
        records += found
        texts += answers
    return records, texts


def constant_answers(train: Sequence[Any], held_out: Sequence[Any], reward_fn) -> list[str]:
    """The baseline's answer to each held-out record: its key's best constant answer on ``train`` (module docstring)."""
    by_key: dict[str, list[Any]] = defaultdict(list)
    for record in train:
        by_key[key_of(record)].append(record)
    best = {}
    for key, records in by_key.items():
        common = Counter(r.answer for r in records if r.answer).most_common(BASELINE_CANDIDATES)
        candidates = sorted(answer for answer, _ in common)
        scores = [mean_finite(reward_fn([answer] * len(records), records).rewards.tolist()) for answer in candidates]
        best[key] = candidates[max(range(len(candidates)), key=lambda i: (scores[i], -i))]
    return [best.get(key_of(record), "") for record in held_out]


__all__ = [
    "HeldOutScores",
    "KeyScore",
    "constant_answers",
    "load_policy",
    "model_answers",
    "official_metrics",
    "score_answers",
    "write_predictions",
]
