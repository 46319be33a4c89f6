"""Trainer configuration: the components' own config dataclasses, loaded from YAML, overridden by dotted keys.

A config file mirrors :class:`TrainConfig`: one YAML mapping per section, nested as the dataclasses
nest (``grpo.rollout``, ``grpo.loss``, ``data.decode``, ``rewards.judge``). Unknown keys are errors (a
typo must not fall back to a default). Overrides are dotted paths parsed as YAML scalars
(``grpo.rollout.group_size=4``, ``optim.lr=1e-6``, ``rewards.judge=null``), checked against the field
types. :func:`describe_fields` lists every field with its default and help (``medgrpo train --help``).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
import types
import typing
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medgrpo.rewards.task_rewards import RewardConfig
from medgrpo.train.data import DataConfig
from medgrpo.train.grpo import GRPOConfig
from medgrpo.train.model import ModelConfig
from medgrpo.train.optim import OptimConfig
from medgrpo.train.sft import SFTConfig


def _trainer_model() -> ModelConfig:
    # The trainer's defaults: a 7B model needs activation checkpointing, and MedGRPO trains the language model only.
    return ModelConfig(path="", activation_checkpointing=True, freeze_vision=True)


@dataclass
class TrainConfig:
    """Everything a run needs; ``mode`` picks SFT or MedGRPO.

    Attributes:
        mode: "sft" or "grpo".
        output_dir: the run's directory: config.json, metrics.jsonl, checkpoints/, final/ (the exported model).
        seed: seeds Python, NumPy and torch (offset by rank), the sampler and the rollouts.
        steps: optimizer steps of the run (a resumed run continues up to it).
        log_every: write metrics every this many steps (and at the last).
        eval_every: score data.eval_file every this many steps; 0: never.
        save_every: checkpoint every this many steps (and at the last); 0: at the last only.
        keep_checkpoints: complete checkpoints kept (older ones are deleted).
        resume: continue from the newest complete checkpoint under output_dir.
        device: "auto" (CUDA when present), "cuda" or "cpu".
        model: the policy.
        data: the records and their loader.
        optim: the optimizer.
        grpo: the MedGRPO step (mode "grpo").
        sft: the SFT step (mode "sft").
        rewards: the rewards (GRPO, and evaluation in either mode).
    """

    mode: str = "grpo"
    output_dir: str = "runs/medgrpo"
    seed: int = 0
    steps: int = 100
    log_every: int = 1
    eval_every: int = 0
    save_every: int = 50
    keep_checkpoints: int = 2
    resume: bool = False
    device: str = "auto"
    model: ModelConfig = field(default_factory=_trainer_model)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    rewards: RewardConfig = field(default_factory=RewardConfig)

    def __post_init__(self) -> None:
        if self.mode not in ("sft", "grpo"):
            raise ValueError(f"mode must be 'sft' or 'grpo', got {self.mode!r}")


class ConfigError(ValueError):
    """A config file or override that does not fit :class:`TrainConfig`, or a config a run cannot use:
    ``problems`` holds one line per problem (the message joins them)."""

    def __init__(self, *problems: str):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


# ------------------------------------------------------------------------------------------ loading
def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def _optional(kind: Any) -> tuple[Any, bool]:
    """``(T, True)`` for ``T | None``, else ``(kind, False)``."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        options = typing.get_args(kind)
        if type(None) in options:
            return next(k for k in options if k is not type(None)), True
    return kind, False


def _coerce(value: Any, kind: Any, where: str, base: Any = None) -> Any:
    kind, optional = _optional(kind)
    if value is None and optional:
        return None
    if dataclasses.is_dataclass(kind):
        return _build(kind, value, where, base)
    if typing.get_origin(kind) is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        _, value_kind = typing.get_args(kind)
        return {str(k): _coerce(v, value_kind, f"{where}.{k}") for k, v in value.items()}
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is float and isinstance(value, str):
        try:  # YAML 1.1 reads 1e-6 (no dot) and nan as strings
            return float(value)
        except ValueError:
            pass
    if kind is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: expected {getattr(kind, '__name__', kind)}, got {value!r}")
    return value


