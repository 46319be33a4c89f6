"""Fixtures of the trainer tests: a tiny random Qwen2.5-VL, its offline tokenizer, and video batches.

The model is built here from a ``Qwen2_5_VLConfig`` (no hub access): 2 text layers of width 64 with
4 heads (head_dim 16, so ``mrope_section`` sums to 8), a 2-block vision tower of width 32 whose merger
projects to 64, Qwen2.5-VL's 14-pixel patches, frame pairs and 2x2 merge. Its special token ids are
looked up by token string in :func:`medgrpo.demo.tiny_model.build_tokenizer`'s tokenizer, so the
model and the collator agree on ``<|video_pad|>`` and friends.
"""

from __future__ import annotations

import pytest
import torch

from medgrpo.data.collate import VIDEO_TOKEN_TYPE, VideoBatch, VideoCollator, video_grid
from medgrpo.demo.tiny_model import build_tokenizer


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    """The offline Qwen2.5-VL-style tokenizer (512 tokens)."""
    return build_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def tiny_config(tokenizer):
    """A tiny ``Qwen2_5_VLConfig`` whose special ids come from ``tokenizer``."""
    from transformers import Qwen2_5_VLConfig

    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in tokenizer.all_special_tokens}
    text_config = {
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4096,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
    }
    vision_config = {
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "out_hidden_size": 64,
        "patch_size": 14,
        "temporal_patch_size": 2,
        "spatial_merge_size": 2,
        "window_size": 56,
        "fullatt_block_indexes": [1],
        "tokens_per_second": 2,
    }
    return Qwen2_5_VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )


@pytest.fixture(scope="session")
def tiny_model(tokenizer):
    """A tiny random ``Qwen2_5_VLForConditionalGeneration`` in fp32, eval mode, SDPA attention."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    config = tiny_config(tokenizer)
    config._attn_implementation = "sdpa"
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    # Random init has tiny weights (std 0.02): scale the lm head so that sampling is not near-uniform
    # and greedy argmaxes are well separated (no near-ties that float noise could flip).
    with torch.no_grad():
        model.get_output_embeddings().weight.normal_(0.0, 0.5)
    return model


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
def left_batch(tokenizer, clips) -> VideoBatch:
    """The two prompts, left-padded (what rollouts take)."""
    return make_batch(tokenizer, QUESTIONS, clips, [1.0, 0.5], "left").to("cpu")
