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
- ``MANIFEST.json``: the size and SHA-256 of every file above, written after them;
- ``COMPLETE``: a JSON marker (step, world size), written last.

Atomicity: everything is written into ``step_000123.tmp/``, every file is fsynced, the manifest
and then the marker are written and fsynced, and only then is the directory renamed to
``step_000123/`` (``rename`` is atomic on POSIX file systems) and its parent fsynced. A crash at
any point leaves either a ``.tmp`` directory or a directory without its marker;
:func:`latest_checkpoint` ignores both, and the next save of that step, or pruning, removes the
leftovers.

Integrity: a complete checkpoint can still rot or be cut short later (a flipped block, a copy
that stopped). :func:`verify_checkpoint` checks every file against the manifest (sizes first,
then the hashes, each file read once, several at a time); :func:`latest_valid_checkpoint` is the
newest checkpoint that verifies, with what was wrong with the newer ones, by file name; and
:func:`load_checkpoint` verifies before it reads. Under torch.distributed the ranks share the
hashing (rank r hashes every world-size-th file) and gather the verdict, so every rank takes the
same decision. A checkpoint written before manifests existed loads unverified, with a warning.

A full disk during a save raises :class:`CheckpointWriteError` (an ``OSError`` with ``errno``
ENOSPC) saying "no space left on device" and the path, on every rank, and the partial
``.tmp`` directory is removed; an unreadable or cut file at load raises
:class:`CheckpointError` naming it.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import hashlib
import json
import logging
import os
import pickle
import random
import re
import shutil
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medgrpo.train import compat
from medgrpo.train.distributed import all_ranks, barrier, is_distributed, rank, world_size

logger = logging.getLogger(__name__)

