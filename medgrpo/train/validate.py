"""Every user mistake in a loaded config, found before the model loads or the output directory is touched.

:func:`validate` returns one line per problem, each naming its field, all of them at once (a run
that stops for the first would make the user fix them one run at a time). It reads what it needs
cheaply: that paths exist and are of the right kind, the first bytes of the records file, the
statistics file, whether DALI is importable; nothing is written. :func:`medgrpo.train.loop.train`
calls it first and raises :class:`~medgrpo.train.config.ConfigError` with the problems;
``medgrpo train`` prints them, one line each, and exits with status 2.
"""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path

from medgrpo.train.config import TrainConfig
from medgrpo.train.data import DataConfig

DALI_INSTALL = "pip install nvidia-dali-cuda120 (or medgrpo's [video] extra)"


def validate(config: TrainConfig) -> list[str]:
    """The problems of ``config`` that would stop or silently spoil a run, one line each (empty: none)."""
    problems = _model_problems(config.model.path)
    problems += _data_problems(config.data)
    problems += _run_problems(config)
    if config.mode == "grpo":
        problems += _grpo_problems(config)
    else:
        problems += _positive(
            ("sft.batch_size", config.sft.batch_size), ("sft.micro_batch_size", config.sft.micro_batch_size)
        )
    problems += _output_problems(config.output_dir)
    return problems


def _model_problems(path: str) -> list[str]:
    if not path:
        return ["model.path is not set: give a local Hugging Face directory of a Qwen2.5-VL model"]
    directory = Path(path)
    if not directory.exists():
        return [f"model.path: no such directory: {path} (models load from local directories only)"]
    if not directory.is_dir():
        return [f"model.path: {path} is not a directory"]
    if not (directory / "config.json").is_file():
        return [f"model.path: {path} holds no config.json: not a Hugging Face model directory"]
    return []


def _data_problems(data: DataConfig) -> list[str]:
    problems = _records_file_problems("data.train_file", data.train_file, required=True)
    if data.eval_file:
        problems += _records_file_problems("data.eval_file", data.eval_file, required=False)
    if data.root and not Path(data.root).is_dir():
        problems.append(f"data.root: no such directory: {data.root}")
    if data.loader == "dali" and not _dali_installed():
        problems.append(
            f"data.loader is dali but NVIDIA DALI is not installed: {DALI_INSTALL}, or decode on the CPU "
            "with data.loader=cpu"
        )
    problems += _positive(("data.max_length", data.max_length), ("data.max_frames", data.max_frames))
    if data.num_workers < 0:
        problems.append(f"data.num_workers must be >= 0, got {data.num_workers}")
    return problems


def _records_file_problems(name: str, path: str, *, required: bool) -> list[str]:
    if not path:
        return [f"{name} is not set: give a MedVidBench records file (JSONL or JSON)"] if required else []
    file = Path(path)
    if not file.exists():
        return [f"{name}: no such file: {path}"]
    if not file.is_file():
        return [f"{name}: {path} is not a file"]
    try:
        empty = _blank(file)
    except OSError as error:
        return [f"{name}: cannot read {path}: {error.strerror or error}"]
    return [f"{name}: {path} holds no records (the file is empty)"] if empty else []


def _blank(path: Path) -> bool:
    """Whether the file holds nothing but whitespace (read until its first other byte)."""
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 16):
            if chunk.strip(b" \t\r\n\xef\xbb\xbf"):
                return False
    return True


def _dali_installed() -> bool:
    try:
        return importlib.util.find_spec("nvidia.dali") is not None
    except ImportError:  # no "nvidia" package at all
        return False


def _run_problems(config: TrainConfig) -> list[str]:
    problems = []
    for name in ("steps", "log_every", "eval_every", "save_every"):
        if getattr(config, name) < 0:
            problems.append(f"{name} must be >= 0, got {getattr(config, name)}")
    if config.keep_checkpoints < 1:
        problems.append(f"keep_checkpoints must be >= 1, got {config.keep_checkpoints}")
    lr = config.optim.lr
    if not (math.isfinite(lr) and lr >= 0):
        problems.append(f"optim.lr must be a finite number >= 0, got {lr}")
    if math.isnan(config.optim.max_grad_norm):
        problems.append("optim.max_grad_norm is nan: give a number (0 or less: no clipping)")
    return problems


def _grpo_problems(config: TrainConfig) -> list[str]:
    g = config.grpo
    problems = _positive(("grpo.prompts_per_step", g.prompts_per_step), ("grpo.micro_batch_size", g.micro_batch_size))
    if g.rollout.group_size == 1:
        problems.append(
            "grpo.rollout.group_size is 1: a group-relative advantage r - mean(group) is 0 with one completion "
            "per prompt, whatever grpo.scale (group, batch or none), so MedGRPO would train nothing; "
            "use at least 2 (the paper: 8)"
        )
    max_length = config.data.max_length
    if max_length is not None and max_length <= g.rollout.max_new_tokens:
        problems.append(
            f"data.max_length {max_length} leaves no room for a prompt besides "
            f"grpo.rollout.max_new_tokens {g.rollout.max_new_tokens}"
        )
    if g.norm_stats:
        problems += _norm_stats_problems(g.norm_stats)
    return problems


def _norm_stats_problems(path: str) -> list[str]:
    from medgrpo.rewards.norm_stats import load_norm_stats

    if not Path(path).is_file():
        return [f"grpo.norm_stats: no such file: {path} (write it with medgrpo fit-norm; empty: raw rewards)"]
    try:
        load_norm_stats(path)
    except (OSError, ValueError, KeyError, TypeError) as error:
        reason = error.strerror if isinstance(error, OSError) else str(error) or type(error).__name__
        return [f"grpo.norm_stats: {path} is not a statistics file of medgrpo fit-norm: {reason}"]
    return []


def _positive(*fields: tuple[str, int | None]) -> list[str]:
    """A problem for each ``(name, value)`` whose value is set and < 1."""
    return [f"{name} must be >= 1, got {value}" for name, value in fields if value is not None and value < 1]


def _output_problems(output_dir: str) -> list[str]:
    path = Path(output_dir)
    if path.exists():
        if not path.is_dir():
            return [f"output_dir: {output_dir} exists and is not a directory"]
        return [] if os.access(path, os.W_OK | os.X_OK) else [f"output_dir: {output_dir} is not writable"]
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        return [f"output_dir: cannot create {output_dir}: {parent} is a file"]
    if not os.access(parent, os.W_OK | os.X_OK):
        return [f"output_dir: cannot create {output_dir}: {parent} is not writable"]
    return []


__all__ = ["DALI_INSTALL", "validate"]
