"""Argument checks shared by the public ops: clear errors that name the argument.

Shape, dtype and device checks read only metadata and always run. Checks on tensor
*values* (key and group-id ranges, stats order) would force a host sync on a GPU, so
they run only for CPU tensors, or everywhere when ``MEDGRPO_CHECK_VALUES=1``; on the
GPU the kernels degrade safely instead (an out-of-range key gives a NaN reward, an
out-of-range group id leaves the member out with advantage 0).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor


def _values_checkable(t: Tensor) -> bool:
    if torch.compiler.is_compiling():
        return False
    return t.device.type == "cpu" or os.environ.get("MEDGRPO_CHECK_VALUES", "0") == "1"


def check_tensor(name: str, t: object) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def check_floating(name: str, t: Tensor) -> None:
    check_tensor(name, t)
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")


def check_integer(name: str, t: Tensor) -> None:
    check_tensor(name, t)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got dtype {t.dtype}")


def check_shape(name: str, t: Tensor, shape: Sequence[int], what: str = "") -> None:
    if tuple(t.shape) != tuple(shape):
        hint = f" ({what})" if what else ""
        raise ValueError(f"{name} must have shape {tuple(shape)}{hint}, got {tuple(t.shape)}")


def check_same_device(reference_name: str, reference: Tensor, **others: Optional[Tensor]) -> None:
    for name, t in others.items():
        if t is not None and t.device != reference.device:
            raise ValueError(f"{name} is on {t.device} but {reference_name} is on {reference.device}")


def check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(repr(c) for c in choices)}; got {value!r}")


def check_index_range(name: str, t: Tensor, upper: int, upper_name: str) -> None:
    """Values of ``t`` must lie in [0, upper) (checked where that costs no host sync)."""
    if t.numel() == 0 or not _values_checkable(t):
        return
    low, high = (int(v) for v in torch.aminmax(t))
    if low < 0 or high >= upper:
        raise ValueError(f"{name} must lie in [0, {upper}) ({upper_name}); found values in [{low}, {high}]")


def check_stats(stats: Tensor) -> None:
    """stats is (K, 3) floating with p25 <= p50 <= p75 per row."""
    check_floating("stats", stats)
    if stats.dim() != 2 or stats.shape[1] != 3:
        raise ValueError(f"stats must have shape (K, 3) with columns (p25, p50, p75), got {tuple(stats.shape)}")
    if stats.numel() and _values_checkable(stats):
        ordered = (stats[:, 0] <= stats[:, 1]) & (stats[:, 1] <= stats[:, 2])
        if not bool(ordered.all()):
            bad = int((~ordered).nonzero()[0, 0])
            raise ValueError(f"stats row {bad} is not ordered p25 <= p50 <= p75: {stats[bad].tolist()}")
