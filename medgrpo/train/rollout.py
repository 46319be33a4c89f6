"""GRPO rollouts: G sampled completions per prompt, with the prompt encoded and prefilled once.

A MedGRPO prompt is long (hundreds of video tokens plus the question) and its completions short,
so the loop shares the prefix instead of running ``model.generate`` on G copies of each prompt:

1. **Encode** each video once with the vision tower (:func:`medgrpo.train.qwen.encode_videos`).
2. **Prefill** each prompt once: the B left-padded prompts go through the language model; only the
   last position's hidden state goes through the lm head.
3. **Decode** B*G rows (group-major: rows ``b*G .. b*G+G-1`` are prompt ``b``'s completions) step by
   step: sample (temperature, top-k, top-p; :mod:`medgrpo.train.token_sampling`), embed the token,
   run one cached step, and keep only the new position's logits.

``RolloutConfig.decode`` picks the decoder; both give the same tokens for the same generator:

- ``"static"`` (:mod:`medgrpo.train.decode`): a static KV cache that stores the prompt's keys and
  values once per group and is written in place, one (optionally compiled) step per token with no
  host sync inside; the host reads the all-finished flag every ``check_every`` steps.
- ``"dynamic"``, the reference loop here: the prefill fills a ``DynamicCache``, which is replicated
  G times (``Cache.batch_repeat_interleave``); each step grows it by concatenation and reads the
  all-finished flag (one host sync per step).

A row stops at any of ``eos_token_ids`` and is padded with ``pad_token_id`` afterwards; the rollout
stops at ``max_new_tokens`` or once every row has stopped (columns stepped past that are trimmed).
Finished rows keep being computed (their outputs are discarded) so the cache stays one dense batch.

The vision placeholders ``<|image_pad|>`` and ``<|video_pad|>`` are never sampled (their logits are
set to ``-inf``): a completion holding one could not be fed back to the model, whose forward takes
every placeholder for a patch of an image or video it does not have. A trained model gives them
~0 probability in answers, so the sampling distribution is the policy's up to that renormalization.

Decoding continues Qwen2.5-VL's 3D positions as HF's ``generate`` does: the token after a prompt
with ``n`` valid tokens is at ``n + rope_delta`` on all three axes, then one more per step. Greedy
rollouts (``temperature=0``) reproduce ``model.generate(do_sample=False)`` token for token (tested).

The model runs in eval mode during the rollout (restored afterwards): with gradient checkpointing
in training mode, HF layers would drop the KV cache.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from medgrpo.data.collate import VideoBatch
from medgrpo.train import qwen
from medgrpo.train.attention import layout_attention, layout_mask
from medgrpo.train.decode import static_decoder, trim_ended
from medgrpo.train.distributed import all_finished
from medgrpo.train.token_sampling import draw_uniforms, filter_logits, sample_tokens

DECODERS = ("static", "dynamic")


@dataclass(frozen=True)
class RolloutConfig:
    """Sampling settings of a rollout, and how it is decoded.

    Attributes:
        group_size: G, completions per prompt.
        max_new_tokens: the longest completion; a row that reaches it without EOS is truncated.
        temperature: softmax temperature; 0 means greedy (argmax), and top-k / top-p are then unused.
        top_p: nucleus sampling: keep the smallest set of most likely tokens whose probability
            reaches ``top_p`` (always at least one token); 1 keeps all.
        top_k: keep the ``top_k`` most likely tokens; 0 keeps all.
        decode: "static": a static KV cache written in place, the prompt's KV stored once per group,
            one (compiled) step per token (medgrpo.train.decode); "dynamic": the reference loop on
            Hugging Face's DynamicCache. Both give the same tokens for the same seed.
        compile: torch.compile the static step (and capture it as a CUDA graph on a GPU). Compiling
            costs tens of seconds once per run; off, the static step runs eagerly.
        check_every: the static path reads the all-finished flag (a host sync) every this many steps.
    """

    group_size: int = 8
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    decode: str = "static"
    compile: bool = False
    check_every: int = 8

    def __post_init__(self) -> None:
        if self.group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {self.group_size}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.decode not in DECODERS:
            raise ValueError(f"decode must be one of {DECODERS}, got {self.decode!r}")
        if self.check_every < 1:
            raise ValueError(f"check_every must be >= 1, got {self.check_every}")


@dataclass
class Rollout:
    """The completions of one rollout, B prompts x G completions, group-major.

    Attributes:
        prompt_ids, prompt_mask: ``(B*G, P)`` each prompt repeated G times, left-padded.
        completion_ids: ``(B*G, T)``; after a row's EOS, ``pad_token_id``. ``T`` is the number of
            decoding steps run (at most ``max_new_tokens``).
        completion_mask: ``(B*G, T)`` int64, 1 up to and including the EOS token.
        completion_lengths: ``(B*G,)`` tokens in each completion, EOS included.
        prompt_index: ``(B*G,)`` which prompt of the batch each completion belongs to
            (``[0]*G + [1]*G + ...``).
        is_truncated: ``(B*G,)`` bool, no EOS within ``max_new_tokens``.
        video_embeds: per prompt, the (detached) video embeddings the rollout used, for reuse when
            computing log-probs of the same prompts.
        group_size: G.
        encode_s, prefill_s, decode_s: wall-clock seconds of the three stages (device-synchronized).
        prompt_tokens: valid prompt tokens over the B prompts (each counted once: prefilled once).
        completion_tokens: completion tokens over the B*G rows (``completion_mask.sum()``).
        decode_steps: decoding steps run.
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    completion_lengths: torch.Tensor
    prompt_index: torch.Tensor
    is_truncated: torch.Tensor
    video_embeds: list[torch.Tensor]
    group_size: int
    encode_s: float
    prefill_s: float
    decode_s: float
    prompt_tokens: int
    completion_tokens: int
    decode_steps: int

    def __len__(self) -> int:
        return self.completion_ids.shape[0]

    def timings(self) -> dict[str, float]:
        """Seconds per stage and throughput, for the step's metrics."""
        total = self.encode_s + self.prefill_s + self.decode_s
        return {
            "rollout/encode_s": self.encode_s,
            "rollout/prefill_s": self.prefill_s,
            "rollout/decode_s": self.decode_s,
            "rollout/total_s": total,
            "rollout/completion_tokens": float(self.completion_tokens),
            "rollout/decode_tokens_per_s": self.completion_tokens / max(self.decode_s, 1e-9),
        }


