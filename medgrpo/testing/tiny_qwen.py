"""A local Qwen2.5-VL-style tokenizer, built offline (tests and the CPU demo).

Nothing may be fetched from a model hub at run time, so tests and ``medgrpo demo`` build a
small byte-level BPE tokenizer here, with Qwen2.5-VL's special tokens (same strings, in the
same relative order) and Qwen2.5-VL's chat template, and save it as an ordinary Hugging Face
tokenizer directory. Code that works with it works with the real Qwen2.5-VL tokenizer: ids
are always looked up by token string, never hard-coded.
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


__all__ = ["QWEN2_5_VL_CHAT_TEMPLATE", "SPECIAL_TOKENS", "build_tokenizer"]
