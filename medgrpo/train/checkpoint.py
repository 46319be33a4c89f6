"""Resumable checkpoints (torch.distributed.checkpoint) and the final Hugging Face export.

A checkpoint is a directory ``step_000123/`` holding

- ``model`` and ``optimizer`` state written by torch.distributed.checkpoint (DCP): every rank
  writes its own shards in parallel, and a load may use another world size. The state dicts come
  from ``torch.distributed.checkpoint.state_dict.get_state_dict`` with parameter names (not
  optimizer ids), so one code path serves an FSDP2-sharded model and a plain one-process model;
- ``trainer_state.pt`` (rank 0): the LR scheduler, the caller's ``extra_state`` (sampler
  position, metrics, anything made of Python values and tensors) and the step;
- ``rng/rank_00000.pt`` … (every rank): the Python, NumPy, torch CPU and CUDA generators, so a
  resumed run draws the same random numbers as an uninterrupted one;
- ``COMPLETE``: a JSON marker (step, world size), written last.

Atomicity: everything is written into ``step_000123.tmp/``, every file is fsynced, the marker is
written and fsynced, and only then is the directory renamed to ``step_000123/`` (``rename`` is
atomic on POSIX file systems) and its parent fsynced. A crash at any point leaves either a
``.tmp`` directory or a directory without its marker; :func:`latest_checkpoint` ignores both, and
the next save of that step, or pruning, removes the leftovers.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import random
import re
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medgrpo.train import compat
from medgrpo.train.distributed import barrier, is_distributed, rank, world_size

logger = logging.getLogger(__name__)

COMPLETE = "COMPLETE"
TRAINER_STATE = "trainer_state.pt"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def checkpoint_name(step: int) -> str:
    """Directory name of the checkpoint of ``step`` (``step_000123``)."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return f"step_{step:06d}"


@contextlib.contextmanager
def _quiet_single_process() -> Iterator[None]:
    """DCP warns on every one-process save/load that it assumes one process: that is the intent here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """fsync every file under ``root`` and every directory (so new entries are durable)."""
    for directory, _, files in os.walk(root):
        for name in files:
            _fsync_path(Path(directory) / name)
        _fsync_path(Path(directory))


def _save_file(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        torch.save(obj, handle)
        handle.flush()
        os.fsync(handle.fileno())


def rng_state() -> dict[str, Any]:
    """This process's random generators: Python, NumPy, torch CPU and (if any) CUDA."""
    name, keys, position, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        # As a tensor, so the file loads with weights_only=True.
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore generators saved by :func:`rng_state`."""
    random.setstate(_as_tuples(state["python"]))
    numpy = state["numpy"]
    np.random.set_state(
        (
            numpy["name"],
            numpy["keys"].numpy().astype(np.uint32),
            numpy["pos"],
            numpy["has_gauss"],
            numpy["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuples(value: Any) -> Any:
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def _dcp_state(model: nn.Module | None, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if model is None:
        return {}
    if optimizer is None:
        return {"model": get_model_state_dict(model)}
    model_state, optimizer_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optimizer": optimizer_state}


def save_checkpoint(
    directory: str | os.PathLike,
    step: int,
    *,
    model: nn.Module | None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    extra_state: dict[str, Any] | None = None,
    keep: int | None = None,
) -> Path:
    """Write the checkpoint of ``step`` atomically under ``directory``; every rank must call it.

    Args:
        directory: the run's checkpoint folder (created if missing).
        step: the number of optimizer steps done; names the checkpoint.
        model, optimizer: saved with DCP (sharded FSDP2 or plain).
        scheduler: anything with ``state_dict()`` (an LR scheduler), saved by rank 0.
        extra_state: Python values and tensors (sampler position, counters), saved by rank 0.
        keep: after saving, delete all but the newest ``keep`` complete checkpoints (None keeps all).

    Returns:
        The path of the complete checkpoint.
    """
    import torch.distributed.checkpoint as dcp

    if keep is not None and keep < 1:
        raise ValueError(f"keep must be >= 1 or None, got {keep}")
    root = Path(directory)
    final, tmp = root / checkpoint_name(step), root / f"{checkpoint_name(step)}.tmp"
    this_rank = rank()
    if this_rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in (tmp, final):  # leftovers of a crashed save of this step, or a save being replaced
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    barrier()
    state = _dcp_state(model, optimizer)
    if state:
        with _quiet_single_process():
            dcp.save(state, checkpoint_id=str(tmp), no_dist=not is_distributed())
    _save_file(rng_state(), tmp / "rng" / f"rank_{this_rank:05d}.pt")
    if this_rank == 0:
        trainer_state = {
            "step": step,
            "scheduler": None if scheduler is None else scheduler.state_dict(),
            "extra_state": dict(extra_state or {}),
        }
        _save_file(trainer_state, tmp / TRAINER_STATE)
    barrier()
    if this_rank == 0:
        _publish(tmp, final, {"step": step, "world_size": world_size()})
        if keep is not None:
            prune_checkpoints(root, keep)
    barrier()
    return final


def _publish(tmp: Path, final: Path, marker: dict[str, Any]) -> None:
    """Make ``tmp`` durable, mark it complete, and rename it to ``final`` (atomic)."""
    _fsync_tree(tmp)
    with open(tmp / COMPLETE, "w") as handle:
        json.dump(marker, handle)
        handle.flush()
        os.fsync(handle.fileno())
    _fsync_path(tmp)
    os.rename(tmp, final)
    _fsync_path(final.parent)


def is_complete(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a finished checkpoint (named ``step_N``, with its marker)."""
    path = Path(path)
    return path.is_dir() and _STEP_DIR.match(path.name) is not None and (path / COMPLETE).is_file()


