"""Thin functions around a Hugging Face ``Qwen2_5_VLForConditionalGeneration``, split into its stages.

The Hugging Face forward does four things in one call: encode the videos with the vision tower,
scatter the video embeddings into the ``<|video_pad|>`` positions of the token embeddings, compute
Qwen2.5-VL's 3D (temporal, height, width) mrope position ids, and run the language model and the lm
head. Training and rollouts need the stages apart:

- a rollout encodes each video once and reuses it for the G completions of its prompt
  (:func:`encode_videos`, then :func:`build_inputs_embeds` on each use);
- the policy loss takes the final hidden states into the fused lm-head ops
  (:func:`medgrpo.fused_linear_policy_loss`, :func:`medgrpo.linear_logprob`), so the language model
  is run without its lm head (:func:`hidden_states`) and the (tokens x vocab) logits never exist;
- decoding continues the 3D positions past the prompt with the prompt's rope delta
  (:func:`rope_positions`, :func:`next_positions`).

Each stage calls the model's own public pieces — ``get_video_features``, ``get_input_embeddings``,
``get_decoder``, ``get_output_embeddings`` and the base model's ``get_rope_index`` — so the numbers
are the Hugging Face ones (the tests check logits against the HF forward). Nothing is patched.
Differences between transformers 5.x releases are bridged by looking at signatures, not versions:
``get_rope_index`` takes ``mm_token_type_ids`` from 5.x on, and the language model's KV-cache
argument is ``past_key_values`` up to 5.2x and ``cache`` after.

FSDP2: these functions call submodules directly, not the root's ``forward``. Parameters that
``fully_shard`` leaves to the root unit (token embeddings, final norm, lm head) are therefore only
unsharded if the caller unshards the root (``model.unshard()``) or shards those modules as their own
units; the trainer's model setup has to provide one of the two.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from medgrpo.train import compat

TEXT, IMAGE, VIDEO = 0, 1, 2  # Hugging Face's mm_token_type_ids values


def base_model(model: nn.Module) -> nn.Module:
    """The ``Qwen2_5_VLModel`` inside a ``Qwen2_5_VLForConditionalGeneration`` (or ``model`` itself)."""
    if hasattr(model, "get_rope_index"):
        return model
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "get_rope_index"):
        raise TypeError(f"{type(model).__name__} is not a Qwen2.5-VL model: no get_rope_index")
    return inner


def mm_token_type_ids(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Per-token modality, as the HF processor returns it: 0 text, 1 ``<|image_pad|>``, 2 ``<|video_pad|>``.

    Transformers 5.x computes mrope positions only when this is given; pass it to the HF forward
    and ``generate`` too, or they fall back to 1D text positions.
    """
    config = model.config
    types = torch.zeros_like(input_ids, dtype=torch.int32)
    types = types.masked_fill(input_ids == config.image_token_id, IMAGE)
    return types.masked_fill(input_ids == config.video_token_id, VIDEO)


def encode_videos(
    model: nn.Module, pixel_values_videos: torch.Tensor, video_grid_thw: torch.Tensor
) -> list[torch.Tensor]:
    """Run the vision tower and merger over the videos of a batch; one embedding matrix per video.

    Args:
        model: a ``Qwen2_5_VLForConditionalGeneration``.
        pixel_values_videos: ``(sum of rows, 1176)`` patch rows of all videos back to back
            (:meth:`medgrpo.data.collate.VideoBatch.to` builds them).
        video_grid_thw: ``(V, 3)`` int64 grid of each video.

    Returns:
        ``V`` tensors of shape ``(grid_t * grid_h * grid_w / 4, hidden)``, in the vision tower's dtype:
        the rows :func:`build_inputs_embeds` puts at each video's ``<|video_pad|>`` positions.
        They keep the autograd graph when grad is enabled, so reusing one for G sequences
        accumulates its gradient from all of them.
    """
    if video_grid_thw.dim() != 2 or video_grid_thw.shape[-1] != 3:
        raise ValueError(f"video_grid_thw must be (num_videos, 3), got {tuple(video_grid_thw.shape)}")
    output = model.get_video_features(pixel_values_videos, video_grid_thw, return_dict=True)
    return list(output.pooler_output)


def repeat_videos(video_embeds: Sequence[torch.Tensor], repeats: int) -> list[torch.Tensor]:
    """Each video's embeddings ``repeats`` times in a row (for G sequences per prompt, group-major)."""
    return [embeds for embeds in video_embeds for _ in range(repeats)]


def build_inputs_embeds(
    model: nn.Module, input_ids: torch.Tensor, video_embeds: Sequence[torch.Tensor] | torch.Tensor
) -> torch.Tensor:
    """Token embeddings with the video embeddings at the ``<|video_pad|>`` positions (as HF's forward does).

    Args:
        input_ids: ``(B, L)``; row ``i``'s placeholders take the next video in order, so the videos
            are listed in row order (a row's videos in the order they appear).
        video_embeds: per-video embeddings from :func:`encode_videos` (or their concatenation);
            their total row count must equal the number of ``<|video_pad|>`` tokens.

    Returns:
        ``(B, L, hidden)`` in the embedding dtype. The count check is an async device assert
        (no host sync on CUDA).
    """
    embed_tokens = model.get_input_embeddings()
    inputs_embeds = embed_tokens(input_ids)
    videos = video_embeds if isinstance(video_embeds, torch.Tensor) else torch.cat(list(video_embeds))
    videos = videos.to(inputs_embeds.device, inputs_embeds.dtype)
    is_video = input_ids == model.config.video_token_id
    torch._assert_async(
        is_video.sum() == videos.shape[0], "video embeddings and <|video_pad|> tokens do not match in number"
    )
    return inputs_embeds.masked_scatter(is_video.unsqueeze(-1), videos)


