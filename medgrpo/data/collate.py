"""Decoded clips → token batches for Qwen2.5-VL: chat template, video placeholders, SFT labels.

The prompt is what the MedGRPO authors' inference builds: the tokenizer's chat template over
one user turn ``<|vision_start|><|video_pad|><|vision_end|>{question}`` (the default system
turn comes from the template), with the generation prompt. Its single ``<|video_pad|>`` is
then expanded to one token per merged 2×2 patch, ``grid_t * grid_h * grid_w / 4`` of them,
exactly as the Hugging Face Qwen2.5-VL processor expands it.

For SFT the answer is tokenized on its own and followed by ``<|im_end|>``; ``labels`` are the
answer tokens and that ``<|im_end|>`` (the model learns to stop), ``-100`` elsewhere. Prompt
and answer are tokenized separately, the same split a GRPO rollout has (prompt ids, then
generated ids).

Videos of different lengths and sizes are not padded: their frames stay a list of uint8
clips, and :meth:`VideoBatch.to` patchifies each on the target device (one launch per video,
see :mod:`medgrpo.ops.patchify`) and concatenates the rows into ``pixel_values_videos``, the
layout Qwen2.5-VL takes natively (rows of all videos back to back, ``video_grid_thw`` saying
where each ends). Only the token sequences are padded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch

from medgrpo.data.loader import SkippedSample, VideoSample
from medgrpo.ops.patchify import MERGE_SIZE, PATCH_SIZE, ROW_LEN, TEMPORAL_PATCH_SIZE, patchify

IGNORE_INDEX = -100
VIDEO_TOKEN_TYPE = 2  # transformers' mm_token_type_ids value of video tokens (0 text, 1 image)
VIDEO_PAD = "<|video_pad|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
END_OF_TURN = "<|im_end|>"


def video_grid(frames: torch.Tensor) -> tuple[int, int, int]:
    """``(grid_t, grid_h, grid_w)`` of a uint8 ``(T, H, W, 3)`` clip in 14-pixel patches and frame pairs."""
    num_frames, height, width = frames.shape[0], frames.shape[1], frames.shape[2]
    return num_frames // TEMPORAL_PATCH_SIZE, height // PATCH_SIZE, width // PATCH_SIZE


def video_token_count(grid: Sequence[int]) -> int:
    """Placeholder tokens of one video: one per merged ``2×2`` patch."""
    grid_t, grid_h, grid_w = grid
    return grid_t * grid_h * grid_w // (MERGE_SIZE * MERGE_SIZE)


@dataclass
class VideoBatch:
    """A collated batch (on the host until :meth:`to`).

    Attributes:
        input_ids, attention_mask: ``(B, L)``, padded on ``padding_side``.
        labels: ``(B, L)`` answer tokens and ``-100`` elsewhere, or None (no answers).
        prompt_lengths: ``(B,)`` tokens of each prompt, placeholders included.
        frames: per video, uint8 ``(T, H, W, 3)``.
        video_grid_thw: ``(B, 3)`` int64. second_per_grid_ts: ``(B,)`` float32.
        pixel_values_videos: ``(sum of rows, 1176)`` after :meth:`to`, else None.
        mm_token_type_ids: ``(B, L)`` 2 at video placeholders, 0 elsewhere: transformers 5.x
            computes Qwen2.5-VL's 3D rope positions in its forward only when it is given.
        records: the samples' records (ids, data sources, task types, reference answers).
        skipped: records that could not be used, for the loader to count.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor | None
    prompt_lengths: torch.Tensor
    frames: list[torch.Tensor]
    video_grid_thw: torch.Tensor
    second_per_grid_ts: torch.Tensor
    records: list = field(default_factory=list)
    skipped: list[SkippedSample] = field(default_factory=list)
    pixel_values_videos: torch.Tensor | None = None
    mm_token_type_ids: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def pin_memory(self) -> VideoBatch:
        """Page-locked copies of the tensors (``DataLoader(pin_memory=True)`` calls this)."""
        return replace(
            self,
            input_ids=self.input_ids.pin_memory(),
            attention_mask=self.attention_mask.pin_memory(),
            labels=None if self.labels is None else self.labels.pin_memory(),
            frames=[f.pin_memory() for f in self.frames],
        )

    def to(self, device: torch.device | str, pixel_dtype: torch.dtype = torch.float32) -> VideoBatch:
        """Move to ``device`` and patchify the clips there into ``pixel_values_videos``."""
        device = torch.device(device)
        frames = [f.to(device, non_blocking=True) for f in self.frames]
        rows = [patchify(f, dtype=pixel_dtype)[0] for f in frames]
        pixels = torch.cat(rows) if rows else torch.empty(0, ROW_LEN, dtype=pixel_dtype, device=device)
        return replace(
            self,
            input_ids=self.input_ids.to(device, non_blocking=True),
            attention_mask=self.attention_mask.to(device, non_blocking=True),
            labels=None if self.labels is None else self.labels.to(device, non_blocking=True),
            prompt_lengths=self.prompt_lengths.to(device, non_blocking=True),
            frames=frames,
            video_grid_thw=self.video_grid_thw.to(device, non_blocking=True),
            second_per_grid_ts=self.second_per_grid_ts.to(device, non_blocking=True),
            pixel_values_videos=pixels,
            mm_token_type_ids=None if self.mm_token_type_ids is None else self.mm_token_type_ids.to(device),
        )

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """Keyword arguments for ``Qwen2_5_VLForConditionalGeneration`` (after :meth:`to`)."""
        if self.pixel_values_videos is None:
            raise RuntimeError("call .to(device) first: it computes pixel_values_videos")
        return {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "pixel_values_videos": self.pixel_values_videos,
            "video_grid_thw": self.video_grid_thw,
            "second_per_grid_ts": self.second_per_grid_ts,
            "mm_token_type_ids": self.mm_token_type_ids,
        }


