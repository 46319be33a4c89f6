"""Task metrics of MedVidBench, equal to the official leaderboard evaluator's numbers.

The reference is the code of the MedVidBench leaderboard (``ChaoSFu/MedVid_understanding``,
``MedVidBench-Leaderboard/evaluation/``: ``eval_*.py`` per task and the pooling of
``evaluate_all_pai.print_overall_evaluation_results``), not its README. Every place where
that code does something surprising and we do the same is marked ``# Official quirk:``.
Where the authors' first public copy (``UII-AI/MedGRPO-Code`` @ f098b64, ``evaluation/``)
differs, the leaderboard is followed and the difference is noted.

Metrics (the leaderboard's names):

    tag_miou_03, tag_miou_05  tal: mean over records of the mean IoU of the spans matched
                              one-to-one (greedy, per ground truth) at IoU >= 0.3 / 0.5
    stg_miou                  stg: mean over records of the mean box IoU over ground-truth times
    dvc_f1                    dense captioning: temporal F1 averaged over IoU 0.3/0.5/0.7
    nap_acc                   next action: accuracy against the dataset's class list; an answer
                              that is not a class goes to its nearest class (all-MiniLM-L6-v2)
    cvs_acc                   cvs: mean over the three components of the exact-match accuracy
                              ("component_balanced_accuracy"), averaged over datasets
    sa_acc                    skill: mean over aspects of the exact-match accuracy
                              ("aspect_balanced_accuracy"), averaged over datasets
    dvc_llm, vs_llm, rc_llm   caption quality on the judge's 1-5 scale

Two callables are injected by the caller:

* ``embed(texts: list[str]) -> torch.Tensor`` of shape (n, d), rows L2-normalized (the
  all-MiniLM-L6-v2 encoder). With ``embed=None`` a next-action answer that is not a class
  is matched to a class only by a loose string comparison (:func:`~medgrpo.rewards.parsers.label_key`);
  otherwise it counts as wrong and as ``unresolved``. That can only lower ``nap_acc`` against
  the official number, and ``unresolved`` says by how many answers at most.
* ``judge(requests: list[JudgeRequest]) -> list[float | None]``: one 1-5 score per request
  (the mean of the judge's five dimensions), None where the judge gave none. With
  ``judge=None`` the LLM metrics are None (unavailable), never 0.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from medgrpo.rewards import next_action_classes as nac
from medgrpo.rewards.ground_truth import (
    MalformedRecord,
    box_iou,
    dvc_gt_events,
    finite_number,
    first_struc,
    is_box,
    span_iou,
    stg_gt_boxes,
    tal_gt_spans,
)
from medgrpo.rewards.parsers import (
    DenseEvent,
    StgBoxes,
    cvs_components,
    dense_events,
    label_key,
    parse_skill,
    skill_aspects,
    stg_boxes,
    tal_spans,
)

DVC_THRESHOLDS = (0.3, 0.5, 0.7)
# The metric(s) of each task, by the leaderboard's names (the *_llm ones need the LLM judge).
TASK_METRICS = {
    "cvs_assessment": ("cvs_acc",),
    "next_action": ("nap_acc",),
    "skill_assessment": ("sa_acc",),
    "stg": ("stg_miou",),
    "tal": ("tag_miou_03", "tag_miou_05"),
    "dense_captioning": ("dvc_f1", "dvc_llm"),
    "video_summary": ("vs_llm",),
    "region_caption": ("rc_llm",),
}
METRIC_KEYS = tuple(metric for metrics in TASK_METRICS.values() for metric in metrics)  # the output's order
LLM_METRICS = ("dvc_llm", "vs_llm", "rc_llm")
UNKNOWN_SOURCE = "Unknown"

Embed = Callable[[list[str]], torch.Tensor]


@dataclass(frozen=True)
class JudgeRequest:
    """One caption pair for the judge: the prediction, the reference and the task."""

    prediction: str
    reference: str
    qa_type: str


Judge = Callable[[list[JudgeRequest]], Sequence[float | None]]


@dataclass(frozen=True)
class EvalRecord:
    """One prediction with its ground truth, as the official results file holds it.

    ``fps`` is the raw value the official code reads (``fps``, else ``metadata.fps``, else 1.0).
    """

    key: str
    qa_type: str
    data_source: str
    answer: str
    gnd: str
    question: str = ""
    struc_info: Any = None
    fps: Any = 1.0


@dataclass
class TaskResult:
    """Metrics of one task: ``overall`` and ``per_dataset`` map metric names to values
    (None = unavailable); ``evaluated`` counts the records that entered the metric,
    ``skipped`` lists (key, reason) of records the official code leaves out (not errors),
    ``malformed`` lists (key, reason) of records the official code would crash on."""

    overall: dict[str, float | None] = field(default_factory=dict)
    per_dataset: dict[str, dict[str, float | None]] = field(default_factory=dict)
    evaluated: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    malformed: list[tuple[str, str]] = field(default_factory=list)
    notes: dict[str, int] = field(default_factory=dict)


def official_task(qa_type: str) -> str | None:
    """The task the official evaluator scores a ``qa_type`` as, or None.

    Official quirk: each task script selects its records differently: cvs/skill by equality,
    the others by substring (``"tal" in qa_type.lower()``, ``"dc"`` counts as dense captioning,
    ``"video_summary" in qa_type`` case-sensitively, ...). This follows those rules.

    This is a second reading of ``qa_type`` on purpose: the leaderboard's numbers depend on
    which records each of its scripts picks up (``"TAL_v2"`` is scored as tal there, but is no
    task of :mod:`medgrpo.data.task_key`), so the metrics route records as the evaluator does,
    while training, rewards and statistics use :func:`medgrpo.data.task_key.task_of`.
    """
    lowered = qa_type.lower()
    if qa_type == "cvs_assessment":
        return "cvs_assessment"
    if qa_type == "skill_assessment":
        return "skill_assessment"
    if any(s in lowered for s in ("dense_captioning", "dense_caption", "dc")):
        return "dense_captioning"
    if "video_summary" in qa_type:
        return "video_summary"
    if "region_caption" in qa_type:
        return "region_caption"
    for task in ("next_action", "stg", "tal"):
        if task in lowered:
            return task
    return None


def llm_unit(score: float | None) -> float | None:
    """A 1-5 judge score on [0, 1]: (s - 1) / 4, as the leaderboard uses it when it averages tasks."""
    return None if score is None else (score - 1.0) / 4.0


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def _fps(value: Any) -> float:
    # Official: a string fps is converted with float(); anything else is used as is.
    if isinstance(value, str):
        try:
            fps = float(value)
        except ValueError:
            raise MalformedRecord(f"fps {value!r} is not a number") from None
    elif isinstance(value, (int, float)):
        fps = value
    else:
        raise MalformedRecord(f"fps {value!r} is not a number")
    # Not official: the official code scores every span 0 at fps 0 and compares NaNs at fps
    # NaN (a NaN-fps tal record scores 0); such a record is broken, not wrongly predicted.
    if not (_is_finite(fps) and fps > 0):
        raise MalformedRecord(f"fps {_short(value)} is not a positive finite number")
    return fps


def _is_finite(value: Any) -> bool:
    """False for NaN, infinities and integers past the float range; True for anything else."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, int):
        try:
            float(value)
        except OverflowError:
            return False
    return True


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:20]}...({len(text)} characters)"


