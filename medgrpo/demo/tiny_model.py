"""A local Qwen2.5-VL-style tokenizer and a tiny random Qwen2.5-VL, built offline (the CPU demo, tests, benchmarks).

Nothing may be fetched from a model hub at run time, so tests and ``medgrpo demo`` build a
small byte-level BPE tokenizer here, with Qwen2.5-VL's special tokens (same strings, in the
same relative order) and Qwen2.5-VL's chat template, and save it as an ordinary Hugging Face
tokenizer directory. Code that works with it works with the real Qwen2.5-VL tokenizer: ids
are always looked up by token string, never hard-coded.

:func:`build_tiny_model` makes a random-weight ``Qwen2_5_VLForConditionalGeneration`` of the
real architecture at toy width (the same 14-pixel patches, frame pairs, 2×2 merge, window and
full-attention vision blocks, and multimodal RoPE), whose special token ids are those of a
tokenizer from :func:`build_tokenizer`, saved as safetensors so ``from_pretrained`` loads it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

# Qwen2.5-VL's special tokens, in the order of its tokenizer (ids 151643... there).
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# Qwen2.5-VL's chat template (its tokenizer_config / chat_template.json), unchanged in meaning:
# a default system turn, then each turn as <|im_start|>role\ncontent<|im_end|>\n, with images
# and videos as <|vision_start|><|image_pad|>/<|video_pad|><|vision_end|>.
QWEN2_5_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_BASE_CORPUS = (
    "You are a helpful assistant.",
    "system user assistant",
    "0 1 2 3 4 5 6 7 8 9 0.0 1.0 2.5 10.0 seconds: [x1, y1, x2, y2]",
    "Localize the action in the video. Answer with start-end seconds.",
    "Which phase comes next? Choose one label from the list.",
    "Two structures: 2, Cystic plate: 1, Hepatocystic triangle: 0",
    "Respect for tissue: 2/5, Time and motion: 3/5, Quality of final product: 3/5",
    "The grasper retracts the gallbladder while the hook dissects the cystic duct.",
    "clipping cutting dissection retraction coagulation irrigation suction suturing",
    "grasper hook scissors clipper bipolar irrigator needle driver forceps",
    "preparation calot triangle dissection clipping and cutting gallbladder dissection packaging",
)


def build_tokenizer(directory: str | os.PathLike, *, vocab_size: int = 512, corpus: Iterable[str] = ()):
    """Train a byte-level BPE tokenizer with Qwen2.5-VL's special tokens and chat template; save it.

    Args:
        directory: where to save it (``AutoTokenizer.from_pretrained(directory)`` loads it).
        vocab_size: BPE vocabulary size, special tokens included (at least 256 + 14).
        corpus: extra training text, e.g. the questions and answers of a dataset.

    Returns:
        The tokenizer (a ``transformers`` fast tokenizer), already saved to ``directory``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator([*_BASE_CORPUS, *corpus], trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=list(SPECIAL_TOKENS[1:]),
        chat_template=QWEN2_5_VL_CHAT_TEMPLATE,
        model_max_length=32768,
    )
    tokenizer.save_pretrained(os.fspath(directory))
    return tokenizer


def _mrope_section(head_dim: int) -> list[int]:
    """Split ``head_dim / 2`` rotary frequencies into (time, height, width) in Qwen2.5-VL's 16:24:24 ratio."""
    half = head_dim // 2
    time = max(1, round(half * 16 / 64))
    height = (half - time) // 2
    return [time, height, half - time - height]


def build_tiny_model(
    directory: str | os.PathLike,
    tokenizer,
    *,
    seed: int = 0,
    hidden_size: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate_size: int = 128,
    vision_depth: int = 2,
    vision_hidden: int = 32,
    vision_heads: int = 2,
    window_size: int = 56,
):
    """Save a random-weight tiny Qwen2.5-VL whose special token ids match ``tokenizer``.

    The architecture is Qwen2.5-VL's: 14-pixel patches over frame pairs, 2×2 patch merging into
    the text width, window attention in the vision tower with the last block of every four (and
    always the last one) attending globally, as 7/15/23/31 of the real 32, and multimodal RoPE
    whose (time, height, width) sections split ``head_dim / 2`` in the real 16:24:24 ratio.
    ``window_size`` is in pixels (112 in the real model: 4×4 merged patches; 56 here: 2×2).

    Args:
        directory: where to save it (``Qwen2_5_VLForConditionalGeneration.from_pretrained(directory)``).
        tokenizer: a tokenizer from :func:`build_tokenizer` (its vocabulary size and special ids are used).
        seed: seed of the random weights (the same seed gives the same weights).
        hidden_size, layers, heads, kv_heads, intermediate_size: the language model's shape.
        vision_depth, vision_hidden, vision_heads, window_size: the vision tower's shape.

    Returns:
        The model (float32, eval mode), already saved to ``directory`` with its config and generation config.
    """
    import torch
    from transformers import GenerationConfig, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from medgrpo.data.collate import special_token_id

    if hidden_size % heads or heads % kv_heads or vision_hidden % vision_heads:
        raise ValueError("hidden sizes must divide by the head counts, and heads by kv_heads")
    end_of_text, end_of_turn = special_token_id(tokenizer, "<|endoftext|>"), special_token_id(tokenizer, "<|im_end|>")
    fullatt = sorted({i for i in range(vision_depth) if i % 4 == 3} | {vision_depth - 1})
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": hidden_size,
            "intermediate_size": intermediate_size,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads,
            "max_window_layers": layers,
            "max_position_embeddings": 32768,
            "rms_norm_eps": 1e-6,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 1000000.0,
                "mrope_section": _mrope_section(hidden_size // heads),
            },
            "bos_token_id": end_of_text,
            "eos_token_id": end_of_turn,
            "pad_token_id": end_of_text,
        },
        vision_config={
            "depth": vision_depth,
            "hidden_size": vision_hidden,
            "intermediate_size": 2 * vision_hidden,
            "num_heads": vision_heads,
            "out_hidden_size": hidden_size,
            "patch_size": 14,
            "temporal_patch_size": 2,
            "spatial_merge_size": 2,
            "window_size": window_size,
            "fullatt_block_indexes": fullatt,
            "tokens_per_second": 2,
        },
        image_token_id=special_token_id(tokenizer, "<|image_pad|>"),
        video_token_id=special_token_id(tokenizer, "<|video_pad|>"),
        vision_start_token_id=special_token_id(tokenizer, "<|vision_start|>"),
        vision_end_token_id=special_token_id(tokenizer, "<|vision_end|>"),
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    # As Qwen2.5-VL's generation_config.json: stop at the end of the turn or of the text.
    model.generation_config = GenerationConfig(
        bos_token_id=end_of_text, eos_token_id=[end_of_turn, end_of_text], pad_token_id=end_of_text
    )
    model.save_pretrained(os.fspath(directory), safe_serialization=True)
    return model


__all__ = ["QWEN2_5_VL_CHAT_TEMPLATE", "SPECIAL_TOKENS", "build_tiny_model", "build_tokenizer"]