def list_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """The complete checkpoints under ``directory``, oldest first."""
    root = Path(directory)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if is_complete(p)]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint under ``directory`` (incomplete and ``.tmp`` ones ignored), or None."""
    found = list_checkpoints(directory)
    return found[-1] if found else None


def checkpoint_step(path: str | os.PathLike) -> int:
    """The step a complete checkpoint was saved at."""
    path = Path(path)
    if not is_complete(path):
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {COMPLETE} marker)")
    return int(json.loads((path / COMPLETE).read_text())["step"])


def prune_checkpoints(directory: str | os.PathLike, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` complete checkpoints, and unfinished ones older than those kept.

    Returns:
        The deleted paths.
    """
    root = Path(directory)
    complete = list_checkpoints(root)
    removed = complete[:-keep] if len(complete) > keep else []
    oldest_kept = int(_STEP_DIR.match(complete[-keep].name).group(1)) if len(complete) >= keep else None
    for path in root.iterdir() if oldest_kept is not None else ():
        match = re.match(r"^step_(\d+)(\.tmp)?$", path.name)
        if path.is_dir() and match and int(match.group(1)) < oldest_kept and not is_complete(path):
            removed.append(path)
    for path in removed:
        shutil.rmtree(path)
    return removed


def load_checkpoint(
    path: str | os.PathLike,
    *,
    model: nn.Module | None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    restore_rng: bool = True,
) -> dict[str, Any]:
    """Restore a checkpoint in place; every rank must call it.

    The model (and optimizer) must already be built as when saving (sharded the same way or
    not at all: DCP reshards across world sizes). RNG states are those of this rank; with a
    different world size, ranks without a saved state keep theirs (logged).

    Returns:
        The ``extra_state`` dict given to :func:`save_checkpoint`.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

    path = Path(path)
    if not is_complete(path):
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {COMPLETE} marker)")
    state = _dcp_state(model, optimizer)
    if state:
        with _quiet_single_process():
            dcp.load(state, checkpoint_id=str(path), no_dist=not is_distributed())
        if optimizer is None:
            set_model_state_dict(model, state["model"])
        else:
            set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    trainer_state = torch.load(path / TRAINER_STATE, weights_only=True)
    if scheduler is not None:
        if trainer_state["scheduler"] is None:
            raise ValueError(f"{path} has no scheduler state, but a scheduler was given")
        scheduler.load_state_dict(trainer_state["scheduler"])
    if restore_rng:
        _restore_rng(path)
    return trainer_state["extra_state"]


def _restore_rng(path: Path) -> None:
    file = path / "rng" / f"rank_{rank():05d}.pt"
    if not file.is_file():
        logger.warning(
            "%s has no RNG state for rank %d (saved with another world size); keeping the current one", path, rank()
        )
        return
    set_rng_state(torch.load(file, weights_only=True))


def export_hf(model: nn.Module, tokenizer, out_dir: str | os.PathLike, *, dtype: torch.dtype | None = None) -> Path:
    """Save ``model`` (sharded or not) and ``tokenizer`` as a Hugging Face directory; every rank must call it.

    The full state dict is gathered to rank 0's CPU (``full_state_dict=True, cpu_offload=True``),
    which writes safetensors with ``save_pretrained`` plus the tokenizer. ``from_pretrained(out_dir)``
    loads it.

    Args:
        dtype: cast floating-point weights to it (e.g. ``torch.bfloat16`` for fp32 master weights).

    Returns:
        ``out_dir``.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    out = Path(out_dir)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options)
    if rank() == 0:
        if dtype is not None:
            state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(str(out), state_dict=state, safe_serialization=True)
        # The architecture name, whichever transformers wrote it (older ones keep FSDP2's "FSDP" prefix).
        config = copy.deepcopy(model.config)
        config.architectures = [compat.unsharded_class_name(model)]
        if dtype is not None:
            config.dtype = dtype
        config.save_pretrained(str(out))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(out))
    barrier()
    return out


__all__ = [
    "checkpoint_name",
    "checkpoint_step",
    "export_hf",
    "is_complete",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "prune_checkpoints",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
]