def _check_finite(values: Iterable[Any], what: str) -> None:
    """MalformedRecord naming ``what`` when a ground-truth number is NaN or infinite.

    Not official: the official code computes with such values (a NaN tal span scores a
    perfect 1.0, a NaN stg box turns the mean into NaN); here the record is malformed.
    """
    values = list(values)
    if not all(_is_finite(v) for v in values):
        raise MalformedRecord(f"{what} {_short(values)} is not finite")


def _group(records: Iterable[EvalRecord]) -> dict[str, list[EvalRecord]]:
    groups: dict[str, list[EvalRecord]] = defaultdict(list)
    for record in records:
        groups[record.data_source].append(record)
    return dict(groups)


# --- tal ---------------------------------------------------------------------------------


def greedy_matched_ious(
    preds: Sequence[tuple[float, float]], gts: Sequence[tuple[float, float]], threshold: float
) -> list[float]:
    """IoUs of the official one-to-one greedy matching: each ground truth in order takes the
    not-yet-used prediction of highest IoU (first on ties); kept when it is >= ``threshold``."""
    used = [False] * len(preds)
    matched = []
    for gt in gts:
        best, best_j = 0.0, -1
        for j, pred in enumerate(preds):
            if used[j]:
                continue
            iou = span_iou(pred, gt)
            if iou > best:
                best, best_j = iou, j
        if best >= threshold and best_j >= 0:
            used[best_j] = True
            matched.append(best)
    return matched