@dataclass
class TokenizedSample:
    """A decoded sample and its token ids: the prompt (placeholders expanded), then the answer for SFT."""

    sample: VideoSample
    ids: list[int]
    prompt_length: int


@dataclass
class TokenizedItems:
    """A loader's items tokenized but not padded (:meth:`VideoCollator.tokenize_items`), in the order drawn."""

    items: list[TokenizedSample | SkippedSample]

    @property
    def skipped(self) -> list[SkippedSample]:
        """The items that cannot be used (what a loader counts)."""
        return [item for item in self.items if isinstance(item, SkippedSample)]

    def pin_memory(self) -> TokenizedItems:
        """Page-locked frames (``DataLoader(pin_memory=True)`` calls this)."""
        return TokenizedItems(
            [
                replace(item, sample=replace(item.sample, frames=item.sample.frames.pin_memory()))
                if isinstance(item, TokenizedSample)
                else item
                for item in self.items
            ]
        )


class VideoCollator:
    """Collate :class:`~medgrpo.data.loader.VideoSample` s into a :class:`VideoBatch`.

    Args:
        tokenizer: a Qwen2.5-VL tokenizer (with its chat template).
        with_answers: append the reference answers and build SFT ``labels``.
        padding_side: ``"right"`` for training, ``"left"`` for generation.
        max_length: a sample whose tokens exceed it is skipped (kind ``"too_long"``), not truncated.
    """

    def __init__(
        self, tokenizer, *, with_answers: bool = False, padding_side: str = "right", max_length: int | None = None
    ):
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self.tokenizer = tokenizer
        self.with_answers = with_answers
        self.padding_side = padding_side
        self.max_length = max_length
        self.video_pad_id = special_token_id(self.tokenizer, VIDEO_PAD)
        self.end_of_turn_id = special_token_id(self.tokenizer, END_OF_TURN)
        pad_id = tokenizer.pad_token_id
        self.pad_id = special_token_id(self.tokenizer, "<|endoftext|>") if pad_id is None else pad_id

    def prompt_text(self, question: str) -> str:
        """The chat-templated prompt of one question, with one (unexpanded) video placeholder."""
        content = f"{VISION_START}{VIDEO_PAD}{VISION_END}{question}"
        messages = [{"role": "user", "content": content}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def prompt_ids(self, question: str, grid: Sequence[int]) -> list[int]:
        """Token ids of the prompt, the placeholder expanded to :func:`video_token_count` tokens."""
        ids = self.tokenizer(self.prompt_text(question), add_special_tokens=False)["input_ids"]
        if ids.count(self.video_pad_id) != 1:
            raise ValueError(f"the question must not contain {VIDEO_PAD} itself")
        at = ids.index(self.video_pad_id)
        return ids[:at] + [self.video_pad_id] * video_token_count(grid) + ids[at + 1 :]

    def answer_ids(self, answer: str) -> list[int]:
        """Token ids of a reference answer followed by ``<|im_end|>``."""
        return self.tokenizer(answer, add_special_tokens=False)["input_ids"] + [self.end_of_turn_id]

    def __call__(self, items: Sequence[VideoSample | SkippedSample]) -> VideoBatch:
        """The batch of ``items``: each tokenized (:meth:`tokenize`), the usable ones padded (:meth:`pad`)."""
        tokenized = [self.tokenize(item) for item in items]
        return self.pad(
            [t for t in tokenized if isinstance(t, TokenizedSample)],
            [t for t in tokenized if isinstance(t, SkippedSample)],
        )

    def tokenize_items(self, items: Sequence[VideoSample | SkippedSample]) -> TokenizedItems:
        """Each item tokenized, in order, not padded: a loader's collate when batches are assembled later
        (:meth:`pad`), e.g. refilled from the next items when some were skipped."""
        return TokenizedItems([self.tokenize(item) for item in items])

    def tokenize(self, item: VideoSample | SkippedSample) -> TokenizedSample | SkippedSample:
        """A sample's prompt (and answer) ids, or why it cannot be used (a skipped item stays skipped)."""
        if isinstance(item, SkippedSample):
            return item
        record = item.record
        if self.with_answers and record.answer is None:
            return SkippedSample(record.index, record.id, "no_answer", "SFT needs the record's gpt answer")
        try:
            prompt = self.prompt_ids(record.question, video_grid(item.frames))
        except ValueError as error:
            return SkippedSample(record.index, record.id, "bad_prompt", str(error))
        answer = self.answer_ids(record.answer) if self.with_answers else []
        if self.max_length is not None and len(prompt) + len(answer) > self.max_length:
            reason = f"{len(prompt) + len(answer)} tokens > max_length {self.max_length}"
            return SkippedSample(record.index, record.id, "too_long", reason)
        return TokenizedSample(item, prompt + answer, len(prompt))

    def pad(self, rows: Sequence[TokenizedSample], skipped: Sequence[SkippedSample] = ()) -> VideoBatch:
        """The :class:`VideoBatch` of tokenized samples, padded on ``padding_side``; ``skipped`` rides along."""
        length = max((len(row.ids) for row in rows), default=0)
        input_ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long) if self.with_answers else None
        for i, row in enumerate(rows):
            start = length - len(row.ids) if self.padding_side == "left" else 0
            end = start + len(row.ids)
            input_ids[i, start:end] = torch.tensor(row.ids, dtype=torch.long)
            attention_mask[i, start:end] = 1
            if labels is not None:
                labels[i, start + row.prompt_length : end] = input_ids[i, start + row.prompt_length : end]
        samples = [row.sample for row in rows]
        grids = [video_grid(s.frames) for s in samples]
        return VideoBatch(
            input_ids=input_ids,
            attention_mask=attention_mask,
            labels=labels,
            prompt_lengths=torch.tensor([row.prompt_length for row in rows], dtype=torch.long),
            frames=[s.frames for s in samples],
            video_grid_thw=torch.tensor(grids, dtype=torch.long).reshape(len(samples), 3),
            second_per_grid_ts=torch.tensor([s.plan.second_per_grid_ts for s in samples], dtype=torch.float32),
            records=[s.record for s in samples],
            skipped=list(skipped),
            mm_token_type_ids=(input_ids == self.video_pad_id).long() * VIDEO_TOKEN_TYPE,
        )


def special_token_id(tokenizer, token: str) -> int:
    """The id of one of Qwen2.5-VL's special tokens; ValueError when the tokenizer lacks it."""
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise ValueError(f"the tokenizer has no {token} token: is it a Qwen2.5-VL tokenizer?")
    return token_id


def eos_ids(tokenizer) -> list[int]:
    """Tokens that end a completion: ``<|im_end|>`` and the pad/end-of-text token."""
    ids = [tokenizer.convert_tokens_to_ids(END_OF_TURN)]
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id not in ids:
        ids.append(tokenizer.pad_token_id)
    return ids


__all__ = [
    "IGNORE_INDEX",
    "TokenizedItems",
    "TokenizedSample",
    "VideoBatch",
    "VideoCollator",
    "eos_ids",
    "special_token_id",
    "video_grid",
    "video_token_count",
]
