"""Attention layouts for the language model, through transformers' own ``AttentionInterface``.

Hugging Face decoder layers call ``ALL_ATTENTION_FUNCTIONS[config._attn_implementation]`` with
the layer's query, key and value (after rope, before any GQA repeat) and whatever the text model
was given as its attention mask. medgrpo registers one function, :data:`LAYOUT_ATTENTION`, that
hands the work to the mask itself when the mask is an :class:`AttentionLayout` (a shared-prefix
training batch, a static decoding cache, ...). :func:`layout_attention` switches the language
model to it for a block with the public ``set_attn_implementation`` and switches back afterwards;
:func:`layout_mask` wraps a layout as the per-layer-type mask mapping the text model accepts in
place of a tensor. The vision tower keeps its own implementation; nothing in transformers is patched.

Activation checkpointing recomputes each layer's forward during backward: run the backward inside
the same :func:`layout_attention` block as the forward it differentiates.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Protocol, runtime_checkable

import torch
from torch import nn

LAYOUT_ATTENTION = "medgrpo_layout"
_MASK_KEYS = ("full_attention", "sliding_attention")


@runtime_checkable
class AttentionLayout(Protocol):
    """What a layout mask does in place of the model's attention kernel."""

    def attend(
        self, module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, scaling: float
    ) -> torch.Tensor:
        """Attention of one layer.

        Args:
            module: the Hugging Face attention module (``module.layer_idx`` names the layer).
            query: ``(B, heads, L, head_dim)``; key, value: ``(B, kv_heads, L, head_dim)`` (not repeated for GQA).
            scaling: the softmax scale (``head_dim ** -0.5``).

        Returns:
            ``(B, L, heads, head_dim)``, the layout Hugging Face attention functions return.
        """
        ...


def _layout_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: object,
    scaling: float | None = None,
    dropout: float = 0.0,
    **_: object,
) -> tuple[torch.Tensor, None]:
    if not isinstance(attention_mask, AttentionLayout):
        raise TypeError(
            f"the {LAYOUT_ATTENTION!r} attention implementation needs an AttentionLayout mask (layout_mask(...)), "
            f"got {type(attention_mask).__name__}; run plain forwards outside layout_attention()"
        )
    if dropout:
        raise ValueError("layout attention has no dropout (Qwen2.5-VL trains with attention_dropout = 0)")
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    return attention_mask.attend(module, query, key, value, scaling=scale), None


def register_layout_attention() -> None:
    """Register :data:`LAYOUT_ATTENTION` with transformers (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(LAYOUT_ATTENTION, _layout_attention_forward)


def _text_config(model: nn.Module):
    return model.config.get_text_config()


@contextlib.contextmanager
def layout_attention(model: nn.Module) -> Iterator[None]:
    """Run the language model of ``model`` on :class:`AttentionLayout` masks for the block.

    Uses ``model.set_attn_implementation({"text_config": ...})`` and restores the previous
    implementation on exit. Every forward of the language model inside the block must be given a
    :func:`layout_mask`.
    """
    register_layout_attention()
    previous = _text_config(model)._attn_implementation
    if previous == LAYOUT_ATTENTION:  # nested: the outer block restores
        yield
        return
    model.set_attn_implementation({"text_config": LAYOUT_ATTENTION})
    try:
        yield
    finally:
        model.set_attn_implementation({"text_config": previous})


def layout_mask(layout: AttentionLayout) -> dict[str, AttentionLayout]:
    """The mask mapping the text model takes instead of a mask tensor (one entry per layer type)."""
    return {name: layout for name in _MASK_KEYS}


__all__ = [
    "LAYOUT_ATTENTION",
    "AttentionLayout",
    "layout_attention",
    "layout_mask",
    "register_layout_attention",
]
