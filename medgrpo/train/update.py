"""The GRPO update: completions' log-probs through the fused lm-head, the policy loss, its backward.

The language model runs on prompt + completion; the hidden states of the completion positions go with
the lm-head weight to :func:`medgrpo.fused_linear_policy_loss`, so the (tokens × vocab) logits never
exist. The passes take any :class:`RolloutInputs`: the dense layout here (:class:`PolicyInputs`, one
prompt + completion row per sequence, the reference) or the shared-prefix packing of
:mod:`medgrpo.train.shared_prefix` (each prompt once per group). Normalization over micro-batches and
ranks, FSDP2 and host syncs: docs/design-train.md.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from medgrpo.ops.fused_linear_policy_loss import fused_linear_policy_loss
from medgrpo.ops.linear_logprob import linear_logprob
from medgrpo.ops.policy_loss import MEDGRPO_LOSS, PolicyLossConfig
from medgrpo.train import qwen
from medgrpo.train.distributed import global_token_count, is_sharded, world_size
from medgrpo.train.rollout import Rollout


@dataclass(frozen=True)
class LossOptions:
    """What the update passes to :func:`medgrpo.fused_linear_policy_loss`: the op's own
    :class:`~medgrpo.ops.policy_loss.PolicyLossConfig` (default: MedGRPO's eps 0.2/0.3, DAPO, beta 0),
    the sampling temperature, and the sequences per forward/backward (rounded down to whole groups, at
    least one, by shared-prefix inputs)."""

    loss: PolicyLossConfig = MEDGRPO_LOSS
    temperature: float = 1.0
    micro_batch_size: int = 8


class RolloutInputs(Protocol):
    """What the log-prob and update passes need of a rollout's inputs (dense or shared-prefix)."""

    completion_ids: torch.Tensor  # (N, T)
    completion_mask: torch.Tensor  # (N, T) bool

    def micro_batch_rows(self, micro_batch_size: int) -> list[slice]:
        """The row slices run per forward/backward."""
        ...

    def attention(self, model: nn.Module) -> contextlib.AbstractContextManager:
        """The block every forward and backward of ``model`` on these inputs runs in."""
        ...

    def completion_hidden(self, model: nn.Module, rows: slice) -> torch.Tensor:
        """Final hidden states that predict each completion token of ``rows``: ``(n, T, hidden)``."""
        ...


@dataclass
class PolicyInputs:
    """Prompt + completion sequences of a rollout, ready for the language model (the dense layout)."""

    input_ids: torch.Tensor  # (N, P + T)
    attention_mask: torch.Tensor  # (N, P + T)
    position_ids: torch.Tensor  # (3, N, P + T)
    video_embeds: list[torch.Tensor]  # per sequence (a prompt's embeddings shared by its G completions)
    completion_ids: torch.Tensor  # (N, T)
    completion_mask: torch.Tensor  # (N, T) bool
    prompt_length: int  # P (prompts are left padded to it)
    pixels: list[torch.Tensor] | None = None  # per sequence: its video's patch rows (sharded models only)
    video_grid_thw: torch.Tensor | None = None  # (N, 3)
    second_per_grid_ts: torch.Tensor | None = None  # (N,)

    def micro_batch_rows(self, micro_batch_size: int) -> list[slice]:
        """Row slices of at most ``micro_batch_size`` sequences."""
        return micro_batches(self.input_ids.shape[0], micro_batch_size)

    def attention(self, model: nn.Module) -> contextlib.AbstractContextManager:
        """The model's own attention: nothing to switch."""
        return contextlib.nullcontext()

    def completion_hidden(self, model: nn.Module, rows: slice) -> torch.Tensor:
        """:func:`completion_hidden` of ``rows``."""
        return completion_hidden(model, self, rows)


def video_rows(pixel_values_videos: torch.Tensor, video_grid_thw: torch.Tensor) -> list[torch.Tensor]:
    """Each video's patch rows of a batch's ``pixel_values_videos`` (views; split by the grids)."""
    sizes = video_grid_thw.prod(-1).tolist()
    return list(pixel_values_videos.split(sizes))


def root_forward_pixels(
    model: nn.Module,
    pixel_values_videos: torch.Tensor | None,
    video_grid_thw: torch.Tensor,
    root_forward: bool | None,
) -> list[torch.Tensor] | None:
    """Each video's patch rows when the passes run the model's root forward, else None (embeddings reused).

    ``root_forward`` None: when ``model`` is sharded, as FSDP2 needs; ``pixel_values_videos`` is then required.
    """
    if not (is_sharded(model) if root_forward is None else root_forward):
        return None
    if pixel_values_videos is None:
        raise ValueError("the root forward needs the batch's pixel_values_videos")
    return video_rows(pixel_values_videos, video_grid_thw)


def policy_inputs(
    model: nn.Module,
    rollout: Rollout,
    video_grid_thw: torch.Tensor,
    second_per_grid_ts: torch.Tensor,
    pixel_values_videos: torch.Tensor | None = None,
    *,
    root_forward: bool | None = None,
) -> PolicyInputs:
    """Concatenate prompts and completions and compute their 3D rope positions (videos repeated G times).

    ``root_forward``: run the model's root forward on each sequence's video patch rows (None: when the
    model is sharded, as FSDP2 needs; ``pixel_values_videos``, the batch's, are then required). Otherwise
    the rollout's video embeddings are reused, detached.
    """
    completion_mask = rollout.completion_mask.bool()
    input_ids = torch.cat([rollout.prompt_ids, rollout.completion_ids], dim=1)
    attention_mask = torch.cat([rollout.prompt_mask.long(), completion_mask.long()], dim=1)
    group = rollout.group_size
    grids = video_grid_thw.repeat_interleave(group, dim=0)
    seconds = second_per_grid_ts.repeat_interleave(group, dim=0)
    position_ids, _ = qwen.rope_positions(model, input_ids, grids, seconds, attention_mask)
    pixels = root_forward_pixels(model, pixel_values_videos, video_grid_thw, root_forward)
    return PolicyInputs(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        video_embeds=qwen.repeat_videos([v.detach() for v in rollout.video_embeds], group),
        completion_ids=rollout.completion_ids,
        completion_mask=completion_mask,
        prompt_length=rollout.prompt_ids.shape[1],
        pixels=None if pixels is None else qwen.repeat_videos(pixels, group),
        video_grid_thw=grids,
        second_per_grid_ts=seconds,
    )


def completion_hidden(model: nn.Module, inputs: PolicyInputs, rows: slice) -> torch.Tensor:
    """Final hidden states that predict each completion token, ``(n, T, hidden)`` for ``rows``."""
    ids = inputs.input_ids[rows]
    if inputs.pixels is not None:
        from medgrpo.train.model import final_hidden_states

        hidden = final_hidden_states(
            model,
            input_ids=ids,
            attention_mask=inputs.attention_mask[rows],
            position_ids=inputs.position_ids[:, rows],  # computed once per step; HF's own would sync per row
            pixel_values_videos=torch.cat(inputs.pixels[rows]),
            video_grid_thw=inputs.video_grid_thw[rows],
            second_per_grid_ts=inputs.second_per_grid_ts[rows],
        )
    else:
        embeds = qwen.build_inputs_embeds(model, ids, inputs.video_embeds[rows])
        hidden = qwen.hidden_states(model, embeds, inputs.position_ids[:, rows], inputs.attention_mask[rows])
    start = inputs.prompt_length - 1  # position i predicts token i + 1
    return hidden[:, start : start + inputs.completion_ids.shape[1]]


def micro_batches(total: int, size: int) -> list[slice]:
    """Row slices of at most ``size`` rows covering ``range(total)``."""
    return [slice(start, min(start + size, total)) for start in range(0, total, max(size, 1))]


@torch.no_grad()
def sequence_logprobs(
    model: nn.Module, inputs: RolloutInputs, *, temperature: float, micro_batch_size: int
) -> torch.Tensor:
    """Per-token log-probs ``(N, T)`` of the completions under ``model`` (old policy or reference)."""
    out = []
    with inputs.attention(model):
        for rows in inputs.micro_batch_rows(micro_batch_size):
            hidden = inputs.completion_hidden(model, rows)
            weight = qwen.lm_head_weight(model)  # after the forward: gathered under FSDP2
            logp, _ = linear_logprob(hidden, weight, inputs.completion_ids[rows], temperature=temperature)
            out.append(logp)
    return torch.cat(out)


@dataclass
class UpdateMetrics:
    """Device-side metrics of one update (summed over micro-batches, token-weighted)."""

    loss: torch.Tensor
    kl: torch.Tensor
    clip_fraction: torch.Tensor
    clip_fraction_low: torch.Tensor
    clip_fraction_high: torch.Tensor
    entropy: torch.Tensor
    tokens: torch.Tensor


def _accumulate(sums: dict[str, torch.Tensor], loss: torch.Tensor, out, mask: torch.Tensor) -> None:
    """Add a micro-batch's loss, token count and token-weighted metrics to ``sums`` (on the device; out of place,
    so float64 losses and metrics keep their precision)."""
    tokens = mask.sum().to(torch.float32)
    sums["loss"] = sums["loss"] + loss.detach()
    sums["tokens"] = sums["tokens"] + tokens
    parts = (
        ("kl", out.kl),
        ("clip", out.clip_fraction),
        ("clip_low", out.clip_fraction_low),
        ("clip_high", out.clip_fraction_high),
        ("entropy", out.entropy),
    )
    for name, value in parts:
        if value is not None:
            sums[name] = sums[name] + value.detach() * tokens


def backward_policy_loss(
    model: nn.Module,
    inputs: RolloutInputs,
    advantages: torch.Tensor,
    options: LossOptions,
    *,
    old_logp: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
) -> UpdateMetrics:
    """Forward and backward of the policy loss over micro-batches; gradients accumulate in ``model``.

    Each backward runs inside ``inputs.attention(model)``, as activation checkpointing recomputes the
    forward there.
    """
    total = inputs.completion_ids.shape[0]
    slices = inputs.micro_batch_rows(options.micro_batch_size)
    loss_type = options.loss.loss_type
    if loss_type == "bnpo" and len(slices) > 1:
        raise ValueError("loss_type='bnpo' normalizes per batch: set micro_batch_size >= the sequences per step")
    num_items = global_token_count(inputs.completion_mask) if loss_type == "dapo" else None
    device = inputs.completion_ids.device
    names = ("loss", "kl", "clip", "clip_low", "clip_high", "entropy", "tokens")
    sums = {name: torch.zeros((), device=device) for name in names}
    with inputs.attention(model):
        for rows in slices:
            hidden = inputs.completion_hidden(model, rows)
            weight = qwen.lm_head_weight(model)  # after the forward: gathered under FSDP2
            mask = inputs.completion_mask[rows]
            out = fused_linear_policy_loss(
                hidden,
                weight,
                inputs.completion_ids[rows],
                mask,
                advantages[rows],
                old_logp=None if old_logp is None else old_logp[rows],
                ref_logp=None if ref_logp is None else ref_logp[rows],
                temperature=options.temperature,
                num_items=num_items,
                return_entropy=True,  # logged as the update's `entropy`
                **options.loss.options(),
            )
            # dapo: num_items is global. Others are means over this rank's sequences: weight the micro-batch by its
            # share, and by 1/world since gradients are summed over ranks.
            loss = out.loss if loss_type == "dapo" else out.loss * ((rows.stop - rows.start) / total / world_size())
            loss.backward()
            _accumulate(sums, loss, out, mask)
    tokens = sums["tokens"].clamp_min(1.0)
    return UpdateMetrics(
        loss=sums["loss"],
        kl=sums["kl"] / tokens,
        clip_fraction=sums["clip"] / tokens,
        clip_fraction_low=sums["clip_low"] / tokens,
        clip_fraction_high=sums["clip_high"] / tokens,
        entropy=sums["entropy"] / tokens,
        tokens=sums["tokens"],
    )


__all__ = [
    "LossOptions",
    "PolicyInputs",
    "RolloutInputs",
    "UpdateMetrics",
    "backward_policy_loss",
    "completion_hidden",
    "micro_batches",
    "policy_inputs",
    "root_forward_pixels",
    "sequence_logprobs",
    "video_rows",
]
