"""Shared-prefix training forward: each prompt and its video run once per group, not once per completion.

A MedGRPO prompt is long (1,000-4,000 video tokens) and its G completions short, so the log-prob and
update passes pack each group into one stretch of a single row instead of G prompt + completion rows:

    [prompt b (valid tokens only)] [completion b,0 up to its EOS] ... [completion b,G-1 up to its EOS] [prompt b+1] ...

A micro-batch is a run of whole groups, packed into one row (batch 1, no padding). The language model
sees it through :class:`SharedPrefixLayout`, an :class:`~medgrpo.train.attention.AttentionLayout`:

- prompt tokens attend causally within their prompt;
- a completion token attends to its group's whole prompt and causally to its own completion only.

That is exactly what each token sees in the dense (B*G, P + T) layout, so hidden states, log-probs,
loss and gradients are the dense path's (the Prefix Grouper argument, arXiv 2506.05433); the tests
check it to 1e-9 in float64. Positions are the dense ones: the prompt's 3D mrope positions from
:func:`medgrpo.train.qwen.rope_positions` on the prompt alone, and completion token ``t`` of a prompt
with ``n`` valid tokens at ``n + rope_delta + t`` on all three axes (what decoding used).

:meth:`SharedPrefixInputs.completion_hidden` returns, for each completion token ``t`` of the dense
``(rows, T)`` layout, the final hidden state that predicts it (the prompt's last token for ``t = 0``,
completion token ``t - 1`` otherwise), so the fused lm-head ops
(:func:`medgrpo.fused_linear_policy_loss`, :func:`medgrpo.linear_logprob`) take ``(n, T, hidden)`` as
with the dense path and only ever see completion positions.

Attention backends (:class:`SharedPrefixLayout`, ``backend``):

- ``"sdpa"`` (CPU, and any dtype): per group, one causal SDPA call over the prompt, and one over the
  group's completions with the group's keys (a contiguous view: no copy) and a boolean mask
  (prompt columns all true, completion columns block-diagonal causal). GQA through ``enable_gqa``
  (no repeated K/V).
- ``"flex"`` (CUDA): ``torch.nn.attention.flex_attention`` compiled, with one block mask per
  micro-batch built from per-token group and segment ids: one block-sparse kernel for the whole
  packed row, exact gradients, GQA without K/V copies, fp32 and bf16 alike (flash-attn varlen has no
  fp32 kernel and would need either G copies of the prompt's K/V per completion or two calls merged by
  their LSE with a hand-written backward).

Sizes: packing needs the prompt and completion lengths on the host, read once when the inputs are
built (one transfer, beside the one :func:`~medgrpo.train.qwen.rope_positions` already makes), never
per micro-batch. Unsharded models reuse the rollout's B video embeddings (not B*G); a sharded
(FSDP2) model runs its root forward on the packed ids, the B videos' patch rows, precomputed
positions and the layout as attention mask (:func:`medgrpo.train.model.final_hidden_states`).
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from medgrpo.train import qwen
from medgrpo.train.attention import layout_attention, layout_mask
from medgrpo.train.rollout import Rollout
from medgrpo.train.update import micro_batches, root_forward_pixels

BACKENDS = ("auto", "sdpa", "flex")
_FLEX_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class GroupSpan:
    """Where one group lies in a packed row: its prompt at ``start``, then its completions back to back."""

    start: int
    prompt: int  # valid prompt tokens
    completions: tuple[int, ...]  # each completion's tokens, up to and including its EOS

    @property
    def end(self) -> int:
        return self.start + self.prompt + sum(self.completions)

    def shifted(self, offset: int) -> GroupSpan:
        return GroupSpan(self.start - offset, self.prompt, self.completions)


def _completion_mask(lengths: tuple[int, ...], prompt: int, device: torch.device) -> torch.Tensor:
    """``(sum(lengths), prompt + sum(lengths))`` bool: every prompt column, then block-diagonal causal."""
    total = sum(lengths)
    segment = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths, dtype=torch.long))
    position = torch.arange(total)
    own = (segment[:, None] == segment[None, :]) & (position[None, :] <= position[:, None])
    return torch.cat([torch.ones(total, prompt, dtype=torch.bool), own], dim=1).to(device)


@functools.cache
def _compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


class SharedPrefixLayout:
    """The attention of one packed micro-batch of groups (see the module docstring).

    Args:
        spans: the groups in packing order, positions relative to the row.
        backend: ``"sdpa"``, ``"flex"``, or ``"auto"`` (flex on CUDA in fp16/bf16/fp32, else SDPA).

    Masks and block masks are built on first use and reused by every layer and by the backward.
    """

    def __init__(self, spans: list[GroupSpan], *, backend: str = "auto") -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.spans = spans
        self.length = spans[-1].end if spans else 0
        self.backend = backend
        self._masks: dict[tuple[int, torch.device], torch.Tensor] = {}
        self._block_masks: dict[torch.device, Any] = {}

    def attend(
        self, module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, scaling: float
    ) -> torch.Tensor:
        """``(1, L, heads, head_dim)`` attention of the packed row (query ``(1, heads, L, d)``, key/value GQA)."""
        if query.shape[0] != 1 or query.shape[2] != self.length:
            raise ValueError(f"a shared-prefix row is (1, heads, {self.length}, d), got {tuple(query.shape)}")
        if self._use_flex(query):
            return self._attend_flex(query, key, value, scaling)
        return self._attend_sdpa(query, key, value, scaling)

    def _use_flex(self, query: torch.Tensor) -> bool:
        if self.backend == "auto":
            return query.is_cuda and query.dtype in _FLEX_DTYPES
        return self.backend == "flex"

    def _attend_sdpa(self, query, key, value, scaling: float) -> torch.Tensor:
        outputs = []
        for index, span in enumerate(self.spans):
            prompt_end = span.start + span.prompt
            prompt = slice(span.start, prompt_end)
            outputs.append(
                F.scaled_dot_product_attention(
                    query[:, :, prompt],
                    key[:, :, prompt],
                    value[:, :, prompt],
                    is_causal=True,
                    scale=scaling,
                    enable_gqa=True,
                )
            )
            if span.end > prompt_end:
                group = slice(span.start, span.end)
                outputs.append(
                    F.scaled_dot_product_attention(
                        query[:, :, prompt_end : span.end],
                        key[:, :, group],
                        value[:, :, group],
                        attn_mask=self._mask(index, query.device),
                        scale=scaling,
                        enable_gqa=True,
                    )
                )
        return torch.cat(outputs, dim=2).transpose(1, 2)

    def _mask(self, index: int, device: torch.device) -> torch.Tensor:
        cached = self._masks.get((index, device))
        if cached is None:
            span = self.spans[index]
            cached = self._masks[(index, device)] = _completion_mask(span.completions, span.prompt, device)
        return cached

    def token_ids(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per packed token: its group, and its segment (-1 in a prompt, else a row-wide completion index)."""
        groups, segments, completion = [], [], 0
        for index, span in enumerate(self.spans):
            groups.append(torch.full((span.end - span.start,), index, dtype=torch.int32))
            segments.append(torch.full((span.prompt,), -1, dtype=torch.int32))
            for length in span.completions:
                segments.append(torch.full((length,), completion, dtype=torch.int32))
                completion += 1
        return torch.cat(groups), torch.cat(segments)

    def block_mask(self, device: torch.device):
        """The flex-attention ``BlockMask`` of the row (built once per device).

        Built eagerly: that evaluates the mask on the full (L, L) grid once (L = the packed row, a few
        thousand tokens: megabytes), where ``_compile=True`` would compile per new row length.
        """
        cached = self._block_masks.get(device)
        if cached is not None:
            return cached
        from torch.nn.attention.flex_attention import create_block_mask

        group, segment = (t.to(device) for t in self.token_ids())

        def shared_prefix_mask(batch, head, q_index, kv_index):
            same_group = group[q_index] == group[kv_index]
            visible = (segment[kv_index] < 0) | (segment[q_index] == segment[kv_index])
            return (kv_index <= q_index) & same_group & visible

        cached = create_block_mask(shared_prefix_mask, None, None, self.length, self.length, device=device)
        self._block_masks[device] = cached
        return cached

    def _attend_flex(self, query, key, value, scaling: float) -> torch.Tensor:
        from torch.nn.attention.flex_attention import flex_attention

        attention = _compiled_flex_attention() if query.is_cuda else flex_attention  # CPU: eager, forward only
        block_mask = self.block_mask(query.device)
        out = attention(query, key, value, block_mask=block_mask, scale=scaling, enable_gqa=True)
        return out.transpose(1, 2)


