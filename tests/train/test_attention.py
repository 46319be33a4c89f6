"""The layout attention dispatcher: registered through transformers, switched per block, restored."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from medgrpo.train import qwen
from medgrpo.train.attention import LAYOUT_ATTENTION, layout_attention, layout_mask


class CausalLayout:
    """Plain causal attention with GQA, written out: a layout equal to the model's own SDPA."""

    def __init__(self) -> None:
        self.layers: list[int] = []

    def attend(self, module, query, key, value, *, scaling):
        self.layers.append(module.layer_idx)
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling, enable_gqa=True)
        return out.transpose(1, 2)


def text_positions(batch: int, length: int) -> torch.Tensor:
    return torch.arange(length).view(1, 1, -1).expand(3, batch, -1)


def test_layout_equals_the_model_attention_and_sees_every_layer(tiny_model):
    embeds = torch.randn(2, 7, tiny_model.config.get_text_config().hidden_size)
    positions = text_positions(2, 7)
    expected = qwen.hidden_states(tiny_model, embeds, positions, None)
    layout = CausalLayout()
    with layout_attention(tiny_model):
        got = qwen.hidden_states(tiny_model, embeds, positions, layout_mask(layout))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert layout.layers == list(range(tiny_model.config.get_text_config().num_hidden_layers))


def test_implementation_is_restored_after_an_error(tiny_model):
    before = tiny_model.config.get_text_config()._attn_implementation
    embeds = torch.randn(1, 3, tiny_model.config.get_text_config().hidden_size)
    with pytest.raises(TypeError, match="AttentionLayout"):
        with layout_attention(tiny_model):
            assert tiny_model.config.get_text_config()._attn_implementation == LAYOUT_ATTENTION
            qwen.hidden_states(tiny_model, embeds, text_positions(1, 3), None)  # a plain mask inside the block
    assert tiny_model.config.get_text_config()._attn_implementation == before
    assert tiny_model.config.vision_config._attn_implementation == before


def test_nested_blocks_restore_once(tiny_model):
    before = tiny_model.config.get_text_config()._attn_implementation
    with layout_attention(tiny_model):
        with layout_attention(tiny_model):
            pass
        assert tiny_model.config.get_text_config()._attn_implementation == LAYOUT_ATTENTION
    assert tiny_model.config.get_text_config()._attn_implementation == before
