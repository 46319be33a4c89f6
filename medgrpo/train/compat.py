"""Every bridge between transformers / FSDP2 releases the trainer needs, in one place.

Differences are detected by looking at what an object offers (signatures, attributes), never at
version numbers, so a release that back-ports a change is handled too. When a range of releases
is no longer supported, its branch here is what to delete.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

import torch
from torch import nn

# Where the text decoder and the vision tower sit: transformers 5.x first, then the 4.x layouts.
LANGUAGE_MODEL_PATHS = ("model.language_model", "language_model", "model")
VISION_TOWER_PATHS = ("model.visual", "visual")


def _parameter_names(method: Callable) -> frozenset[str]:
    """The names a function or bound method takes, read once per function (asked for every step)."""
    return _function_parameter_names(getattr(method, "__func__", method))


@functools.cache
def _function_parameter_names(function: Callable) -> frozenset[str]:
    return frozenset(inspect.signature(function).parameters)


def rope_index_takes_token_types(get_rope_index: Callable) -> bool:
    """Whether Qwen2.5-VL's ``get_rope_index`` takes ``mm_token_type_ids`` (transformers 5.x on)."""
    return "mm_token_type_ids" in _parameter_names(get_rope_index)


def cache_keyword(decoder: nn.Module) -> str:
    """The language model's KV-cache argument: ``past_key_values`` up to transformers 5.2x, ``cache`` after."""
    return "cache" if "cache" in _parameter_names(decoder.forward) else "past_key_values"


def enable_activation_checkpointing(model: nn.Module, **kwargs) -> None:
    """transformers' activation checkpointing with ``kwargs`` for ``torch.utils.checkpoint``.

    ``activation_checkpointing_enable`` from transformers 5.2x on; ``gradient_checkpointing_enable``
    (deprecated there) before.
    """
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def flash_attention_implementations() -> tuple[str, ...]:
    """The flash-attention implementations transformers' own checks find installed and usable, best first.

    ``is_flash_attn_3_available`` / ``is_flash_attn_2_available`` look at the installed distribution's
    name, so the flash-attn 4 wheel (which also installs a ``flash_attn`` package) does not count as
    flash-attn 2. Releases without a check count as not having that implementation.
    """
    from transformers.utils import import_utils

    checks = (("flash_attention_3", "is_flash_attn_3_available"), ("flash_attention_2", "is_flash_attn_2_available"))
    return tuple(name for name, check in checks if getattr(import_utils, check, lambda: False)())


def last_hidden_state(output) -> torch.Tensor:
    """The hidden states of a decoder's output: a ``ModelOutput`` or, from older releases, a tuple."""
    return output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]


def full_tensor(value: torch.Tensor) -> torch.Tensor:
    """A plain tensor: FSDP2 returns DTensors (e.g. the gradient norm over the shards); others pass through."""
    return value.full_tensor() if hasattr(value, "full_tensor") else value


def unsharded_class_name(model: nn.Module) -> str:
    """The model's own class name: FSDP2 makes a subclass named ``FSDP<name>``, which older transformers
    releases write into the exported config's ``architectures``."""
    from torch.distributed.fsdp import FSDPModule

    cls = type(model)
    if isinstance(model, FSDPModule):
        cls = next(base for base in cls.__bases__ if base is not FSDPModule)
    return cls.__name__


__all__ = [
    "LANGUAGE_MODEL_PATHS",
    "VISION_TOWER_PATHS",
    "cache_keyword",
    "enable_activation_checkpointing",
    "flash_attention_implementations",
    "full_tensor",
    "last_hidden_state",
    "rope_index_takes_token_types",
    "unsharded_class_name",
]
