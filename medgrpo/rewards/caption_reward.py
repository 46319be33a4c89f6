"""The caption reward of MedGRPO (dense_captioning, video_summary, region_caption), DESIGN.md §2.

    reward = 0.5 * clip(cos(e_pred, e_ref), 0, 1) + 0.5 * (judge_mean - 1) / 4

* Semantic similarity: cosine of all-MiniLM-L6-v2 embeddings (:mod:`medgrpo.rewards.similarity`),
  clipped to [0, 1]. Clipping rather than ``(cos + 1) / 2``: unrelated captions already sit
  near 0 for this model (negative cosines are rare and mean "unrelated" too), and
  ``(cos + 1) / 2`` would squeeze every real caption into [0.5, 1], halving the reward's
  spread where the policy needs it.
* Judge: the mean of the five 1..5 clinical scores (:mod:`medgrpo.rewards.judge`) mapped
  linearly to [0, 1], the same (s - 1) / 4 the leaderboard uses.

A missing judge score makes the reward NaN: ``group_advantages`` leaves NaN rewards out
of the group statistics, so the completion neither earns nor costs anything, and the
count shows in :class:`CaptionRewards` and the judge's counters — never a silent 0.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import Tensor

from medgrpo.rewards.judge import Judge, JudgeScore
from medgrpo.rewards.similarity import SentenceEmbedder, get_embedder

SIMILARITY_WEIGHT = 0.5
JUDGE_WEIGHT = 0.5

JudgeValue = Union[JudgeScore, float, None]


def normalize_similarity(cosine: Tensor) -> Tensor:
    """Cosine similarity clipped to [0, 1] (NaN stays NaN); see the module docstring for why."""
    return cosine.float().clamp(0.0, 1.0)


def judge_means(judge_scores: Sequence[JudgeValue]) -> Tensor:
    """(n,) float32 judge scores on the 1..5 scale: a :class:`JudgeScore`'s mean, a float as is, None -> NaN."""
    values = [float("nan") if s is None else (s.mean if isinstance(s, JudgeScore) else float(s)) for s in judge_scores]
    return torch.tensor(values, dtype=torch.float32)


def normalize_judge(judge_scores: Sequence[JudgeValue]) -> Tensor:
    """(n,) ``(mean - 1) / 4`` in [0, 1]; NaN where the judge score is missing."""
    return (judge_means(judge_scores) - 1.0) / 4.0


def caption_reward(similarity: Tensor, judge_scores: Sequence[JudgeValue]) -> Tensor:
    """(n,) float32 ``0.5 * clip(similarity, 0, 1) + 0.5 * (judge_mean - 1) / 4``, NaN where the judge is missing.

    ``similarity`` is the (n,) cosine of prediction and reference embeddings;
    ``judge_scores`` holds one :class:`JudgeScore` (or a 1..5 mean, or None) per item.
    """
    if similarity.shape != (len(judge_scores),):
        raise ValueError(
            f"caption_reward: similarity of shape {tuple(similarity.shape)} for {len(judge_scores)} judge scores"
        )
    sim = normalize_similarity(similarity.detach().cpu())
    return SIMILARITY_WEIGHT * sim + JUDGE_WEIGHT * normalize_judge(judge_scores)


@dataclass(frozen=True)
class CaptionRewards:
    """Caption rewards of a batch and their parts (all (n,) float32 on CPU)."""

    reward: Tensor  # caption_reward; NaN where the judge score is missing
    similarity: Tensor  # raw cosine similarity, in [-1, 1]
    judge: Tensor  # judge mean on the 1..5 scale; NaN where missing
    missing: int  # how many judge scores are missing (= NaN rewards)


def score_captions(
    predictions: Sequence[str], references: Sequence[str], *, judge: Judge, embedder: Optional[SentenceEmbedder] = None
) -> CaptionRewards:
    """Caption rewards of ``predictions[i]`` against ``references[i]``: similarity, judge, and their blend.

    The judge's requests run while the embeddings are computed. ``embedder`` defaults to
    the process-wide all-MiniLM-L6-v2 (:func:`get_embedder`).
    """
    if len(predictions) != len(references):
        raise ValueError(f"score_captions: {len(predictions)} predictions vs {len(references)} references")
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="medgrpo-caption") as pool:
        asked = pool.submit(judge.score_batch, predictions, references)  # network-bound: overlaps the embedding
        cosine = (embedder or get_embedder()).similarity(predictions, references)
        scores = asked.result()
    return CaptionRewards(
        reward=caption_reward(cosine, scores),
        similarity=cosine,
        judge=judge_means(scores),
        missing=sum(s is None for s in scores),
    )
