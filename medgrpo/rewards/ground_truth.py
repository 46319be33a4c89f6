"""A record's ground truth as the official MedVidBench evaluator reads it, and its IoUs.

The official metrics (:mod:`medgrpo.rewards.metrics`) and the RL rewards
(:mod:`medgrpo.rewards.task_rewards`) read ``struc_info`` with these functions, so a reference
means the same thing to both. Every place where the official code does something surprising
and these functions do the same is marked ``Official quirk``. Where the official code would
raise on a record, these raise :class:`MalformedRecord`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


class MalformedRecord(Exception):
    """A record the official evaluator could not score (it would raise)."""


def number(value: Any, what: str) -> float:
    """``value`` when it is an int or float; :class:`MalformedRecord` naming ``what`` otherwise."""
    if isinstance(value, (int, float)):
        return value
    raise MalformedRecord(f"{what} {value!r} is not a number")


def finite_number(value: Any) -> bool:
    """Whether ``value`` is an int or float (not a bool) that is finite as a float (an int past the float
    range is not)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def first_struc(struc_info: Any) -> dict | None:
    """``struc_info[0]`` when ``struc_info`` is a non-empty list, None when it is empty.

    Official: a non-list (a dict) or a non-object first item raises.
    """
    if not struc_info:
        return None
    if not isinstance(struc_info, list):
        raise MalformedRecord("struc_info is not a list")
    if not isinstance(struc_info[0], dict):
        raise MalformedRecord("struc_info[0] is not an object")
    return struc_info[0]


# --- tal ---------------------------------------------------------------------------------


def tal_gt_spans(struc_info: Any) -> list[tuple[float, float]]:
    """The ground-truth (start, end) spans of a tal record, in seconds.

    Official: the spans are every ``spans`` list of the items of a list ``struc_info``; any
    other ``struc_info`` gives no spans (the record then scores 0).
    """
    spans: list[tuple[float, float]] = []
    if not isinstance(struc_info, list):
        return spans
    for item in struc_info:
        if not isinstance(item, dict):
            # Official: `"spans" in item` on a string or list item is a membership test;
            # it only fails (raises) when that test is true or impossible.
            if isinstance(item, (str, list)) and "spans" not in item:
                continue
            raise MalformedRecord(f"struc_info item {item!r} is not an object")
        if "spans" not in item:
            continue
        if not isinstance(item["spans"], list):
            raise MalformedRecord("struc_info spans is not a list")
        for span in item["spans"]:
            if not isinstance(span, dict) or "start" not in span or "end" not in span:
                raise MalformedRecord(f"bad span {span!r}")
            spans.append((number(span["start"], "span start"), number(span["end"], "span end")))
    return spans


def span_iou(a: tuple[float, float], b: tuple[float, float]) -> float:
    """Temporal IoU of the official TAL code: intersection over the hull of both spans.

    Official quirk: the "union" is max(end) - min(start) (the hull), equal to the union
    only for overlapping spans (disjoint spans score 0 anyway), and spans are not
    reordered, so a reversed span (start > end) never overlaps anything.
    """
    inter = max(0, min(a[1], b[1]) - max(a[0], b[0]))
    union = max(a[1], b[1]) - min(a[0], b[0])
    return inter / union if union > 0 else 0.0


# --- stg ---------------------------------------------------------------------------------


def stg_gt_boxes(struc_info: Any) -> dict:
    """The ground-truth ``{time: box}`` object of an stg record (``bbox_dict`` or the item itself)."""
    if isinstance(struc_info, list) and struc_info:
        item = struc_info[0]
        gt = item["bbox_dict"] if isinstance(item, dict) and "bbox_dict" in item else item
    elif isinstance(struc_info, dict):
        gt = struc_info.get("bbox_dict", struc_info)
    else:
        gt = {}
    if not isinstance(gt, dict):
        raise MalformedRecord("stg ground truth is not an object of boxes")
    return gt


def is_box(box: Any) -> bool:
    """Whether ``box`` is what the official STG code accepts as a box: a list of 4 numbers."""
    return isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)


def box_iou(pred: Sequence[float], gt: Sequence[float]) -> float:
    """Box IoU as the official STG code computes it: the union is clipped below at 1e-6
    (so empty boxes score 0) and boxes are not reordered (NaN propagates like numpy's)."""
    inter_w = _clip0(min(pred[2], gt[2]) - max(pred[0], gt[0]))
    inter_h = _clip0(min(pred[3], gt[3]) - max(pred[1], gt[1]))
    inter = inter_w * inter_h
    union = (pred[2] - pred[0]) * (pred[3] - pred[1]) + (gt[2] - gt[0]) * (gt[3] - gt[1]) - inter
    return inter / (1e-6 if union < 1e-6 else union)


def _clip0(value: float) -> float:
    return 0.0 if value < 0 else value


# --- dense captioning --------------------------------------------------------------------


def dvc_gt_events(struc_info: Any) -> list[dict]:
    """The ground-truth events of a dense-captioning record: objects with start, end and caption.

    Official: ``[[events]]``, ``[{"dc_segments": events}]`` or ``[events...]``; anything else
    is ignored.
    """
    if isinstance(struc_info, list) and struc_info:
        first = struc_info[0]
        if isinstance(first, list):
            events = first
        elif isinstance(first, dict) and "dc_segments" in first:
            events = first["dc_segments"]
        else:
            events = struc_info
    else:
        events = struc_info
    if not isinstance(events, list):
        return []
    return [e for e in events if isinstance(e, dict) and "start" in e and "end" in e and "caption" in e]


__all__ = [
    "MalformedRecord",
    "box_iou",
    "dvc_gt_events",
    "first_struc",
    "is_box",
    "number",
    "span_iou",
    "stg_gt_boxes",
    "tal_gt_spans",
]