def rope_positions(
    model: nn.Module,
    input_ids: torch.Tensor,
    video_grid_thw: torch.Tensor,
    second_per_grid_ts: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen2.5-VL's 3D mrope position ids, from the model's own ``get_rope_index``.

    The Hugging Face implementation walks each row on the host (``tolist()`` per segment), so the
    inputs are copied to the host once here and the results moved back to ``input_ids``' device: one
    transfer each way instead of a sync per segment. In the training step, call it on the batch's
    host tensors (before ``.to(device)``) so that no device sync is needed at all.

    Args:
        input_ids: ``(B, L)``; padding may be on either side (``attention_mask`` says where).
        video_grid_thw: ``(V, 3)`` grids, videos in row order. second_per_grid_ts: ``(V,)`` or None.
        attention_mask: ``(B, L)`` 1 for tokens, 0 for padding, or None (no padding).

    Returns:
        ``position_ids`` ``(3, B, L)`` int64 (0 at padding) and ``rope_deltas`` ``(B, 1)``: a token
        after the prompt at text index ``n`` (counting valid tokens from 0) has position ``n + delta``
        on all three axes (see :func:`next_positions`).
    """
    device = input_ids.device
    host = lambda t: None if t is None else t.cpu()
    ids = host(input_ids)
    kwargs = {
        "video_grid_thw": host(video_grid_thw),
        "second_per_grid_ts": host(second_per_grid_ts),
        "attention_mask": host(attention_mask),
    }
    get_rope_index = base_model(model).get_rope_index
    if compat.rope_index_takes_token_types(get_rope_index):
        kwargs["mm_token_type_ids"] = mm_token_type_ids(model, ids)
    position_ids, rope_deltas = get_rope_index(ids, **kwargs)
    return position_ids.to(device), rope_deltas.reshape(-1, 1).to(device)


def next_positions(attention_mask: torch.Tensor, rope_deltas: torch.Tensor) -> torch.Tensor:
    """``(B,)`` position of the token that follows each row of ``attention_mask`` (valid count + delta)."""
    return attention_mask.long().sum(-1) + rope_deltas.reshape(-1)


def text_positions(start: torch.Tensor, length: int) -> torch.Tensor:
    """``(3, B, length)`` position ids of ``length`` text tokens from ``start`` ``(B,)`` on (all axes equal)."""
    steps = torch.arange(length, device=start.device)
    return (start[:, None] + steps).unsqueeze(0).expand(3, -1, -1)


def new_cache(model: nn.Module):
    """An empty ``DynamicCache`` for the language model (grown by :func:`hidden_states`)."""
    from transformers import DynamicCache

    return DynamicCache(config=model.config.get_text_config())


def hidden_states(
    model: nn.Module,
    inputs_embeds: torch.Tensor,
    position_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    cache=None,
) -> torch.Tensor:
    """Run the language model only (no lm head); return its last hidden state, after the final norm.

    ``hidden @ model.get_output_embeddings().weight.T`` is the HF model's logits for the same inputs;
    the loss instead feeds ``hidden`` to the fused lm-head ops so the logits are never materialized.

    Args:
        inputs_embeds: ``(B, L, hidden)`` from :func:`build_inputs_embeds`.
        position_ids: ``(3, B, L)`` from :func:`rope_positions` (or :func:`text_positions` when decoding).
        attention_mask: ``(B, L_past + L)`` 1 for tokens, 0 for padding (any side), or None.
        cache: a KV cache (:func:`new_cache`) to read the past from and append this call's keys and
            values to; None runs without one (training).

    Returns:
        ``(B, L, hidden)``.
    """
    decoder = model.get_decoder()
    # Without a cache, no cache argument at all: its name differs across releases (an inspect per call).
    kwargs = {"use_cache": False} if cache is None else {compat.cache_keyword(decoder): cache, "use_cache": True}
    output = decoder(
        input_ids=None, inputs_embeds=inputs_embeds, position_ids=position_ids, attention_mask=attention_mask, **kwargs
    )
    return output.last_hidden_state


def lm_head_weight(model: nn.Module) -> torch.Tensor:
    """The ``(vocab, hidden)`` lm-head weight, for :func:`medgrpo.linear_logprob` and the fused loss."""
    return model.get_output_embeddings().weight


def logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """fp32 logits of a few positions' hidden states (e.g. the last one when sampling)."""
    return model.get_output_embeddings()(hidden).float()


__all__ = [
    "base_model",
    "build_inputs_embeds",
    "encode_videos",
    "hidden_states",
    "lm_head_weight",
    "logits",
    "mm_token_type_ids",
    "new_cache",
    "next_positions",
    "repeat_videos",
    "rope_positions",
    "text_positions",
]
