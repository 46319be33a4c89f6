"""How differently the two RL arms weigh the same samples: their group advantages on the SFT rollouts.

Plain GRPO and MedGRPO differ only in the rewards their advantages come from (raw, or normalized per
key with the SFT statistics). Computed on the same sampled groups, the fit-norm rollouts of the SFT
model, the advantages of both arms say how much each key drives each arm's first updates (the mean
``|A|`` per key) and how alike the two arms' directions are (the correlation of their advantages per
key). With ``scale="group"`` a per-key map that is affine inside a group changes nothing, so only
the sigmoid's curvature (and its step on a key whose IQR is 0) can move the arms apart; with
``"batch"`` or ``"none"`` the reward scale of each key matters, which is the paper's argument.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from medgrpo.data.task_key import format_task_key
from medgrpo.ops.group_advantages import group_advantages


def _correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a - a.mean(), b - b.mean()
    denominator = float(a.norm() * b.norm())
    return float((a * b).sum()) / denominator if denominator > 0 else math.nan


def advantage_weights(rollouts_jsonl: Path, stats, *, group_size: int, scale: str) -> dict[str, dict[str, Any]]:
    """Per key: mean ``|A|`` of plain GRPO and of MedGRPO on the rollouts' groups, and their correlation.

    ``rollouts_jsonl`` is the fit-norm input (:func:`medgrpo.train.evaluation.write_rollout_jsonl`), its
    lines in groups of ``group_size`` consecutive completions of one record.
    """
    lines = [json.loads(line) for line in Path(rollouts_jsonl).read_text().splitlines() if line.strip()]
    rewards = torch.tensor([math.nan if e["reward"] is None else e["reward"] for e in lines], dtype=torch.float64)
    sources, qa_types = [e["data_source"] for e in lines], [e["qa_type"] for e in lines]
    rows = stats.indices(sources, qa_types, unknown="nan")
    plain = group_advantages(rewards, group_size=group_size, scale=scale)
    medgrpo = group_advantages(rewards, group_size=group_size, keys=rows, stats=stats.tensor().double(), scale=scale)
    keys = [format_task_key(s, q) for s, q in zip(sources, qa_types)]
    out = {}
    for key in sorted(set(keys)):
        mask = torch.tensor([k == key for k in keys])
        out[key] = {
            "grpo_mean_abs": float(plain[mask].abs().mean()),
            "medgrpo_mean_abs": float(medgrpo[mask].abs().mean()),
            "correlation": _correlation(plain[mask], medgrpo[mask]),
        }
    return out


__all__ = ["advantage_weights"]
