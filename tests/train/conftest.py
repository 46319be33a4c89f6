"""Fixtures of the trainer tests: the tiny random Qwen2.5-VL in memory, and video batches.

The model is the session's tiny Qwen2.5-VL (tests/conftest.py: 2 text layers of width 64, a 2-block
vision tower, Qwen2.5-VL's patches and merge), whose special token ids are those of the session's
tokenizer, so the model and the collator agree on ``<|video_pad|>`` and friends.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from medgrpo.data.collate import VIDEO_TOKEN_TYPE, VideoBatch, VideoCollator, video_grid
from medgrpo.data.loader import DecodeOptions, VideoDataset
from medgrpo.data.records import RecordDataset
from medgrpo.testing.video_fixtures import write_jpeg_folder


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    """The tiny ``Qwen2_5_VLForConditionalGeneration`` in fp32, eval mode, SDPA attention."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        tiny_model_dir, local_files_only=True, dtype=torch.float32, attn_implementation="sdpa"
    ).eval()
    # Random init has tiny weights (std 0.02): scale the lm head so that sampling is not near-uniform
    # and greedy argmaxes are well separated (no near-ties that float noise could flip).
    torch.manual_seed(0)
    with torch.no_grad():
        model.get_output_embeddings().weight.normal_(0.0, 0.5)
    return model


@pytest.fixture(scope="session")
def clip_dataset():
    """``make(root, answers)``: a :class:`VideoDataset` of one tal record per answer over JPEG clips of 4, 6, ...
    frames, decoded at 56×56 (4×4 patches: 8 video tokens per 4 frames keep a forward fast)."""

    def make(root: Path, answers: tuple[str, ...]) -> VideoDataset:
        records = []
        for i, answer in enumerate(answers):
            frames = write_jpeg_folder(root / f"clip_{i}", 4 + 2 * i, (112, 112))
            conversations = [{"from": "human", "value": f"<video>\nQuestion {i}?"}, {"from": "gpt", "value": answer}]
            records.append(
                {
                    "conversations": conversations,
                    "video": [f"clip_{i}/{Path(p).name}" for p in frames],
                    "metadata": {"fps": "1.0", "video_id": f"v{i}"},
                    "qa_type": "tal",
                    "data_source": "AVOS",
                }
            )
        (root / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        return VideoDataset(
            RecordDataset(root / "records.jsonl"), DecodeOptions(min_pixels=56 * 56, max_pixels=56 * 56)
        )

    return make


def random_frames(num_frames: int, height: int, width: int, seed: int) -> torch.Tensor:
    """A random uint8 ``(T, H, W, 3)`` clip."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (num_frames, height, width, 3), dtype=torch.uint8, generator=generator)


def make_batch(tokenizer, questions, clips, seconds, padding_side: str) -> VideoBatch:
    """A :class:`VideoBatch` of chat-templated prompts over ``clips``, padded on ``padding_side``."""
    collator = VideoCollator(tokenizer, padding_side=padding_side)
    rows = [collator.prompt_ids(q, video_grid(c)) for q, c in zip(questions, clips)]
    length = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), length), collator.pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        start = length - len(row) if padding_side == "left" else 0
        input_ids[i, start : start + len(row)] = torch.tensor(row)
        attention_mask[i, start : start + len(row)] = 1
    return VideoBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        labels=None,
        prompt_lengths=torch.tensor([len(r) for r in rows]),
        frames=list(clips),
        video_grid_thw=torch.tensor([video_grid(c) for c in clips], dtype=torch.long),
        second_per_grid_ts=torch.tensor(seconds, dtype=torch.float32),
        mm_token_type_ids=(input_ids == collator.video_pad_id).long() * VIDEO_TOKEN_TYPE,
    )


@pytest.fixture(scope="session")
def clips():
    """Two clips of different sizes: 16 and 6 video tokens after the 2x2 merge."""
    return [random_frames(4, 56, 112, seed=1), random_frames(2, 84, 56, seed=2)]


QUESTIONS = (
    "Localize the action in the video. Answer with start-end seconds.",
    "Which phase comes next?",
)


@pytest.fixture(scope="session", params=["left", "right"])
def video_batch(request, tokenizer, clips) -> VideoBatch:
    """Two prompts with different videos and lengths, left- or right-padded, patchified on CPU."""
    return make_batch(tokenizer, QUESTIONS, clips, [1.0, 0.5], request.param).to("cpu")


@pytest.fixture(scope="session")
def questions() -> tuple[str, str]:
    """The two prompts' questions (one per clip)."""
    return QUESTIONS


@pytest.fixture(scope="session")
def batch_maker(tokenizer, clips):
    """``batch_maker(padding_side, questions=QUESTIONS)``: two prompts over the two clips, as the processor
    returns them (not moved to a device)."""
    return lambda padding_side, questions=QUESTIONS: make_batch(tokenizer, questions, clips, [1.0, 0.5], padding_side)


@pytest.fixture(scope="session")
def left_batch(tokenizer, clips) -> VideoBatch:
    """The two prompts, left-padded (what rollouts take)."""
    return make_batch(tokenizer, QUESTIONS, clips, [1.0, 0.5], "left").to("cpu")


@pytest.fixture(scope="session")
def rollout_maker(tokenizer):
    """``rollout_maker(model, batch, *, rows, steps, seed=0)``: a :func:`~medgrpo.testing.rollouts.synthetic_rollout`
    of ``batch``'s prompts and ``model``'s embeddings of its videos, with random text completions of the
    ``(length, truncated)`` ``rows`` (group-major), ending at ``<|im_end|>``."""
    from medgrpo.testing.rollouts import synthetic_rollout
    from medgrpo.train import qwen

    def make(model, batch: VideoBatch, *, rows, steps: int, seed: int = 0):
        with torch.no_grad():
            embeds = qwen.encode_videos(model, batch.pixel_values_videos, batch.video_grid_thw)
        return synthetic_rollout(
            batch.input_ids,
            batch.attention_mask,
            embeds,
            rows=rows,
            steps=steps,
            token_range=(max(tokenizer.all_special_ids) + 1, len(tokenizer)),
            eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
            pad_token_id=tokenizer.pad_token_id,
            seed=seed,
        )

    return make