COMPLETE = "COMPLETE"
MANIFEST = "MANIFEST.json"
MANIFEST_FORMAT = "medgrpo-checkpoint-manifest"
TRAINER_STATE = "trainer_state.pt"
_STEP_DIR = re.compile(r"^step_(\d+)$")
_HASH_CHUNK = 8 << 20  # bytes per read while hashing: large reads let hashlib release the GIL
_HASH_THREADS = 4  # files hashed at once per rank


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: the message names the checkpoint and the files."""


class CheckpointWriteError(OSError):
    """A checkpoint that could not be written (``errno`` ENOSPC when the disk is full)."""


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


# --- integrity: manifest, verification, write errors -------------------------------------------


def checkpoint_files(path: str | os.PathLike) -> list[str]:
    """The files of a checkpoint directory (POSIX paths relative to it, sorted), manifest and marker excluded."""
    root = Path(path)
    names = (f.relative_to(root).as_posix() for f in root.rglob("*") if f.is_file())
    return sorted(name for name in names if name not in (MANIFEST, COMPLETE))


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read once in large chunks (hashlib releases the GIL on them)."""
    digest = hashlib.sha256()
    buffer = bytearray(_HASH_CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as handle:
        while n := handle.readinto(buffer):
            digest.update(view[:n])
    return digest.hexdigest()


def _hash_files(root: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """``{name: {"size", "sha256"}}`` of files under ``root``, several files at a time."""
    if not names:
        return {}

    def entry(name: str) -> dict[str, Any]:
        path = root / name
        return {"size": path.stat().st_size, "sha256": file_sha256(path)}

    with ThreadPoolExecutor(min(_HASH_THREADS, len(names)), thread_name_prefix="medgrpo-sha256") as pool:
        return dict(zip(names, pool.map(entry, names)))


def _write_json_durably(obj: Any, path: Path) -> None:
    with open(path, "w") as handle:
        json.dump(obj, handle, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())


def _manifest(tmp: Path) -> dict[str, Any]:
    """The manifest of a checkpoint being saved; every rank hashes its share of the files (collective)."""
    names = all_ranks(checkpoint_files(tmp) if rank() == 0 else None)[0]
    error, mine = None, {}
    try:
        mine = _hash_files(tmp, names[rank() :: world_size()])
    except OSError as exc:
        error = exc
    _agree_on_failure(error, tmp)
    files = {name: entry for part in all_ranks(mine) for name, entry in part.items()}
    return {"format": MANIFEST_FORMAT, "version": 1, "algorithm": "sha256", "files": files}


def _problems_with(path: Path, names: list[str], manifest: dict[str, Any]) -> list[str]:
    """What is wrong with the files ``names`` of a checkpoint: missing, another size, another hash."""
    problems, sized = [], []
    expected = manifest["files"]
    for name in names:  # sizes first: free to check, and a cut file is not worth hashing
        try:
            size = (path / name).stat().st_size
        except OSError as error:
            problems.append(f"{name}: cannot read ({error.strerror or error})")
            continue
        if size == expected[name]["size"]:
            sized.append(name)
        else:
            cut = "truncated" if size < expected[name]["size"] else "grown"
            problems.append(f"{name}: {size} bytes, {expected[name]['size']} written ({cut})")
    try:
        digests = _hash_files(path, sized)
    except OSError as error:
        return problems + [f"cannot read a file: {error}"]
    for name in sized:
        if digests[name]["sha256"] != expected[name]["sha256"]:
            problems.append(f"{name}: SHA-256 differs from the manifest (corrupted)")
    return problems


def _read_manifest(path: Path) -> tuple[dict[str, Any] | None, list[str]]:
    """(manifest, problems); (None, []) for a checkpoint written before manifests."""
    file = path / MANIFEST
    if not file.exists():
        return None, []
    try:
        manifest = json.loads(file.read_text())
        files = manifest["files"]
        if manifest.get("format") != MANIFEST_FORMAT or not all(
            isinstance(e, dict) and isinstance(e.get("size"), int) and isinstance(e.get("sha256"), str)
            for e in files.values()
        ):
            raise ValueError("not a checkpoint manifest")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        return None, [f"{MANIFEST}: unreadable ({error})"]
    return manifest, []


def verify_checkpoint(path: str | os.PathLike) -> list[str]:
    """What is wrong with a complete checkpoint, one line per bad file (empty: it verifies).

    Checks every file the manifest lists: present, of the size written, of the SHA-256
    written (each file read once). Files the manifest does not list are not checked. A
    checkpoint without a manifest (written before manifests) has nothing to check: [] and
    a warning. Under torch.distributed every rank must call it: each hashes its share of
    the files and all get the same list.
    """
    path = Path(path)
    manifest, problems = _read_manifest(path)
    if manifest is None and not problems:
        logger.warning("%s has no %s (written by an older medgrpo): it is not verified", path, MANIFEST)
        return []
    if manifest is not None:
        names = sorted(manifest["files"])
        problems = _problems_with(path, names[rank() :: world_size()], manifest)
    return [problem for part in all_ranks(problems) for problem in part]


def latest_valid_checkpoint(directory: str | os.PathLike) -> tuple[Path | None, list[str]]:
    """The newest complete checkpoint under ``directory`` that verifies, and what was wrong with newer ones.

    Returns ``(path, problems)``: ``path`` None when no checkpoint verifies (or there is
    none); ``problems`` one line per bad file of every newer checkpoint skipped, e.g.
    ``"step_000004/__0_0.distcp: SHA-256 differs from the manifest (corrupted)"``. Under
    torch.distributed every rank must call it, and all get the same answer.
    """
    problems: list[str] = []
    for path in reversed(list_checkpoints(directory)):
        bad = verify_checkpoint(path)
        if not bad:
            return path, problems
        problems += [f"{path.name}/{problem}" for problem in bad]
    return None, problems


def _dcp_error() -> type[BaseException]:
    """DCP's CheckpointException (a BaseException holding each rank's error), imported when needed."""
    from torch.distributed.checkpoint.api import CheckpointException

    return CheckpointException


def _underlying(error: BaseException) -> Iterator[BaseException]:
    """``error``, the per-rank errors of a DCP CheckpointException, and their causes."""
    seen: set[int] = set()
    todo = [error]
    while todo:
        exc = todo.pop()
        if exc is None or id(exc) in seen:
            continue
        seen.add(id(exc))
        yield exc
        failures = getattr(exc, "failures", None)
        if isinstance(failures, dict):
            todo += [pair[0] for pair in failures.values() if isinstance(pair, tuple) and pair]
        todo += [exc.__cause__, exc.__context__]


def _no_space(error: BaseException) -> bool:
    """Whether a write failed for want of space: ENOSPC (or EDQUOT), or torch.save's zip writer failing."""
    for exc in _underlying(error):
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(exc)
        if "No space left on device" in text or "enforce fail at inline_container.cc" in text:
            return True
    return False


def _free_bytes(path: Path) -> str:
    try:
        stat = os.statvfs(path if path.exists() else path.parent)
    except OSError:
        return "free space unknown"
    return f"{stat.f_bavail * stat.f_frsize / 2**20:.1f} MiB free"


def _agree_on_failure(error: BaseException | None, tmp: Path) -> None:
    """Raise on every rank if a write failed on any (collective), so no rank waits for the others forever.

    A full disk becomes :class:`CheckpointWriteError` ("no space left on device" and the
    path) and rank 0 removes the partial ``tmp`` directory; another error is re-raised where
    it happened and reported as a :class:`CheckpointError` on the other ranks.
    """
    failures = all_ranks(None if error is None else (_no_space(error), f"{type(error).__name__}: {error}"))
    failed = [(index, f) for index, f in enumerate(failures) if f is not None]
    if not failed:
        return
    if any(no_space for _, (no_space, _) in failed):
        if rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        barrier()  # removed before any rank goes on
        raise CheckpointWriteError(
            errno.ENOSPC, f"no space left on device: cannot write the checkpoint ({_free_bytes(tmp)})", str(tmp)
        ) from error
    if error is not None:
        raise error
    failed_rank, (_, reason) = failed[0]
    raise CheckpointError(f"saving {tmp} failed on rank {failed_rank}: {reason.splitlines()[0]}")


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
    error: BaseException | None = None
    try:
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
    except (OSError, RuntimeError, _dcp_error()) as exc:
        error = exc
    _agree_on_failure(error, tmp)  # also the barrier: every rank's files are written
    manifest = _manifest(tmp)
    error = None
    if this_rank == 0:
        try:
            _publish(tmp, final, {"step": step, "world_size": world_size()}, manifest)
            if keep is not None:
                prune_checkpoints(root, keep)
        except OSError as exc:
            error = exc
    _agree_on_failure(error, tmp)
    return final


def _publish(tmp: Path, final: Path, marker: dict[str, Any], manifest: dict[str, Any]) -> None:
    """Make ``tmp`` durable, write its manifest, mark it complete, and rename it to ``final`` (atomic)."""
    _fsync_tree(tmp)
    _write_json_durably(manifest, tmp / MANIFEST)
    _write_json_durably(marker, tmp / COMPLETE)
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
    verify: bool = True,
) -> dict[str, Any]:
    """Restore a checkpoint in place; every rank must call it.

    The model (and optimizer) must already be built as when saving (sharded the same way or
    not at all: DCP reshards across world sizes). RNG states are those of this rank; with a
    different world size, ranks without a saved state keep theirs (logged). With ``verify``
    the files are first checked against the manifest (:func:`verify_checkpoint`; pass False
    for a path :func:`latest_valid_checkpoint` just returned).

    Returns:
        The ``extra_state`` dict given to :func:`save_checkpoint`.

    Raises:
        CheckpointError: the checkpoint fails verification, or a file cannot be read (the
            message names the checkpoint and the files).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

    path = Path(path)
    if not is_complete(path):
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {COMPLETE} marker)")
    if verify:
        problems = verify_checkpoint(path)
        if problems:
            raise CheckpointError(f"checkpoint {path} fails verification: {'; '.join(problems)}")
    state = _dcp_state(model, optimizer)
    if state:
        try:
            with _quiet_single_process():
                dcp.load(state, checkpoint_id=str(path), no_dist=not is_distributed())
        except (OSError, RuntimeError, ValueError, _dcp_error()) as error:
            raise CheckpointError(
                f"checkpoint {path}: cannot read the model/optimizer shards: {_reason(error)}"
            ) from None
        if optimizer is None:
            set_model_state_dict(model, state["model"])
        else:
            set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    trainer_state = _load_file(path / TRAINER_STATE)
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
    set_rng_state(_load_file(file))


def _load_file(file: Path) -> Any:
    """``torch.load`` of one checkpoint file; :class:`CheckpointError` naming it if it cannot be read."""
    try:
        return torch.load(file, weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as error:
        raise CheckpointError(f"checkpoint file {file} cannot be read: {_reason(error)}") from None


def _reason(error: BaseException) -> str:
    """The innermost error's type and first line (a DCP CheckpointException holds each rank's)."""
    inner = next((e for e in _underlying(error) if not isinstance(e, _dcp_error())), error)
    lines = str(inner).strip().splitlines()
    return f"{type(inner).__name__}: {lines[0] if lines else ''}"


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
    "CheckpointError",
    "CheckpointWriteError",
    "checkpoint_files",
    "checkpoint_name",
    "checkpoint_step",
    "export_hf",
    "file_sha256",
    "is_complete",
    "latest_checkpoint",
    "latest_valid_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "prune_checkpoints",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
    "verify_checkpoint",
]