def tal_record_miou(pred: Sequence[tuple[float, float]], gt: Sequence[tuple[float, float]], threshold: float) -> float:
    """Mean IoU of the matched spans of one record; 0.0 when nothing matches (or no spans)."""
    return _mean(greedy_matched_ious(pred, gt, threshold))


def tal_record_scores(record: EvalRecord) -> tuple[float, float]:
    """(mIoU@0.3, mIoU@0.5) of one tal record, as the official evaluator scores it."""
    fps = _fps(record.fps)
    spans = tal_gt_spans(record.struc_info)
    for span in spans:
        _check_finite(span, "ground-truth span")
    # Official quirk: spans are scaled to frames (x fps) before the IoU; this changes the
    # IoU only by rounding.
    pred = [(float(a * fps), float(b * fps)) for a, b in tal_spans(record.answer)]
    gt = [(float(a * fps), float(b * fps)) for a, b in spans]
    return tal_record_miou(pred, gt, 0.3), tal_record_miou(pred, gt, 0.5)


def tal_metrics(records: Sequence[EvalRecord]) -> TaskResult:
    """``tag_miou_03`` and ``tag_miou_05``: means over records (all datasets pooled)."""
    result = TaskResult()
    scores: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for record in records:
        try:
            scores[record.data_source].append(tal_record_scores(record))
        except MalformedRecord as error:
            result.malformed.append((record.key, str(error)))
    pooled = [s for values in scores.values() for s in values]
    result.evaluated = len(pooled)
    result.overall = _tal_summary(pooled)
    result.per_dataset = {ds: _tal_summary(values) for ds, values in scores.items()}
    return result


def _tal_summary(scores: Sequence[tuple[float, float]]) -> dict[str, float | None]:
    if not scores:
        return {"tag_miou_03": None, "tag_miou_05": None}
    return {"tag_miou_03": _mean([s[0] for s in scores]), "tag_miou_05": _mean([s[1] for s in scores])}


# --- stg ---------------------------------------------------------------------------------


def _stg_pred_for(boxes: StgBoxes, gt_keys: list) -> dict:
    if boxes.keyed:
        return dict(boxes.timed)
    # Official quirk: bare boxes are keyed by the ground truth's raw keys but looked up by
    # f"{float(key):.1f}", so they only count where the raw keys already read "<t>.<d>".
    return dict(zip(gt_keys, boxes.untimed))


def stg_record_miou(boxes: StgBoxes, gt: Mapping) -> float | None:
    """Mean box IoU over the ground-truth times of one record; None when no ground-truth
    box is valid (official: such a record is left out of the mean).

    Official rules: a time the prediction lacks (or whose box is [0, 0, 0, 0]) takes the
    box used at the previous ground-truth time; at the first time it stays [0, 0, 0, 0].
    """
    keys = list(gt.keys())
    pred = _stg_pred_for(boxes, keys)
    used: list[Sequence[float]] = []
    for i, key in enumerate(keys):
        try:
            lookup = f"{float(key):.1f}"
        except (TypeError, ValueError):
            raise MalformedRecord(f"stg time key {key!r} is not a number") from None
        box = pred.get(lookup, (0, 0, 0, 0))
        if list(box) == [0, 0, 0, 0] and i > 0:
            box = used[i - 1]
        used.append(box)
    # Official: pairs whose ground-truth box is not a list of 4 numbers are left out.
    pairs = [(key, p, g) for key, p, g in zip(keys, used, gt.values()) if is_box(g)]
    for key, _, box in pairs:
        _check_finite(box, f"ground-truth box at time {key!r}")
    ious = [box_iou(p, g) for _, p, g in pairs]
    return sum(ious) / len(ious) if ious else None


def stg_metrics(records: Sequence[EvalRecord]) -> TaskResult:
    """``stg_miou``: mean over records with a valid ground truth (all datasets pooled)."""
    result = TaskResult()
    scores: dict[str, list[float]] = defaultdict(list)
    for record in records:
        try:
            miou = stg_record_miou(stg_boxes(record.answer), stg_gt_boxes(record.struc_info))
        except MalformedRecord as error:
            result.malformed.append((record.key, str(error)))
            continue
        if miou is None:
            result.skipped.append((record.key, "no valid ground-truth box"))
        else:
            scores[record.data_source].append(miou)
    pooled = [s for values in scores.values() for s in values]
    result.evaluated = len(pooled)
    result.overall = {"stg_miou": _mean(pooled) if pooled else None}
    result.per_dataset = {ds: {"stg_miou": _mean(values)} for ds, values in scores.items()}
    return result


