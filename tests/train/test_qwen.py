"""The Qwen2.5-VL stages of medgrpo.train.qwen against the Hugging Face forward of the same model."""

from __future__ import annotations

import pytest
import torch

from medgrpo.train import qwen


def hf_logits(model, batch) -> torch.Tensor:
    """The HF forward's logits (mrope positions need mm_token_type_ids in transformers 5.x: the batch has them)."""
    inputs = batch.model_inputs()
    assert torch.equal(inputs["mm_token_type_ids"], qwen.mm_token_type_ids(model, batch.input_ids))
    with torch.no_grad():
        output = model(**inputs)
    return output.logits


def our_hidden(model, batch) -> torch.Tensor:
    videos = qwen.encode_videos(model, batch.pixel_values_videos, batch.video_grid_thw)
    embeds = qwen.build_inputs_embeds(model, batch.input_ids, videos)
    positions, _ = qwen.rope_positions(
        model, batch.input_ids, batch.video_grid_thw, batch.second_per_grid_ts, batch.attention_mask
    )
    with torch.no_grad():
        return qwen.hidden_states(model, embeds, positions, batch.attention_mask)


def test_hidden_states_times_lm_head_equal_hf_logits(tiny_model, video_batch):
    expected = hf_logits(tiny_model, video_batch)
    hidden = our_hidden(tiny_model, video_batch)
    assert hidden.shape == (*video_batch.input_ids.shape, tiny_model.config.text_config.hidden_size)
    ours = hidden @ qwen.lm_head_weight(tiny_model).T
    valid = video_batch.attention_mask.bool()
    torch.testing.assert_close(ours[valid], expected[valid], rtol=1e-5, atol=1e-5)
    # The logits are not trivially equal: the two prompts' outputs differ and depend on the video.
    assert (expected[0, valid[0]][-1] - expected[1, valid[1]][-1]).abs().max() > 1e-2


def test_positions_are_3d_and_differ_from_text_positions(tiny_model, video_batch):
    positions, deltas = qwen.rope_positions(
        tiny_model,
        video_batch.input_ids,
        video_batch.video_grid_thw,
        video_batch.second_per_grid_ts,
        video_batch.attention_mask,
    )
    batch_size, length = video_batch.input_ids.shape
    assert positions.shape == (3, batch_size, length) and deltas.shape == (batch_size, 1)
    is_video = video_batch.input_ids == tiny_model.config.video_token_id
    # On video tokens the three axes differ (time, row, column); on text tokens they agree.
    assert (positions[1][is_video] != positions[2][is_video]).any()
    text = video_batch.attention_mask.bool() & ~is_video
    assert torch.equal(positions[0][text], positions[1][text])
    # The next token's position is the prompt's largest position + 1, on every row.
    after = qwen.next_positions(video_batch.attention_mask, deltas)
    assert torch.equal(after, positions.amax(dim=(0, 2)) + 1)
    # A video of 4x8 patches (2x4 tokens per frame pair) spans fewer positions than its 16 tokens.
    assert int(deltas[0]) < 0


def test_encode_once_and_reuse_equals_encoding_each_copy(tiny_model, left_batch):
    group = 3
    once = qwen.encode_videos(tiny_model, left_batch.pixel_values_videos, left_batch.video_grid_thw)
    assert [e.shape[0] for e in once] == [16, 6]
    # Encoding G copies of each video (the rows of G-fold repeated prompts).
    rows = torch.split(left_batch.pixel_values_videos, left_batch.video_grid_thw.prod(-1).tolist())
    pixels = torch.cat([r for r in rows for _ in range(group)])
    grids = left_batch.video_grid_thw.repeat_interleave(group, dim=0)
    each = qwen.encode_videos(tiny_model, pixels, grids)
    reused = qwen.repeat_videos(once, group)
    assert len(each) == len(reused) == 2 * group
    for a, b in zip(reused, each):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    ids = left_batch.input_ids.repeat_interleave(group, dim=0)
    torch.testing.assert_close(
        qwen.build_inputs_embeds(tiny_model, ids, reused), qwen.build_inputs_embeds(tiny_model, ids, each)
    )


def test_build_inputs_embeds_puts_videos_at_placeholders(tiny_model, left_batch):
    videos = qwen.encode_videos(tiny_model, left_batch.pixel_values_videos, left_batch.video_grid_thw)
    embeds = qwen.build_inputs_embeds(tiny_model, left_batch.input_ids, videos)
    is_video = left_batch.input_ids == tiny_model.config.video_token_id
    torch.testing.assert_close(embeds[0][is_video[0]], videos[0])
    torch.testing.assert_close(embeds[1][is_video[1]], videos[1])
    text_embeds = tiny_model.get_input_embeddings()(left_batch.input_ids)
    torch.testing.assert_close(embeds[~is_video], text_embeds[~is_video])
    with pytest.raises(RuntimeError, match="do not match"):
        qwen.build_inputs_embeds(tiny_model, left_batch.input_ids, videos[:1])


def test_gradients_flow_through_reused_videos(tiny_model, left_batch):
    videos = qwen.encode_videos(tiny_model, left_batch.pixel_values_videos, left_batch.video_grid_thw)
    ids = left_batch.input_ids.repeat_interleave(2, dim=0)
    mask = left_batch.attention_mask.repeat_interleave(2, dim=0)
    embeds = qwen.build_inputs_embeds(tiny_model, ids, qwen.repeat_videos(videos, 2))
    grids = left_batch.video_grid_thw.repeat_interleave(2, dim=0)
    seconds = left_batch.second_per_grid_ts.repeat_interleave(2)
    positions, _ = qwen.rope_positions(tiny_model, ids, grids, seconds, mask)
    hidden = qwen.hidden_states(tiny_model, embeds, positions, mask)
    hidden[:, -1].sum().backward()
    merger_grads = [p.grad for p in tiny_model.model.visual.merger.parameters()]
    tiny_model.zero_grad(set_to_none=True)
    assert all(g is not None and g.abs().sum() > 0 for g in merger_grads)


def test_cache_continues_the_sequence(tiny_model, left_batch):
    """Prefill + one cached step gives the hidden state of the full forward over prompt + token."""
    batch = left_batch
    videos = qwen.encode_videos(tiny_model, batch.pixel_values_videos, batch.video_grid_thw)
    positions, deltas = qwen.rope_positions(
        tiny_model, batch.input_ids, batch.video_grid_thw, batch.second_per_grid_ts, batch.attention_mask
    )
    token = torch.tensor([[7], [9]])
    ids = torch.cat([batch.input_ids, token], dim=1)
    mask = torch.cat([batch.attention_mask, torch.ones_like(token)], dim=1)
    with torch.no_grad():
        cache = qwen.new_cache(tiny_model)
        embeds = qwen.build_inputs_embeds(tiny_model, batch.input_ids, videos)
        qwen.hidden_states(tiny_model, embeds, positions, batch.attention_mask, cache=cache)
        step_positions = qwen.text_positions(qwen.next_positions(batch.attention_mask, deltas), 1)
        step = qwen.hidden_states(
            tiny_model, tiny_model.get_input_embeddings()(token), step_positions, mask, cache=cache
        )
        full_positions, _ = qwen.rope_positions(tiny_model, ids, batch.video_grid_thw, batch.second_per_grid_ts, mask)
        full = qwen.hidden_states(tiny_model, qwen.build_inputs_embeds(tiny_model, ids, videos), full_positions, mask)
    torch.testing.assert_close(step[:, -1], full[:, -1], rtol=1e-5, atol=1e-5)
    assert torch.equal(step_positions[:, :, 0], full_positions[:, :, -1])
