"""Supervised fine-tuning on the reference answers, through the same fused lm-head as GRPO.

Only answer tokens (and the closing ``<|im_end|>``) carry a loss: the collator's ``labels``. Their
hidden states go to :func:`medgrpo.linear_logprob` (no (tokens × vocab) logits); the loss is the
answer-token NLL summed over the batch's answer tokens on every rank, divided by their global count.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from medgrpo.data.collate import IGNORE_INDEX, VideoBatch, video_grid
from medgrpo.ops.linear_logprob import linear_logprob
from medgrpo.train import qwen
from medgrpo.train.distributed import global_token_count, is_sharded
from medgrpo.train.metrics import StepResult
from medgrpo.train.optim import optimizer_step
from medgrpo.train.state import TrainState
from medgrpo.train.update import micro_batches


@dataclass
class SFTConfig:
    """Supervised fine-tuning on the reference answers.

    Attributes:
        batch_size: records per rank per step.
        micro_batch_size: rows per forward/backward (gradients accumulate over the batch's micro-batches).
    """

    batch_size: int = 8
    micro_batch_size: int = 8


def batch_hidden(
    model: nn.Module, batch: VideoBatch, rows: slice, *, train_vision: bool, positions: torch.Tensor | None = None
) -> torch.Tensor:
    """Final hidden states ``(n, L, hidden)`` of ``rows`` of a collated batch (one video per row).

    A sharded (FSDP2) model runs its root forward (see :mod:`medgrpo.train.update`); others run the
    stages of :mod:`medgrpo.train.qwen`. Both use the batch's 3D ``positions`` when given (computed
    here otherwise: Hugging Face computes them on the host, so compute them once per batch).
    """
    grids = batch.video_grid_thw[rows]
    sizes = [t * h * w for t, h, w in map(video_grid, batch.frames)]  # from shapes: no device read
    start = sum(sizes[: rows.start])
    pixels = batch.pixel_values_videos[start : start + sum(sizes[rows])]
    ids, mask = batch.input_ids[rows], batch.attention_mask[rows]
    if positions is None:
        positions, _ = qwen.rope_positions(
            model, batch.input_ids, batch.video_grid_thw, batch.second_per_grid_ts, batch.attention_mask
        )
    positions = positions[:, rows]
    if is_sharded(model):
        from medgrpo.train.model import final_hidden_states

        return final_hidden_states(
            model,
            input_ids=ids,
            attention_mask=mask,
            pixel_values_videos=pixels,
            video_grid_thw=grids,
            second_per_grid_ts=batch.second_per_grid_ts[rows],
            position_ids=positions,
        )
    with torch.set_grad_enabled(train_vision and torch.is_grad_enabled()):
        videos = qwen.encode_videos(model, pixels, grids)
    embeds = qwen.build_inputs_embeds(model, ids, videos)
    return qwen.hidden_states(model, embeds, positions, mask)


def sft_backward(
    model: nn.Module, batch: VideoBatch, *, micro_batch_size: int, train_vision: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward of the answer-token NLL of ``batch`` (on its device, with labels); returns ``(loss, tokens)``."""
    if batch.labels is None:
        raise ValueError("SFT needs labels: collate with VideoCollator(with_answers=True)")
    targets = batch.labels[:, 1:]
    selected = targets != IGNORE_INDEX
    num_items = global_token_count(selected)
    loss_sum = torch.zeros((), device=batch.input_ids.device)
    # One host round trip for the whole batch, not one per micro-batch (sharded or not).
    positions, _ = qwen.rope_positions(
        model, batch.input_ids, batch.video_grid_thw, batch.second_per_grid_ts, batch.attention_mask
    )
    slices = micro_batches(len(batch), micro_batch_size)
    # Each micro-batch's answer positions (a host sync each), read before any forward is queued, so
    # that no read waits for a forward or backward to finish (boolean indexing in the loop did, twice).
    answers = [selected[rows].nonzero(as_tuple=True) for rows in slices]
    for rows, where in zip(slices, answers):
        hidden = batch_hidden(model, batch, rows, train_vision=train_vision, positions=positions)[:, :-1]
        weight = qwen.lm_head_weight(model)  # after the forward: gathered under FSDP2
        logp, _ = linear_logprob(hidden[where], weight, targets[rows][where])
        loss = -logp.sum() / num_items
        loss.backward()
        loss_sum += loss.detach()
    return loss_sum, selected.sum()


def sft_step(
    state: TrainState, batch: VideoBatch, config: SFTConfig, *, max_grad_norm: float, train_vision: bool
) -> StepResult:
    """One SFT step: answer-token NLL through the fused head, clipped, skipped when not finite."""
    start = time.perf_counter()
    state.model.train()
    loss, tokens = sft_backward(state.model, batch, micro_batch_size=config.micro_batch_size, train_vision=train_vision)
    stepped, grad_norm = optimizer_step(
        state.params, state.optimizer, state.scheduler, loss=loss, max_grad_norm=max_grad_norm
    )
    elapsed = time.perf_counter() - start
    metrics = {
        "loss": loss,
        "grad_norm": grad_norm,
        "answer_tokens": tokens,
        "nonfinite_skipped": int(not stepped),
        "time_update_s": elapsed,
        "samples_per_s": len(batch) / max(elapsed, 1e-9),
        "tokens_per_s": batch.attention_mask.sum() / max(elapsed, 1e-9),
    }
    return StepResult(metrics, stepped)


__all__ = ["SFTConfig", "batch_hidden", "sft_backward", "sft_step"]