# --- dense captioning: temporal F1 -------------------------------------------------------


def _flatten(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The official overlap removal: when any two spans overlap, the predictions become the
    elementary intervals between consecutive distinct end points covered by some span."""
    ordered = sorted(spans)
    if not any(b[0] < a[1] for a, b in zip(ordered, ordered[1:])):
        return spans
    points = sorted({t for span in spans for t in span})
    return [(s, e) for s, e in zip(points, points[1:]) if any(a < e and b > s for a, b in spans)]


def interval_iou(a: tuple[float, float], b: tuple[float, float]) -> float:
    """Temporal IoU of the official dense-captioning F1: ends reordered, the union is the
    smaller of hull and summed lengths, and 1e-8 is added to it."""
    s1, e1 = min(a), max(a)
    s2, e2 = min(b), max(b)
    inter = max(0, min(e1, e2) - max(s1, s2))
    union = min(max(e1, e2) - min(s1, s2), e1 - s1 + e2 - s2)
    return float(inter) / (union + 1e-8)


def temporal_f1(
    pred: Sequence[tuple[float, float]], gt: Sequence[tuple[float, float]], thresholds: Sequence[float] = DVC_THRESHOLDS
) -> float:
    """F1 of the mean precision and mean recall over ``thresholds``; a prediction (ground
    truth) is covered when some ground truth (prediction) has IoU > threshold (many-to-many)."""
    precisions, recalls = [], []
    for threshold in thresholds:
        pairs = [(i, j) for i, p in enumerate(pred) for j, g in enumerate(gt) if interval_iou(p, g) > threshold]
        precisions.append(len({i for i, _ in pairs}) / max(float(len(pred)), 1.0))
        recalls.append(len({j for _, j in pairs}) / float(len(gt)))
    p, r = sum(precisions) / len(precisions), sum(recalls) / len(recalls)
    return 2 * r * p / (r + p) if (r + p) > 0 else 0.0


def _to_frame(value: float, fps: float) -> int:
    try:
        return int(value * fps)
    except (OverflowError, ValueError):
        raise MalformedRecord(f"time {value!r} x fps {fps!r} is not finite") from None


def _gt_seconds(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError, OverflowError):
        raise MalformedRecord(f"dense-captioning time {value!r} is not a number") from None


def dvc_record_f1(record: EvalRecord) -> float | None:
    """Temporal F1 of one dense-captioning record; None when the prediction or the ground
    truth has no event (official: left out of the mean, see :func:`dvc_metrics`)."""
    fps = _fps(record.fps)
    spans = [(e.start, e.end) for e in dense_events(record.answer)]
    # Official: times become frames, int(t * fps), truncated.
    pred = [(_to_frame(a, fps), _to_frame(b, fps)) for a, b in _flatten(spans)]
    gt = [
        (_to_frame(_gt_seconds(e["start"]), fps), _to_frame(_gt_seconds(e["end"]), fps))
        for e in dvc_gt_events(record.struc_info)
    ]
    if not pred or not gt:
        return None
    return temporal_f1(pred, gt)


def _count_weighted(values: Mapping[str, float | None], counts: Mapping[str, int]) -> float | None:
    available = [ds for ds, v in values.items() if v is not None]
    total = sum(counts[ds] for ds in available)
    if not available or total == 0:
        return None
    return sum(values[ds] * counts[ds] for ds in available) / total  # type: ignore[operator]


def dvc_metrics(records: Sequence[EvalRecord], judge: Judge | None = None) -> TaskResult:
    """``dvc_f1`` and ``dvc_llm``.

    Official quirk: per dataset, F1 is averaged over the records where both sides have
    events (a prediction with no parsable event is left out, not scored 0), but datasets
    are then pooled with weights = ALL their dense-captioning records. ``dvc_llm`` is
    pooled with the same weights.
    """
    result = TaskResult()
    f1s: dict[str, list[float]] = defaultdict(list)
    counts: dict[str, int] = defaultdict(int)
    scored: list[EvalRecord] = []
    for record in records:
        try:
            f1 = dvc_record_f1(record)
        except MalformedRecord as error:
            result.malformed.append((record.key, str(error)))
            continue
        counts[record.data_source] += 1
        scored.append(record)
        if f1 is None:
            result.skipped.append((record.key, "no predicted or no ground-truth event"))
        else:
            f1s[record.data_source].append(f1)
    result.evaluated = sum(len(v) for v in f1s.values())
    per_f1 = {ds: _mean(f1s.get(ds, [])) for ds in counts}
    llm = dvc_llm_scores(scored, judge, result.notes) if judge is not None else {ds: None for ds in counts}
    result.per_dataset = {ds: {"dvc_f1": per_f1[ds], "dvc_llm": llm.get(ds)} for ds in counts}
    result.overall = {"dvc_f1": _count_weighted(per_f1, counts), "dvc_llm": _count_weighted(llm, counts)}
    return result


# --- dense captioning: judge -------------------------------------------------------------


def caption_pairs_at(pred: Sequence[DenseEvent], gt: Sequence[dict], threshold: float) -> list[tuple[str, str]]:
    """(predicted caption, reference caption) pairs the official DVC judge scores at one
    threshold: each predicted event takes the reference event of highest IoU >= threshold
    (first on ties; several predictions may take the same reference)."""
    pairs = []
    for event in pred:
        best, caption = 0.0, None
        for g in gt:
            start, end = _gt_seconds(g["start"]), _gt_seconds(g["end"])
            inter = max(0, min(event.end, end) - max(event.start, start))
            union = (event.end - event.start) + (end - start) - inter
            iou = inter / union if union > 0 else 0.0
            if iou >= threshold and iou > best:
                best, caption = iou, g["caption"]
        if caption is not None:
            pairs.append((event.caption, str(caption)))
    return pairs


def dvc_llm_scores(records: Sequence[EvalRecord], judge: Judge, notes: dict[str, int]) -> dict[str, float | None]:
    """Per-dataset judge score of dense captions (1-5).

    Official: per threshold, the mean score of the matched pairs (0 without any); per
    dataset, the mean of the thresholds whose mean is > 0 (0 when none is). Official quirk
    kept: a dataset with no matched pair scores 0, and that 0 enters the pooled number.
    A dataset none of whose pairs the judge could score is reported as None instead.
    """
    requests: list[JudgeRequest] = []
    where: list[tuple[str, float]] = []
    datasets = {r.data_source for r in records}
    for record in records:
        pred = dense_events(record.answer)
        try:
            gt = dvc_gt_events(record.struc_info)
            for threshold in DVC_THRESHOLDS:
                for p, g in caption_pairs_at(pred, gt, threshold):
                    requests.append(JudgeRequest(p, g, "dense_captioning"))
                    where.append((record.data_source, threshold))
        except MalformedRecord:
            continue
    scores = list(judge(requests)) if requests else []
    by_key: dict[tuple[str, float], list[float]] = defaultdict(list)
    tried: dict[str, int] = defaultdict(int)
    for (ds, threshold), score in zip(where, scores):
        tried[ds] += 1
        if finite_number(score):
            by_key[(ds, threshold)].append(float(score))  # type: ignore[arg-type]
    notes["judge_requests"] = notes.get("judge_requests", 0) + len(requests)
    notes["judge_missing"] = notes.get("judge_missing", 0) + sum(not finite_number(s) for s in scores)
    out: dict[str, float | None] = {}
    for ds in datasets:
        if tried[ds] and not any(by_key[(ds, t)] for t in DVC_THRESHOLDS):
            out[ds] = None
            continue
        means = [_mean(by_key[(ds, t)]) for t in DVC_THRESHOLDS]
        out[ds] = _mean([m for m in means if m > 0])
    return out


# --- video summary / region caption ------------------------------------------------------


def caption_metrics(records: Sequence[EvalRecord], task: str, judge: Judge | None) -> TaskResult:
    """``vs_llm`` / ``rc_llm``: mean judge score (1-5) of the records, pooled over datasets.

    Official quirk: a record whose prediction (or reference) is empty is not judged at all
    (it does not count as a low score). Pairs the judge cannot score are left out.
    """
    name = {"video_summary": "vs_llm", "region_caption": "rc_llm"}[task]
    result = TaskResult()
    pairs = [r for r in records if r.answer and r.gnd]
    result.skipped = [(r.key, "empty prediction or reference") for r in records if not (r.answer and r.gnd)]
    if judge is None:
        result.overall = {name: None}
        result.per_dataset = {ds: {name: None} for ds in _group(records)}
        return result
    scores = list(judge([JudgeRequest(r.answer, r.gnd, task) for r in pairs])) if pairs else []
    valid: dict[str, list[float]] = defaultdict(list)
    for record, score in zip(pairs, scores):
        if finite_number(score):
            valid[record.data_source].append(float(score))
    result.notes = {"judge_requests": len(pairs), "judge_missing": sum(not finite_number(s) for s in scores)}
    pooled = [s for values in valid.values() for s in values]
    result.evaluated = len(pooled)
    result.overall = {name: _mean(pooled) if pooled else None}
    result.per_dataset = {ds: {name: _mean(valid[ds]) if valid.get(ds) else None} for ds in _group(records)}
    return result


# --- next action -------------------------------------------------------------------------


def _nap_groups(records: Sequence[EvalRecord]) -> dict[tuple[str, str | None], list[EvalRecord]]:
    groups: dict[tuple[str, str | None], list[EvalRecord]] = defaultdict(list)
    for record in records:
        procedure = nac.nurvid_procedure(record.question) if record.data_source == "NurViD" else None
        groups[(record.data_source, procedure)].append(record)
    return dict(groups)


def _nearest(texts: list[str], classes: Sequence[str], embed: Embed | None) -> list[int | None]:
    if embed is None:
        loose = {}
        for i, c in enumerate(classes):
            loose.setdefault(label_key(c), i)
        return [loose.get(label_key(t)) for t in texts]
    if not texts:
        return []
    sims = embed(texts).float() @ embed(list(classes)).float().T
    # torch.argmax returns the first maximal index, as the official torch argmax does.
    return [int(i) for i in torch.argmax(sims, dim=1).tolist()]


def _group_classes(dataset: str, procedure: str | None, records: Sequence[EvalRecord]) -> list[str]:
    """A class group's classes: the dataset's list (NurViD: the procedure's), else the sorted distinct ground truths."""
    classes = list(nac.action_classes(dataset, procedure))
    return classes or sorted({g for g in (nac.normalize_action(r.gnd, dataset) for r in records) if g})


class CachedEmbed:
    """An :data:`Embed` that embeds each text once: :meth:`add` many texts in one call, then look them up.

    :func:`nap_metrics` wraps its ``embed`` in one; pass one yourself to share the
    embeddings between several evaluations (the class lists repeat).
    """

    def __init__(self, embed: Embed) -> None:
        self.embed = embed
        self.rows: dict[str, torch.Tensor] = {}

    def add(self, texts: Iterable[str]) -> None:
        new = [t for t in dict.fromkeys(texts) if t not in self.rows]
        if new:
            self.rows.update(zip(new, self.embed(new)))

    def __call__(self, texts: list[str]) -> torch.Tensor:
        self.add(texts)
        return torch.stack([self.rows[t] for t in texts])


def nap_group_results(
    dataset: str, procedure: str | None, records: Sequence[EvalRecord], embed: Embed | None
) -> tuple[list[int], list[str], int]:
    """(1/0 per scored record, keys of records left out, unresolved count) of one class group.

    Official rules: classes are the dataset's list (NurViD: the procedure's), else the sorted
    distinct ground truths; a ground truth outside the list is left out; an answer equal
    (after strip, case-sensitive) to a class is that class, otherwise its nearest class.
    """
    classes = _group_classes(dataset, procedure, records)
    gts = [nac.normalize_action(r.gnd, dataset) for r in records]
    index = {c: i for i, c in enumerate(classes)}
    kept = [(r, g) for r, g in zip(records, gts) if g and g in index]
    left_out = [r.key for r, g in zip(records, gts) if not (g and g in index)]
    preds = [nac.normalize_action(r.answer, dataset) for r, _ in kept]
    pending = [p for p in preds if p not in index]
    nearest = dict(zip(pending, _nearest(pending, classes, embed)))
    hits, unresolved = [], 0
    for pred, (_, gt) in zip(preds, kept):
        choice = index[pred] if pred in index else nearest[pred]
        unresolved += choice is None
        hits.append(int(choice == index[gt]))
    return hits, left_out, unresolved


def nap_metrics(records: Sequence[EvalRecord], embed: Embed | None = None) -> TaskResult:
    """``nap_acc``: correct / scored records, all datasets pooled (official: per-dataset
    accuracies re-weighted by their counts)."""
    result = TaskResult()
    hits: dict[str, list[int]] = defaultdict(list)
    unresolved = 0
    groups = _nap_groups(records)
    if embed is not None:  # every class list and answer in one embedding call, not two per class group
        embed = cache = embed if isinstance(embed, CachedEmbed) else CachedEmbed(embed)
        answers = [nac.normalize_action(r.answer, r.data_source) for r in records]
        cache.add([c for key, group in groups.items() for c in _group_classes(*key, group)] + [a for a in answers if a])
    for (dataset, procedure), group in groups.items():
        group_hits, left_out, group_unresolved = nap_group_results(dataset, procedure, group, embed)
        hits[dataset].extend(group_hits)
        result.skipped.extend((key, "ground truth not in the class list") for key in left_out)
        unresolved += group_unresolved
    pooled = [h for values in hits.values() for h in values]
    result.evaluated = len(pooled)
    result.notes = {"unresolved": unresolved}
    result.overall = {"nap_acc": sum(pooled) / len(pooled) if pooled else None}
    result.per_dataset = {ds: {"nap_acc": _mean(v) if v else None} for ds, v in hits.items()}
    return result


# --- cvs and skill -----------------------------------------------------------------------


def balanced_accuracy(correct: Mapping[str, int], total: Mapping[str, int]) -> float:
    """Mean over classes (here: cvs components / skill aspects) of correct / total; 0.0
    without any. Official: called "balanced accuracy" though the classes are components."""
    rates = [correct.get(k, 0) / n for k, n in total.items() if n > 0]
    return sum(rates) / len(rates) if rates else 0.0


def _tally(pred: Mapping[str, Any], gt: Mapping[str, Any], correct: dict, total: dict) -> None:
    # Official quirk: a class the prediction does not name is left out (no penalty).
    compared = [name for name in gt if name in pred]
    if any(isinstance(gt[name], bool) or not isinstance(gt[name], (int, float)) for name in compared):
        # Official: the absolute error it also computes raises on a non-numeric score.
        raise MalformedRecord("ground-truth score is not a number")
    _check_finite([gt[name] for name in compared], "ground-truth scores")
    for name in compared:
        total[name] += 1
        correct[name] += int(pred[name] == gt[name])


def cvs_dataset_accuracy(records: Sequence[EvalRecord], malformed: list[tuple[str, str]]) -> float:
    """component_balanced_accuracy of one dataset's cvs records."""
    correct: dict[str, int] = defaultdict(int)
    total: dict[str, int] = defaultdict(int)
    for record in records:
        try:
            first = first_struc(record.struc_info)
        except MalformedRecord as error:
            malformed.append((record.key, str(error)))
            continue
        gt: Mapping[str, Any] = {}
        if first is not None:
            scores = first.get("cvs_scores", {})
            if not isinstance(scores, dict):
                malformed.append((record.key, "cvs_scores is not an object"))
                continue
            gt = {k: v for k, v in scores.items() if k in ("two_structures", "cystic_plate", "hepatocystic_triangle")}
        if not gt:
            gt = cvs_components(record.gnd)
        try:
            _tally(cvs_components(record.answer), gt, correct, total)
        except MalformedRecord as error:
            malformed.append((record.key, str(error)))
    return balanced_accuracy(correct, total)


def cvs_metrics(records: Sequence[EvalRecord]) -> TaskResult:
    """``cvs_acc``: per dataset, the mean per-component accuracy; then the mean over datasets
    (official: a macro average over datasets)."""
    result = TaskResult()
    for dataset, group in _group(records).items():
        result.per_dataset[dataset] = {"cvs_acc": cvs_dataset_accuracy(group, result.malformed)}
    result.evaluated = len(records) - len(result.malformed)
    values = [v["cvs_acc"] for v in result.per_dataset.values()]
    result.overall = {"cvs_acc": _mean(values) if values else None}  # type: ignore[arg-type]
    return result


_SKILL_LEVELS = {
    "novice": "novice",
    "beginner": "novice",
    "intermediate": "intermediate",
    "expert": "expert",
    "advanced": "expert",
    "n": "novice",
    "i": "intermediate",
    "e": "expert",
    "1": "novice",
    "2": "intermediate",
    "3": "expert",
    "low": "novice",
    "medium": "intermediate",
    "high": "expert",
    "poor": "novice",
    "good": "intermediate",
    "excellent": "expert",
}


def skill_level_of_code(code: str) -> str:
    """The official reading of a struc_info skill level: exact name, else the first key (in
    table order) contained in it (official quirk: any text with an "n" is "novice")."""
    text = code.strip().lower()
    if text in _SKILL_LEVELS:
        return _SKILL_LEVELS[text]
    return next((level for key, level in _SKILL_LEVELS.items() if key in text), text)


def skill_level_of_scores(text: str) -> str | None:
    """novice / intermediate / expert from the mean of all ``N/5`` in ``text`` (<= 2, <= 3.5)."""
    mean = parse_skill(text).value.mean
    if mean is None:
        return None
    return "novice" if mean <= 2.0 else "intermediate" if mean <= 3.5 else "expert"


def _skill_gt(record: EvalRecord) -> tuple[str | None, Mapping[str, Any]]:
    first = first_struc(record.struc_info)
    level = None
    if first is not None and first.get("skill_level", ""):
        code = first["skill_level"]
        if not isinstance(code, str):
            raise MalformedRecord("skill_level is not a string")
        level = skill_level_of_code(code) or None
    level = level or skill_level_of_scores(record.gnd)
    aspects = first.get("skill_scores", {}) if first is not None else {}
    if not isinstance(aspects, dict):
        raise MalformedRecord("skill_scores is not an object")
    return level, aspects or skill_aspects(record.gnd)


def skill_dataset_accuracy(records: Sequence[EvalRecord], result: TaskResult) -> float:
    """aspect_balanced_accuracy of one dataset's skill records.

    Official quirk: a record whose answer has no ``N/5`` at all, or whose ground-truth level
    cannot be read, is skipped entirely (an unparsable answer costs nothing).
    """
    correct: dict[str, int] = defaultdict(int)
    total: dict[str, int] = defaultdict(int)
    for record in records:
        if skill_level_of_scores(record.answer) is None:
            result.skipped.append((record.key, "no N/5 score in the answer"))
            continue
        try:
            level, gt = _skill_gt(record)
            if level is None:
                result.skipped.append((record.key, "ground-truth skill level unreadable"))
                continue
            _tally(skill_aspects(record.answer), gt, correct, total)
        except MalformedRecord as error:
            result.malformed.append((record.key, str(error)))
            continue
        result.evaluated += 1
    return balanced_accuracy(correct, total)


def skill_metrics(records: Sequence[EvalRecord]) -> TaskResult:
    """``sa_acc``: per dataset, the mean per-aspect accuracy; then the mean over datasets.

    The leaderboard's and the authors' first copy agree on this number; they differ in the
    secondary skill-level accuracy (the first copy counts skipped answers as wrong).
    """
    result = TaskResult()
    for dataset, group in _group(records).items():
        result.per_dataset[dataset] = {"sa_acc": skill_dataset_accuracy(group, result)}
    values = [v["sa_acc"] for v in result.per_dataset.values()]
    result.overall = {"sa_acc": _mean(values) if values else None}  # type: ignore[arg-type]
    return result


# --- all tasks ---------------------------------------------------------------------------


def evaluate_records(
    records: Sequence[EvalRecord], *, judge: Judge | None = None, embed: Embed | None = None
) -> dict[str, TaskResult]:
    """Every task's :class:`TaskResult`, keyed by task; records whose ``qa_type`` names no
    task are returned under ``"unknown"`` (as skipped)."""
    by_task: dict[str | None, list[EvalRecord]] = defaultdict(list)
    for record in records:
        by_task[official_task(record.qa_type)].append(record)
    runners: dict[str, Callable[[list[EvalRecord]], TaskResult]] = {
        "tal": tal_metrics,
        "stg": stg_metrics,
        "dense_captioning": lambda rs: dvc_metrics(rs, judge),
        "next_action": lambda rs: nap_metrics(rs, embed),
        "video_summary": lambda rs: caption_metrics(rs, "video_summary", judge),
        "region_caption": lambda rs: caption_metrics(rs, "region_caption", judge),
        "cvs_assessment": cvs_metrics,
        "skill_assessment": skill_metrics,
    }
    results = {task: runners[task](by_task[task]) for task in runners if by_task.get(task)}
    if by_task.get(None):
        results["unknown"] = TaskResult(skipped=[(r.key, f"unknown qa_type {r.qa_type!r}") for r in by_task[None]])
    return results