def completion_masks(
    completion_ids: torch.Tensor, eos_token_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(mask, lengths, is_truncated)`` of completions: the mask is 1 up to and including the first EOS.

    Correct when the pad token is itself an EOS token (``<|endoftext|>``): only the first EOS counts.
    """
    is_eos = torch.isin(completion_ids, eos_token_ids)
    eos_before = is_eos.long().cumsum(dim=-1) - is_eos.long()
    mask = (eos_before == 0).long()
    return mask, mask.sum(dim=-1), ~is_eos.any(dim=-1)


def vision_placeholder_ids(model: nn.Module, device: torch.device) -> torch.Tensor:
    """``<|image_pad|>`` and ``<|video_pad|>`` ids of the model (never sampled in a rollout)."""
    config = model.config
    return torch.tensor([config.image_token_id, config.video_token_id], dtype=torch.long, device=device)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put ``model`` in eval mode for the block; restore its training flag afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


class _Timer:
    """Wall-clock laps, synchronizing the device first so asynchronous kernels are counted."""

    def __init__(self, device: torch.device):
        self.device = device
        self.last = self._now()

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def lap(self) -> float:
        now = self._now()
        elapsed, self.last = now - self.last, now
        return elapsed


def _check_batch(batch: VideoBatch, eos_token_ids: Sequence[int]) -> None:
    if batch.pixel_values_videos is None:
        raise ValueError("the batch has no pixel_values_videos: call batch.to(device) first")
    if len(eos_token_ids) == 0:
        raise ValueError("eos_token_ids is empty: a rollout needs at least one stop token")
    if len(batch) == 0:
        raise ValueError("the batch has no prompts")
    if not bool(batch.attention_mask[:, -1].all()):
        raise ValueError("rollout prompts must be left-padded (VideoCollator(padding_side='left'))")


def _prefill(model: nn.Module, batch: VideoBatch, video_embeds: list[torch.Tensor], mask, cache=None) -> tuple:
    """Run the prompts (into ``cache``, or a layout's static cache through ``mask``); return the last
    position's logits and the next mrope position."""
    embeds = qwen.build_inputs_embeds(model, batch.input_ids, video_embeds)
    positions, rope_deltas = qwen.rope_positions(
        model, batch.input_ids, batch.video_grid_thw, batch.second_per_grid_ts, batch.attention_mask
    )
    hidden = qwen.hidden_states(model, embeds, positions, mask, cache=cache)
    return qwen.logits(model, hidden[:, -1]), qwen.next_positions(batch.attention_mask, rope_deltas)


def _decode(
    model: nn.Module,
    logits: torch.Tensor,
    attention_mask: torch.Tensor,
    position: torch.Tensor,
    cache,
    config: RolloutConfig,
    eos_ids: torch.Tensor,
    pad_token_id: int,
    uniforms: torch.Tensor | None,
) -> torch.Tensor:
    """The reference loop: sample up to ``max_new_tokens`` per row from the replicated cache; ``(N, T)`` tokens."""
    embed_tokens = model.get_input_embeddings()
    banned = vision_placeholder_ids(model, logits.device)
    finished = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
    tokens = []
    for step in range(config.max_new_tokens):
        draws = None if uniforms is None else uniforms[step]
        token = sample_tokens(logits, config, draws, banned_token_ids=banned).masked_fill(finished, pad_token_id)
        tokens.append(token)
        finished |= torch.isin(token, eos_ids)
        if step + 1 == config.max_new_tokens or all_finished(finished, model):  # the one host sync per step
            break
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(attention_mask.shape[0], 1)], dim=1)
        positions = qwen.text_positions(position + step, 1)
        hidden = qwen.hidden_states(model, embed_tokens(token[:, None]), positions, attention_mask, cache=cache)
        logits = qwen.logits(model, hidden[:, -1])
    return trim_ended(torch.stack(tokens, dim=1), eos_ids)  # a sharded model's ranks may step past their end


