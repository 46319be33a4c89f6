"""A static KV cache for rollouts: sized once, written in place, the prompt's keys and values stored once per group.

A rollout decodes ``G`` completions of each of ``B`` prompts. Hugging Face's ``DynamicCache`` grows
by concatenation every step and holds the prompt's keys and values ``G`` times (one copy per row);
:class:`StaticKVCache` instead allocates, per layer,

- ``prompt_keys`` / ``prompt_values``: ``(B, kv_heads, P, head_dim)``, one copy per prompt, read by
  the G rows of its group (group-major rows: ``b*G .. b*G+G-1`` are prompt ``b``'s);
- ``completion_keys`` / ``completion_values``: ``(B*G, kv_heads, T, head_dim)``, one column per step;

plus ``prompt_valid`` ``(B, P)``, False at left padding. Both enter the decoder layers through the
attention interface of :mod:`medgrpo.train.attention`, as two :class:`AttentionLayout` objects:

- :class:`PrefillLayout` writes a layer's prompt keys and values (right-aligned: a bucket longer than
  the batch's prompts adds left padding) and computes causal attention over the left-padded prompts;
- :class:`DecodeLayout` writes one step's keys and values at column ``step`` and attends over the
  row's group's prompt (masked where padded) and its own completion up to ``step``: two blocks of
  scores merged by one joint softmax (:func:`grouped_decode_attention`), so the G rows of a group
  read one copy of the prompt's KV and nothing is repeated.

No Hugging Face ``Cache`` object is involved: the layers are run with ``cache=None``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class StaticKVCache:
    """Per-layer key/value buffers of one rollout shape (see the module docstring).

    Attributes:
        prompt_keys, prompt_values: per layer ``(B, kv_heads, P, head_dim)``.
        prompt_valid: ``(B, P)`` bool, False at (left) padding.
        completion_keys, completion_values: per layer ``(B*G, kv_heads, T, head_dim)``.
    """

    prompt_keys: list[torch.Tensor]
    prompt_values: list[torch.Tensor]
    prompt_valid: torch.Tensor
    completion_keys: list[torch.Tensor]
    completion_values: list[torch.Tensor]

    @classmethod
    def allocate(
        cls,
        text_config,
        *,
        prompts: int,
        group_size: int,
        prompt_length: int,
        new_tokens: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> StaticKVCache:
        """Zeroed buffers for ``prompts`` x ``group_size`` rows, ``prompt_length`` + ``new_tokens`` positions.

        ``text_config`` is the language model's config (``model.config.get_text_config()``).
        """
        layers = text_config.num_hidden_layers
        kv_heads = text_config.num_key_value_heads
        head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
        prompt_shape = (prompts, kv_heads, prompt_length, head_dim)
        completion_shape = (prompts * group_size, kv_heads, new_tokens, head_dim)
        new = lambda shape: [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        return cls(
            prompt_keys=new(prompt_shape),
            prompt_values=new(prompt_shape),
            prompt_valid=torch.zeros(prompts, prompt_length, dtype=torch.bool, device=device),
            completion_keys=new(completion_shape),
            completion_values=new(completion_shape),
        )

    @property
    def group_size(self) -> int:
        return self.completion_keys[0].shape[0] // self.prompt_keys[0].shape[0]

    def tensors(self) -> list[torch.Tensor]:
        """Every buffer (what a captured graph or a compiled step reads and writes)."""
        return [
            *self.prompt_keys,
            *self.prompt_values,
            self.prompt_valid,
            *self.completion_keys,
            *self.completion_values,
        ]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())


def prefill_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """``(B, 1, L, L)`` bool: causal attention to valid (non-padding) keys, plus each position to itself.

    The diagonal keeps padded query positions from attending to nothing (a NaN that would reach the
    next layer's keys and values); valid positions always see themselves anyway, so their attention
    is exactly causal-with-padding.
    """
    length = attention_mask.shape[-1]
    positions = torch.arange(length, device=attention_mask.device)
    causal = positions[None, :] <= positions[:, None]
    return (
        causal & (attention_mask.bool()[:, None, :] | torch.eye(length, dtype=torch.bool, device=positions.device))
    )[:, None]


class PrefillLayout:
    """Causal attention over left-padded prompts that stores each layer's keys and values in the cache.

    The prompts' ``L`` positions go to the last ``L`` of the cache's ``P`` (right-aligned), and
    ``prompt_valid`` gets their padding mask; the first ``P - L`` stay padding. A bucket's prompts
    beyond the batch's are all valid: their rows' attention stays finite (and is never read).
    """

    def __init__(self, cache: StaticKVCache, attention_mask: torch.Tensor):
        prompts, length = attention_mask.shape
        if prompts > cache.prompt_valid.shape[0] or length > cache.prompt_valid.shape[1]:
            fits = tuple(cache.prompt_valid.shape)
            raise ValueError(f"prompts of shape {tuple(attention_mask.shape)} do not fit the cache's {fits}")
        self.cache = cache
        self.length = length
        self.mask = prefill_mask(attention_mask)
        cache.prompt_valid[:prompts].zero_()
        cache.prompt_valid[:prompts, -length:] = attention_mask.bool()
        cache.prompt_valid[prompts:] = True

    def attend(
        self, module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, scaling: float
    ) -> torch.Tensor:
        layer, prompts = module.layer_idx, key.shape[0]
        self.cache.prompt_keys[layer][:prompts, :, -self.length :] = key
        self.cache.prompt_values[layer][:prompts, :, -self.length :] = value
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=self.mask, scale=scaling, enable_gqa=True)
        return out.transpose(1, 2)


class DecodeLayout:
    """One decoding step: write the step's keys and values at column ``step``, attend over prompt + completion.

    ``step`` is a 0-d int64 tensor (not a Python int), so one compiled graph serves every step. The
    masks become one additive bias per step (:func:`decode_bias`), shared by the layers.
    """

    def __init__(self, cache: StaticKVCache, step: torch.Tensor):
        self.cache = cache
        self.index = step.reshape(1)
        columns = torch.arange(cache.completion_keys[0].shape[2], device=step.device)
        self.bias = decode_bias(cache.prompt_valid, columns <= step, cache.group_size)

    def attend(
        self, module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, scaling: float
    ) -> torch.Tensor:
        layer = module.layer_idx
        completion_keys = self.cache.completion_keys[layer].index_copy_(2, self.index, key)
        completion_values = self.cache.completion_values[layer].index_copy_(2, self.index, value)
        return grouped_decode_attention(
            query,
            self.cache.prompt_keys[layer],
            self.cache.prompt_values[layer],
            completion_keys,
            completion_values,
            self.bias,
            scaling=scaling,
        )


def decode_bias(prompt_valid: torch.Tensor, completion_valid: torch.Tensor, group: int) -> torch.Tensor:
    """``(B, G, 1, 1, P + T)`` fp32: 0 where a row may attend (its prompt's tokens, its completion so far),
    ``-inf`` elsewhere, for :func:`grouped_decode_attention`.

    Args:
        prompt_valid: ``(B, P)`` bool, False at padding. completion_valid: ``(T,)`` bool. group: G.
    """
    prompts, prompt_length = prompt_valid.shape
    valid = torch.cat(
        [prompt_valid[:, None, :].expand(-1, group, -1), completion_valid.expand(prompts, group, -1)], dim=-1
    )
    zeros = torch.zeros(valid.shape, dtype=torch.float32, device=valid.device)
    return zeros.masked_fill(~valid, float("-inf"))[:, :, None, None, :]


def grouped_decode_attention(
    query: torch.Tensor,
    prompt_keys: torch.Tensor,
    prompt_values: torch.Tensor,
    completion_keys: torch.Tensor,
    completion_values: torch.Tensor,
    bias: torch.Tensor,
    *,
    scaling: float,
) -> torch.Tensor:
    """Attention of one new position per row over its group's prompt and its own completion (GQA).

    Args:
        query: ``(B*G, heads, 1, d)``, rows group-major.
        prompt_keys, prompt_values: ``(B, kv_heads, P, d)``, one per group.
        completion_keys, completion_values: ``(B*G, kv_heads, T, d)``.
        bias: ``(B, G, 1, 1, P + T)`` fp32, 0 where row ``(b, g)`` attends and ``-inf`` elsewhere (:func:`decode_bias`).
        scaling: the softmax scale.

    Returns:
        ``(B*G, 1, heads, d)``. The prompt block of scores is one product per group (its
        ``G * heads / kv_heads`` queries per KV head read the group's keys once), the completion block
        one per row; the two are concatenated per row for one softmax (in fp32 at least), and the
        weighted values of both blocks summed.
    """
    rows, heads, _, dim = query.shape
    prompts, kv_heads, prompt_length, _ = prompt_keys.shape
    group, per_kv = rows // prompts, heads // kv_heads
    accumulate = torch.promote_types(query.dtype, torch.float32)
    query = query.reshape(prompts, group, kv_heads, per_kv, dim)
    group_query = query.transpose(1, 2).reshape(prompts, kv_heads, group * per_kv, dim)
    prompt_scores = torch.matmul(group_query, prompt_keys.transpose(-1, -2))
    own_keys = completion_keys.reshape(prompts, group, kv_heads, -1, dim)
    completion_scores = torch.matmul(query, own_keys.transpose(-1, -2))
    # Per row: (B, G, kv_heads, per_kv, P + T), the group's prompt block seen from each of its rows.
    prompt_scores = prompt_scores.reshape(prompts, kv_heads, group, per_kv, prompt_length).transpose(1, 2)
    scores = torch.cat([prompt_scores.to(accumulate), completion_scores.to(accumulate)], dim=-1)
    weights = torch.add(bias, scores, alpha=scaling).softmax(dim=-1)
    prompt_weights = weights[..., :prompt_length].transpose(1, 2).reshape(prompts, kv_heads, group * per_kv, -1)
    prompt_out = torch.matmul(prompt_weights.to(prompt_values.dtype), prompt_values)
    own_values = completion_values.reshape(prompts, group, kv_heads, -1, dim)
    completion_out = torch.matmul(weights[..., prompt_length:].to(completion_values.dtype), own_values)
    prompt_out = prompt_out.reshape(prompts, kv_heads, group, per_kv, dim).transpose(1, 2)
    out = prompt_out.to(accumulate) + completion_out.to(accumulate)
    return out.reshape(rows, 1, heads, dim).to(query.dtype)


__all__ = ["DecodeLayout", "PrefillLayout", "StaticKVCache", "decode_bias", "grouped_decode_attention", "prefill_mask"]
