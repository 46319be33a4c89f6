"""Held-out evaluation of a policy: greedy answers → rewards (raw and normalized) per key.

Used after SFT and after GRPO (``medgrpo demo`` prints both), and to collect the SFT
rollouts that ``medgrpo fit-norm`` turns into normalization statistics
(:func:`write_rollout_jsonl` writes its JSONL input).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import SequentialSampler

from medgrpo.data.collate import VideoCollator, eos_ids
from medgrpo.data.loader import DecodeOptions, VideoDataset, VideoLoader
from medgrpo.data.records import RecordDataset
from medgrpo.data.task_key import format_task_key
from medgrpo.ops.normalize_rewards import normalize_rewards
from medgrpo.rewards.rewarder import Rewarder
from medgrpo.train.distributed import gathered
from medgrpo.train.metrics import mean_finite, per_key_means
from medgrpo.train.rollout import RolloutConfig, decode_text, generate


@dataclass
class EvalResult:
    """Mean raw and normalized reward overall and per ``data_source/qa_type`` key; the answers."""

    reward_raw: float
    reward_norm: float | None
    per_key_raw: dict[str, float]
    per_key_norm: dict[str, float]
    count: int
    missing: int
    answers: list[dict[str, Any]] = field(default_factory=list)


@torch.no_grad()
def rollouts(
    model,
    tokenizer,
    records_file: str | Path,
    options: DecodeOptions,
    *,
    group_size: int = 1,
    temperature: float = 0.0,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: Callable[[int, int], None] | None = None,
) -> tuple[list[Any], list[str]]:
    """Completions of every record of ``records_file`` (greedy by default), with their records.

    ``progress(done, total)`` is called after each batch with the records done so far.
    """
    dataset = VideoDataset(RecordDataset(records_file), options)
    collate = VideoCollator(tokenizer, padding_side="left")
    loader = VideoLoader(dataset, collate, batch_size=batch_size, sampler=SequentialSampler(dataset))
    config = RolloutConfig(group_size=group_size, max_new_tokens=max_new_tokens, temperature=temperature)
    generator = torch.Generator(device=device).manual_seed(seed)
    records, texts = [], []
    dtype = next(model.parameters()).dtype
    for batch in loader:
        if len(batch) == 0:
            continue
        rollout = generate(
            model,
            batch.to(device, dtype),
            config,
            eos_token_ids=eos_ids(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            generator=generator,
        )
        texts += decode_text(tokenizer, rollout)
        records += [r for r in batch.records for _ in range(group_size)]
        if progress is not None:
            progress(len(records) // group_size, len(dataset))
    return records, texts


def evaluate_policy(
    model,
    tokenizer,
    records_file: str | Path,
    reward_fn,
    stats=None,
    *,
    options: DecodeOptions,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    progress: Callable[[int, int], None] | None = None,
) -> EvalResult:
    """Greedy answers on ``records_file`` scored by ``reward_fn``; normalized with ``stats`` when given."""
    records, texts = rollouts(
        model,
        tokenizer,
        records_file,
        options,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        device=device,
        progress=progress,
    )
    return score_completions(records, texts, reward_fn, stats)


def score_completions(records: list[Any], texts: list[str], reward_fn, stats=None) -> EvalResult:
    """``texts[i]`` scored as the answer to ``records[i]``: rewards raw and (with ``stats``) normalized."""
    rewards = reward_fn(texts, records).rewards.float()
    keys = [format_task_key(r.data_source, r.qa_type) for r in records]
    normalized = None
    if stats is not None:
        rows = stats.indices([r.data_source for r in records], [r.qa_type for r in records], unknown="nan")
        normalized = normalize_rewards(rewards, rows, stats.tensor())
    raw = rewards.tolist()  # read once; every summary below is over these host values
    norm = None if normalized is None else normalized.tolist()
    answers = [
        {"id": r.id, "key": k, "prediction": t, "reference": r.answer, "reward": v}
        for r, k, t, v in zip(records, keys, texts, raw)
    ]
    return EvalResult(
        reward_raw=mean_finite(raw),
        reward_norm=None if norm is None else mean_finite(norm),
        per_key_raw=per_key_means(keys, raw),
        per_key_norm={} if norm is None else per_key_means(keys, norm),
        count=len(texts),
        missing=int(torch.isnan(rewards).sum()),
        answers=answers,
    )


def eval_metrics(
    model,
    tokenizer,
    rewarder: Rewarder,
    records_file: str | Path,
    *,
    options: DecodeOptions,
    max_new_tokens: int,
    device: torch.device | str,
) -> dict[str, Any]:
    """:func:`evaluate_policy` during training, as ``eval/...`` metrics (a sharded model's root gathered)."""
    with gathered(model):
        result = evaluate_policy(
            model,
            tokenizer,
            records_file,
            rewarder.fn,
            rewarder.stats,
            options=options,
            max_new_tokens=max_new_tokens,
            device=device,
        )
    metrics = {
        "eval/reward_raw": result.reward_raw,
        "eval/reward_norm": result.reward_norm,
        "eval/missing": result.missing,
        "eval/count": result.count,
    }
    metrics.update({f"eval/reward_raw/{k}": v for k, v in result.per_key_raw.items()})
    metrics.update({f"eval/reward_norm/{k}": v for k, v in result.per_key_norm.items()})
    model.train()
    return metrics


def write_rollout_jsonl(path: str | Path, records: list[Any], texts: list[str], reward_fn) -> Path:
    """The ``medgrpo fit-norm`` input: one line per completion with its raw reward."""
    rewards = reward_fn(texts, records).rewards.tolist()
    path = Path(path)
    with open(path, "w") as handle:
        for record, reward in zip(records, rewards):
            line = {
                "id": record.id or str(record.index),
                "data_source": record.data_source,
                "qa_type": record.qa_type,
                "reward": reward if math.isfinite(reward) else None,
            }
            handle.write(json.dumps(line) + "\n")
    return path


__all__ = ["EvalResult", "eval_metrics", "evaluate_policy", "rollouts", "score_completions", "write_rollout_jsonl"]