@dataclass
class SharedPrefixInputs:
    """A rollout packed for the shared-prefix forward (built by :func:`shared_prefix_inputs`).

    ``input_ids`` ``(L,)`` and ``position_ids`` ``(3, L)`` hold all B groups back to back; a micro-batch of
    groups is a contiguous stretch of them. ``hidden_index`` ``(B*G, T)`` is, for every completion token of
    the dense layout, the packed position of the hidden state that predicts it (a prompt's last token
    where the completion mask is 0: a finite placeholder the loss masks out).
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    hidden_index: torch.Tensor
    spans: list[GroupSpan]
    completion_ids: torch.Tensor  # (B*G, T)
    completion_mask: torch.Tensor  # (B*G, T) bool
    group_size: int
    video_embeds: list[torch.Tensor]  # per prompt, detached (unsharded models)
    video_grid_thw: torch.Tensor  # (B, 3)
    second_per_grid_ts: torch.Tensor  # (B,)
    pixels: list[torch.Tensor] | None = None  # per prompt: its video's patch rows (root forward)
    backend: str = "auto"
    _layouts: dict[tuple[int, int], SharedPrefixLayout] = field(default_factory=dict, repr=False)

    def micro_batch_rows(self, micro_batch_size: int) -> list[slice]:
        """Row slices of whole groups: ``max(1, micro_batch_size // G)`` groups each."""
        groups = micro_batches(len(self.spans), max(1, micro_batch_size // self.group_size))
        return [slice(g.start * self.group_size, g.stop * self.group_size) for g in groups]

    def attention(self, model: nn.Module) -> contextlib.AbstractContextManager:
        """The block the forwards and backwards of ``model`` on these inputs run in."""
        return layout_attention(model)

    def layout(self, first: int, stop: int) -> SharedPrefixLayout:
        """The attention layout of groups ``first .. stop - 1`` (cached: reused by every pass)."""
        layout = self._layouts.get((first, stop))
        if layout is None:
            offset = self.spans[first].start
            spans = [span.shifted(offset) for span in self.spans[first:stop]]
            layout = self._layouts[(first, stop)] = SharedPrefixLayout(spans, backend=self.backend)
        return layout

    def completion_hidden(self, model: nn.Module, rows: slice) -> torch.Tensor:
        """Final hidden states that predict each completion token, ``(n, T, hidden)`` for ``rows`` (whole groups).

        Run it inside :meth:`attention`.
        """
        group = self.group_size
        if rows.start % group or rows.stop % group:
            raise ValueError(f"rows {rows} do not cover whole groups of {group}")
        first, stop = rows.start // group, rows.stop // group
        offset, end = self.spans[first].start, self.spans[stop - 1].end
        ids = self.input_ids[None, offset:end]
        positions = self.position_ids[:, None, offset:end]
        mask = layout_mask(self.layout(first, stop))
        if self.pixels is not None:
            from medgrpo.train.model import final_hidden_states

            hidden = final_hidden_states(
                model,
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                pixel_values_videos=torch.cat(self.pixels[first:stop]),
                video_grid_thw=self.video_grid_thw[first:stop],
                second_per_grid_ts=self.second_per_grid_ts[first:stop],
            )
        else:
            embeds = qwen.build_inputs_embeds(model, ids, self.video_embeds[first:stop])
            hidden = qwen.hidden_states(model, embeds, positions, mask)
        return hidden[0][self.hidden_index[rows] - offset]

    def packed_tokens(self) -> int:
        """Tokens the language model runs per pass: every prompt once, every completion up to its EOS."""
        return self.spans[-1].end if self.spans else 0


def _group_spans(prompt_lengths: list[int], completion_lengths: list[int], group: int) -> list[GroupSpan]:
    spans, start = [], 0
    for b, prompt in enumerate(prompt_lengths):
        span = GroupSpan(start, prompt, tuple(completion_lengths[b * group : (b + 1) * group]))
        spans.append(span)
        start = span.end
    return spans


def _packing_index(spans: list[GroupSpan], prompt_valid: torch.Tensor, steps: int) -> torch.Tensor:
    """``(L,)`` host index into ``cat([prompts.flatten(), completions.flatten()])`` giving the packed order."""
    num_prompts, width = prompt_valid.shape
    group = len(spans[0].completions) if spans else 1
    pieces = []
    for b, span in enumerate(spans):
        pieces.append(prompt_valid[b].nonzero().flatten() + b * width)
        for j, length in enumerate(span.completions):
            row = b * group + j
            pieces.append(torch.arange(length) + num_prompts * width + row * steps)
    return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)


def _hidden_index(spans: list[GroupSpan], steps: int) -> torch.Tensor:
    """``(B*G, T)`` host index of the packed hidden state predicting each completion token."""
    rows = []
    t = torch.arange(steps)
    for span in spans:
        prompt_last = span.start + span.prompt - 1
        start = span.start + span.prompt
        for length in span.completions:
            inside = (t > 0) & (t < length)
            rows.append(torch.where(inside, start + t - 1, torch.full_like(t, prompt_last)))
            start += length
    return torch.stack(rows)


def shared_prefix_inputs(
    model: nn.Module,
    rollout: Rollout,
    video_grid_thw: torch.Tensor,
    second_per_grid_ts: torch.Tensor,
    pixel_values_videos: torch.Tensor | None = None,
    *,
    root_forward: bool | None = None,
    backend: str = "auto",
) -> SharedPrefixInputs:
    """Pack a rollout's groups for the shared-prefix log-prob and update passes.

    Args:
        model: the policy (its ``get_rope_index`` gives the prompts' positions; sharded or not).
        rollout: B prompts x G completions, group-major (:func:`medgrpo.train.rollout.generate`).
        video_grid_thw, second_per_grid_ts: the batch's ``(B, 3)`` grids and ``(B,)`` seconds per grid.
        pixel_values_videos: the batch's patch rows; needed when the forward re-encodes the videos.
        root_forward: run the model's root forward on the videos' patch rows (None: when ``model`` is
            sharded, as FSDP2 needs). Otherwise the rollout's video embeddings are reused, detached.
        backend: the attention backend of :class:`SharedPrefixLayout`.

    Returns:
        A :class:`SharedPrefixInputs` the passes of :mod:`medgrpo.train.update` take like dense inputs.
    """
    group = rollout.group_size
    prompt_ids, prompt_mask = rollout.prompt_ids[::group], rollout.prompt_mask[::group]
    num_prompts, width = prompt_ids.shape
    completion_mask = rollout.completion_mask.bool()
    steps = completion_mask.shape[1]
    positions, deltas = qwen.rope_positions(model, prompt_ids, video_grid_thw, second_per_grid_ts, prompt_mask)
    # The one host transfer: which prompt tokens are valid and how long each completion is.
    host = torch.cat([prompt_mask.long().flatten(), completion_mask.sum(-1)]).cpu()
    prompt_valid = host[: num_prompts * width].view(num_prompts, width).bool()
    spans = _group_spans(prompt_valid.sum(-1).tolist(), host[num_prompts * width :].tolist(), group)
    device = prompt_ids.device
    order = _packing_index(spans, prompt_valid, steps).to(device)
    first_completion = qwen.next_positions(prompt_mask, deltas).repeat_interleave(group)  # completion token 0
    completion_positions = qwen.text_positions(first_completion, steps).reshape(3, -1).to(positions.dtype)
    position_source = torch.cat([positions.reshape(3, -1), completion_positions], dim=1)
    return SharedPrefixInputs(
        input_ids=torch.cat([prompt_ids.flatten(), rollout.completion_ids.flatten()])[order],
        position_ids=position_source[:, order],
        hidden_index=_hidden_index(spans, steps).to(device),
        spans=spans,
        completion_ids=rollout.completion_ids,
        completion_mask=completion_mask,
        group_size=group,
        video_embeds=[embeds.detach() for embeds in rollout.video_embeds],
        video_grid_thw=video_grid_thw,
        second_per_grid_ts=second_per_grid_ts,
        pixels=root_forward_pixels(model, pixel_values_videos, video_grid_thw, root_forward),
        backend=backend,
    )


__all__ = ["BACKENDS", "GroupSpan", "SharedPrefixInputs", "SharedPrefixLayout", "shared_prefix_inputs"]