def _build(cls: type, raw: Any, where: str, base: Any = None) -> Any:
    """``cls`` from the mapping ``raw``: fields not given keep ``base``'s values (the parent's default)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {raw!r}")
    kinds = _field_types(cls)
    unknown = sorted(set(raw) - set(kinds))
    if unknown:
        raise ConfigError(f"{where or 'config'}: unknown field(s) {unknown}; known: {sorted(kinds)}")
    values, problems = {}, []
    for name in raw:  # every field, so that all the problems are listed at once
        try:
            values[name] = _coerce(raw[name], kinds[name], f"{where}.{name}".lstrip("."), getattr(base, name, None))
        except ConfigError as error:
            problems += error.problems
    if problems:
        raise ConfigError(*problems)
    missing = [f.name for f in dataclasses.fields(cls) if f.init and f.name not in values and _required(f)]
    if base is None and missing:
        raise ConfigError(f"{where or 'config'}: missing field(s) {missing}")
    try:
        return cls(**values) if base is None else dataclasses.replace(base, **values)
    except ValueError as error:
        raise ConfigError(f"{where or 'config'}: {error}") from error


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _apply_override(raw: dict[str, Any], override: str) -> None:
    import yaml

    if "=" not in override:
        raise ConfigError(f"override {override!r} is not of the form section.field=value")
    dotted, text = override.split("=", 1)
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError as error:
        raise ConfigError(f"override {override!r}: malformed YAML value: {_yaml_problem(error)}") from None
    try:
        set_dotted(raw, dotted, value)
    except ConfigError as error:
        raise ConfigError(f"override {override!r}: {error}") from None


def set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``raw``'s field ``dotted`` (``"grpo.rollout.group_size"``) to ``value`` in place, creating missing
    sections; a name without a dot sets a top-level field or a whole section."""
    *sections, name = dotted.strip().split(".")
    target = raw
    for section in sections:
        if target.get(section) is None:
            target[section] = {}
        target = target[section]
        if not isinstance(target, dict):
            raise ConfigError(f"{section} is not a section")
    target[name] = value


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """A :class:`TrainConfig` from a YAML file (or the defaults) and dotted ``key=value`` overrides.

    Raises:
        ConfigError: an unknown field, a wrong type, or a malformed override, naming the field.
    """
    import yaml

    raw: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path) as handle:
                loaded = yaml.safe_load(handle)
        except OSError as error:
            raise ConfigError(f"--config {path}: {error.strerror or error}") from None
        except yaml.YAMLError as error:
            raise ConfigError(f"--config {path}: malformed YAML: {_yaml_problem(error)}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a YAML mapping at the top level")
        raw = loaded or {}
    problems = []
    for override in overrides:
        try:
            _apply_override(raw, override)
        except ConfigError as error:
            problems += error.problems
    if problems:
        raise ConfigError(*problems)
    return config_from_dict(raw)


def _yaml_problem(error: Exception) -> str:
    """One line: where the YAML breaks and why (PyYAML's message spans several lines)."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return where + " ".join(str(problem).split())


def config_from_dict(raw: dict[str, Any]) -> TrainConfig:
    """A :class:`TrainConfig` from plain data shaped like the YAML (sections as nested mappings).

    Raises:
        ConfigError: an unknown field or a wrong type, naming the field.
    """
    return _build(TrainConfig, raw, "", TrainConfig())


def config_to_dict(config: TrainConfig) -> dict[str, Any]:
    """The config as plain data (for the run directory and the metrics log)."""
    return dataclasses.asdict(config)


# --------------------------------------------------------------------------------------------- help
_ROLE = re.compile(r":[a-z]+:`(~?)([^`]+)`")


def _plain(text: str) -> str:
    """One line of plain text from reST: ``:role:`~a.b``` → ``b``, ``:role:`a.b``` → ``a.b``, literals unquoted."""
    text = _ROLE.sub(lambda m: m.group(2).rsplit(".", 1)[-1] if m.group(1) else m.group(2), text)
    return " ".join(text.replace("``", "").split())


def attribute_docs(cls: type) -> dict[str, str]:
    """Field help from the "Attributes:" section of ``cls``'s docstring (``a, b: text`` documents both)."""
    docs: dict[str, list[str]] = {}
    lines = (inspect.getdoc(cls) or "").splitlines()
    if "Attributes:" not in lines:
        return {}
    current: list[str] = []
    for line in lines[lines.index("Attributes:") + 1 :]:
        if line and not line.startswith(" "):
            break
        entry = re.match(r"^    (\w+(?:, \w+)*): (.*)$", line)
        if entry:
            current = [entry.group(2)]
            for name in entry.group(1).split(", "):
                docs[name] = current
        elif line.strip():
            current.append(line.strip())
    return {name: _plain(" ".join(text)) for name, text in docs.items()}


def _shown(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (str, dict)) else "null" if value is None else str(value).lower()


def config_fields(cls: type = TrainConfig, base: Any = None, prefix: str = "") -> Iterator[tuple[str, str, str]]:
    """``(dotted name, default, help)`` of every field of ``cls``, sections followed by their fields."""
    base = cls() if base is None and cls is TrainConfig else base
    kinds, docs = _field_types(cls), attribute_docs(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        kind, _ = _optional(kinds[f.name])
        default = getattr(base, f.name) if base is not None else _default(f)
        name = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(kind):
            yield name, "(section)" if default is not None else "null", docs.get(f.name)
            yield from config_fields(kind, default, f"{name}.")
        else:
            yield name, "(required)" if default is dataclasses.MISSING else _shown(default), docs.get(f.name)


def _default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def describe_fields() -> str:
    """Every config field with its default and help, in plain text (``medgrpo train --help``)."""
    lines = ["config fields (YAML sections, or dotted overrides such as grpo.rollout.group_size=8):", ""]
    for name, default, text in config_fields():
        lines += [f"  {name} = {default}", f"      {text}"]
    return "\n".join(lines)


__all__ = [
    "ConfigError",
    "TrainConfig",
    "attribute_docs",
    "config_fields",
    "config_from_dict",
    "config_to_dict",
    "describe_fields",
    "load_config",
    "set_dotted",
]
