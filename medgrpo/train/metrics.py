"""What a step reports and where it goes: the metrics log (JSONL, TensorBoard, progress line), per-key
reward means, the reward-curve figure, peak memory."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)


@dataclass
class StepResult:
    """What a training step reports: its metrics (device tensors until logged), whether the optimizer
    stepped, and (GRPO) each completion's key with its raw and normalized reward."""

    metrics: dict[str, Any]
    stepped: bool
    reward_rows: tuple[list[str], torch.Tensor, torch.Tensor] | None = None  # keys, raw and normalized rewards


def as_number(value: Any) -> Any:
    """A logged value on the host (tensors read here, once per logged step)."""
    if isinstance(value, torch.Tensor):
        value = value.detach().float().item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def as_numbers(metrics: dict[str, Any]) -> dict[str, Any]:
    """:func:`as_number` of every value, the tensors read in one transfer per device (not one sync each)."""
    names_on: dict[torch.device, list[str]] = {}
    for name, value in metrics.items():
        if isinstance(value, torch.Tensor):
            names_on.setdefault(value.device, []).append(name)
    values = dict(metrics)
    for names in names_on.values():
        read = torch.stack([metrics[name].detach().float().reshape(()) for name in names]).tolist()
        values.update(zip(names, read))
    return {name: as_number(value) for name, value in values.items()}


class MetricsLog:
    """Per-step JSONL metrics, TensorBoard scalars when available, and a progress line with ETA.

    A run that starts at ``start_step`` (resumed from that step's checkpoint, or 0) owns every step
    after it: rows of later steps already in ``metrics.jsonl`` (written before a crash, by the steps
    now run again) are dropped when the log opens (:func:`truncate_metrics`), and TensorBoard purges
    its events from ``start_step + 1`` on (``SummaryWriter(purge_step=...)``), so each step has one
    row and one point.
    """

    def __init__(self, directory: Path, total_steps: int, enabled: bool, start_step: int = 0):
        self.enabled, self.total, self.start_step = enabled, total_steps, start_step
        self.start = time.perf_counter()
        self.path = directory / "metrics.jsonl"
        self.writer = None
        if enabled:
            directory.mkdir(parents=True, exist_ok=True)
            truncate_metrics(self.path, start_step)
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(directory / "tensorboard"), purge_step=start_step + 1)
            except ImportError:
                logger.info("tensorboard is not installed: metrics go to %s only", self.path)

    def log(self, step: int, metrics: dict[str, Any]) -> dict[str, Any]:
        row = {"step": step, **as_numbers(metrics)}
        if not self.enabled:
            return row
        with open(self.path, "a") as handle:
            handle.write(json.dumps(row) + "\n")
        if self.writer is not None:
            for name, value in row.items():
                if isinstance(value, (int, float)) and name != "step":
                    self.writer.add_scalar(name, value, step)
        self._progress(step, row)
        return row

    def _progress(self, step: int, row: dict[str, Any]) -> None:
        done = step - self.start_step
        elapsed = time.perf_counter() - self.start
        eta = elapsed / max(done, 1) * (self.total - step)
        shown = " ".join(
            f"{k}={row[k]:.4g}" for k in ("loss", "reward_raw", "reward_norm") if isinstance(row.get(k), (int, float))
        )
        sys.stderr.write(f"\r{progress_bar(step, self.total)} {shown} eta {eta:5.0f}s ")
        if step == self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def progress_bar(done: int, total: int, width: int = 24) -> str:
    """``[#####.....] done/total``: the bar the trainer and the demo draw."""
    filled = width * min(done, total) // max(total, 1)
    return f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total}"


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of a metrics log, in order (none if it does not exist); a line that is not a JSON object
    (torn by a crash mid-write) is left out and logged."""
    if not path.is_file():
        return []
    rows = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
        elif line.strip():
            logger.warning("%s line %d is not a metrics row (a write cut short?): left out", path, number)
    return rows


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the rows of ``path`` up to ``step``: written to a temporary file, renamed over it (atomic)."""
    if not path.is_file():
        return
    kept = [row for row in read_metrics(path) if row["step"] <= step]
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as handle:
        handle.write("".join(json.dumps(row) + "\n" for row in kept))
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def plot_reward_curves(rows: list[dict[str, Any]], path: Path) -> Path | None:
    """PNG of the mean raw and normalized reward per key (data_source/qa_type) against the step."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.info("matplotlib is not installed: no reward-curve figure")
        return None
    series: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        for name, value in row.items():
            if name.startswith("reward_norm/") and value is not None:
                series.setdefault(name.split("/", 1)[1], []).append((row["step"], value))
    if not series:
        return None
    figure, axis = plt.subplots(figsize=(7, 4))
    for key, points in sorted(series.items()):
        axis.plot(*zip(*points), label=key)
    axis.set_xlabel("step")
    axis.set_ylabel("mean normalized reward")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def mean_finite(values: Sequence[float]) -> float:
    """The mean of the finite values (NaN when there is none)."""
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else float("nan")


def per_key_means(keys: Sequence[str], values: Sequence[float]) -> dict[str, float]:
    """Each key's :func:`mean_finite` of its values (``keys[i]`` is the key of ``values[i]``), keys sorted."""
    groups: dict[str, list[float]] = {}
    for key, value in zip(keys, values):
        groups.setdefault(key, []).append(value)
    return {key: mean_finite(groups[key]) for key in sorted(groups)}


def reward_means(rows: tuple[list[str], torch.Tensor, torch.Tensor]) -> dict[str, float]:
    """``reward_raw/<key>`` and ``reward_norm/<key>`` means of a step's rewards (keys without a finite
    reward left out); read on the host, so only on logged steps."""
    keys, raw, normalized = rows
    raw, normalized = torch.stack([raw.float(), normalized.float()]).tolist()  # one read of both
    columns = {"reward_raw": per_key_means(keys, raw), "reward_norm": per_key_means(keys, normalized)}
    means = {}
    for key in columns["reward_raw"]:
        for name, column in columns.items():
            if math.isfinite(column[key]):
                means[f"{name}/{key}"] = column[key]
    return means


def peak_memory(device: torch.device) -> dict[str, float]:
    """Peak device memory (CUDA allocator), or the process's peak resident memory on the CPU."""
    if device.type == "cuda":
        return {"peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30}
    import resource

    return {"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}  # Linux: KiB


__all__ = [
    "MetricsLog",
    "StepResult",
    "as_number",
    "as_numbers",
    "mean_finite",
    "peak_memory",
    "per_key_means",
    "plot_reward_curves",
    "progress_bar",
    "read_metrics",
    "reward_means",
    "truncate_metrics",
]