def _dynamic_rollout(model, batch, video_embeds, config, eos_ids, pad_token_id, uniforms, timer) -> tuple:
    """The reference path: prefill into a DynamicCache, replicate it G times, decode step by step."""
    group = config.group_size
    cache = qwen.new_cache(model)
    logits, position = _prefill(model, batch, video_embeds, batch.attention_mask, cache)
    prefill_s = timer.lap()
    cache.batch_repeat_interleave(group)
    completion_ids = _decode(
        model,
        logits.repeat_interleave(group, dim=0),
        batch.attention_mask.repeat_interleave(group, dim=0),
        position.repeat_interleave(group, dim=0),
        cache,
        config,
        eos_ids,
        pad_token_id,
        uniforms,
    )
    return completion_ids, prefill_s, timer.lap()


def _static_rollout(model, batch, video_embeds, config, eos_ids, pad_token_id, uniforms, timer) -> tuple:
    """The static path (medgrpo.train.decode): prefill into a static cache, then the (compiled) steps."""
    run = static_decoder(model, compile=config.compile).prepare(
        model,
        batch.attention_mask,
        config,
        eos_ids=eos_ids,
        banned=vision_placeholder_ids(model, eos_ids.device),
        pad_token_id=pad_token_id,
    )
    with layout_attention(model):
        mask = layout_mask(run.prefill_layout(batch.attention_mask))
        logits, position = _prefill(model, batch, video_embeds, mask)
    prefill_s = timer.lap()
    completion_ids = run.decode(logits, position, uniforms)
    return completion_ids, prefill_s, timer.lap()


@torch.no_grad()
def generate(
    model: nn.Module,
    batch: VideoBatch,
    config: RolloutConfig,
    *,
    eos_token_ids: Sequence[int],
    pad_token_id: int,
    generator: torch.Generator | None = None,
) -> Rollout:
    """Sample ``config.group_size`` completions for every prompt of ``batch``.

    Args:
        model: a ``Qwen2_5_VLForConditionalGeneration`` (put in eval mode for the call).
        batch: a :class:`~medgrpo.data.collate.VideoBatch` already moved with ``.to(device)``, prompts
            LEFT-padded (``VideoCollator(padding_side="left")``), no answers appended.
        config: group size, length limit, sampling settings and the decoder (``config.decode``).
        eos_token_ids: tokens that end a completion, e.g. ``<|im_end|>`` and ``<|endoftext|>``.
        pad_token_id: the token written after a completion's EOS.
        generator: the random source of sampling (on the batch's device); None uses torch's global one.
            A sampled rollout draws ``max_new_tokens x B*G`` uniform numbers from it up front (either
            decoder), a greedy one none.

    Returns:
        A :class:`Rollout` of ``B * G`` completions, the G of prompt ``b`` in rows ``b*G .. b*G+G-1``.
    """
    _check_batch(batch, eos_token_ids)
    group = config.group_size
    device = batch.input_ids.device
    eos_ids = torch.tensor(list(eos_token_ids), dtype=torch.long, device=device)
    rollout = _static_rollout if config.decode == "static" else _dynamic_rollout
    with eval_mode(model):
        timer = _Timer(device)
        video_embeds = qwen.encode_videos(model, batch.pixel_values_videos, batch.video_grid_thw)
        encode_s = timer.lap()
        uniforms = draw_uniforms(config, config.max_new_tokens, len(batch) * group, device, generator)
        completion_ids, prefill_s, decode_s = rollout(
            model, batch, video_embeds, config, eos_ids, pad_token_id, uniforms, timer
        )
    completion_mask, lengths, is_truncated = completion_masks(completion_ids, eos_ids)
    return Rollout(
        prompt_ids=batch.input_ids.repeat_interleave(group, dim=0),
        prompt_mask=batch.attention_mask.repeat_interleave(group, dim=0),
        completion_ids=completion_ids,
        completion_mask=completion_mask,
        completion_lengths=lengths,
        prompt_index=torch.arange(len(batch), device=device).repeat_interleave(group),
        is_truncated=is_truncated,
        video_embeds=[embeds.detach() for embeds in video_embeds],
        group_size=group,
        encode_s=encode_s,
        prefill_s=prefill_s,
        decode_s=decode_s,
        prompt_tokens=int(batch.attention_mask.sum()),
        completion_tokens=int(lengths.sum()),
        decode_steps=completion_ids.shape[1],
    )


def decode_text(tokenizer, rollout: Rollout) -> list[str]:
    """The completions as text (special tokens, EOS included, dropped), one per row of ``rollout``."""
    rows = [ids[:length] for ids, length in zip(rollout.completion_ids.tolist(), rollout.completion_lengths.tolist())]
    return tokenizer.batch_decode(rows, skip_special_tokens=True)


__all__ = [
    "DECODERS",
    "Rollout",
    "RolloutConfig",
    "completion_masks",
    "decode_text",
    "draw_uniforms",
    "filter_logits",
    "generate",
    "sample_tokens",
    "vision_placeholder_ids",
]
