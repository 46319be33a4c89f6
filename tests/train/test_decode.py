"""The static-cache decoder: its attention, its prefill, the compiled step (equal to HF generate and to the
reference loop, compiled once for every prompt-length bucket) and, on a GPU, the captured CUDA graphs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from medgrpo.train import decode as decode_module
from medgrpo.train import qwen
from medgrpo.train.attention import layout_attention, layout_mask
from medgrpo.train.decode import bucket, static_decoder
from medgrpo.train.rollout import RolloutConfig, generate, vision_placeholder_ids
from medgrpo.train.static_cache import PrefillLayout, StaticKVCache, decode_bias, grouped_decode_attention

HAS_CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def stops(tokenizer) -> dict:
    end_of_text = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    return {"eos_token_ids": [tokenizer.convert_tokens_to_ids("<|im_end|>"), end_of_text], "pad_token_id": end_of_text}


def test_buckets_grow_by_at_most_half():
    assert [bucket(n) for n in range(1, 14)] == [1, 2, 3, 4, 6, 6, 8, 8, 12, 12, 12, 12, 16]
    assert [bucket(n, minimum=16) for n in (1, 16, 17, 25, 33, 61, 99, 1000)] == [16, 16, 24, 32, 48, 64, 128, 1024]
    for n in range(1, 3000):
        assert n <= bucket(n) and bucket(n) < 1.5 * n + 1
    with pytest.raises(ValueError):
        bucket(0)


@pytest.mark.parametrize("group,heads,kv_heads", [(1, 4, 4), (4, 8, 2), (3, 6, 1)])
def test_grouped_attention_equals_sdpa_on_repeated_kv(group, heads, kv_heads):
    """The joint softmax over the group's prompt and the row's completion = SDPA over their concatenation."""
    gen = torch.Generator().manual_seed(0)
    prompts, dim, prompt_len, new_tokens, step = 3, 16, 11, 7, 4
    randn = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)
    query = randn(prompts * group, heads, 1, dim)
    prompt_keys, prompt_values = randn(prompts, kv_heads, prompt_len, dim), randn(prompts, kv_heads, prompt_len, dim)
    keys, values = randn(prompts * group, kv_heads, new_tokens, dim), randn(prompts * group, kv_heads, new_tokens, dim)
    prompt_valid = torch.ones(prompts, prompt_len, dtype=torch.bool)
    prompt_valid[0, :3] = prompt_valid[2, :10] = False  # left padding; prompt 2 has one token
    completion_valid = torch.arange(new_tokens) <= step
    bias = decode_bias(prompt_valid, completion_valid, group)
    got = grouped_decode_attention(query, prompt_keys, prompt_values, keys, values, bias, scaling=dim**-0.5)
    all_keys = torch.cat([prompt_keys.repeat_interleave(group, 0), keys], dim=2)
    all_values = torch.cat([prompt_values.repeat_interleave(group, 0), values], dim=2)
    mask = torch.cat([prompt_valid.repeat_interleave(group, 0), completion_valid.expand(len(query), -1)], dim=1)
    expected = F.scaled_dot_product_attention(
        query, all_keys, all_values, attn_mask=mask[:, None, None], scale=dim**-0.5, enable_gqa=True
    ).transpose(1, 2)
    assert got.shape == (prompts * group, 1, heads, dim)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_prefill_fills_the_cache_as_hf_does(tiny_model, left_batch):
    """The prefill layout gives the model's own hidden states at valid positions and stores, right-aligned in a
    longer bucket, the keys and values Hugging Face's DynamicCache holds."""
    embeds = qwen.build_inputs_embeds(
        tiny_model,
        left_batch.input_ids,
        qwen.encode_videos(tiny_model, left_batch.pixel_values_videos, left_batch.video_grid_thw),
    )
    positions, _ = qwen.rope_positions(
        tiny_model,
        left_batch.input_ids,
        left_batch.video_grid_thw,
        left_batch.second_per_grid_ts,
        left_batch.attention_mask,
    )
    mask = left_batch.attention_mask
    dynamic = qwen.new_cache(tiny_model)
    with torch.no_grad():
        expected = qwen.hidden_states(tiny_model, embeds, positions, mask, cache=dynamic)
        cache = StaticKVCache.allocate(
            tiny_model.config.get_text_config(),
            prompts=3,
            group_size=2,
            prompt_length=mask.shape[1] + 5,
            new_tokens=4,
            dtype=torch.float32,
            device=torch.device("cpu"),
        )
        with layout_attention(tiny_model):
            got = qwen.hidden_states(tiny_model, embeds, positions, layout_mask(PrefillLayout(cache, mask)))
    valid = mask.bool()
    torch.testing.assert_close(got[valid], expected[valid], rtol=1e-5, atol=1e-5)
    assert torch.equal(cache.prompt_valid[:2, 5:], valid) and not cache.prompt_valid[:2, :5].any()
    for layer, hf in enumerate(dynamic.layers):
        for ours, theirs in ((cache.prompt_keys[layer], hf.keys), (cache.prompt_values[layer], hf.values)):
            torch.testing.assert_close(ours[:2, :, 5:].transpose(1, 2)[valid], theirs.transpose(1, 2)[valid])


def test_prefill_refuses_prompts_longer_than_the_cache(tiny_model, left_batch):
    cache = StaticKVCache.allocate(
        tiny_model.config.get_text_config(),
        prompts=2,
        group_size=1,
        prompt_length=8,
        new_tokens=4,
        dtype=torch.float32,
        device=torch.device("cpu"),
    )
    with pytest.raises(ValueError, match="do not fit"):
        PrefillLayout(cache, left_batch.attention_mask)


def unique_graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


@pytest.mark.slow
def test_compiled_greedy_equals_hf_generate(tiny_model, left_batch, stops):
    config = RolloutConfig(group_size=1, max_new_tokens=12, temperature=0.0, compile=True)
    rollout = generate(tiny_model, left_batch, config, **stops)
    with torch.no_grad():
        out = tiny_model.generate(
            **left_batch.model_inputs(),
            do_sample=False,
            max_new_tokens=12,
            eos_token_id=stops["eos_token_ids"],
            pad_token_id=stops["pad_token_id"],
            suppress_tokens=vision_placeholder_ids(tiny_model, torch.device("cpu")).tolist(),
        )
    assert torch.equal(rollout.completion_ids, out[:, left_batch.input_ids.shape[1] :])


@pytest.mark.slow
def test_compiled_sampling_equals_the_reference_and_compiles_once(tiny_model, batch_maker, stops):
    """Rollouts of three sizes: prompts in three length buckets (46 -> 48, 61 -> 64, 99 -> 128), group sizes 3, 2
    and 4, token budgets 10, 20 and 12 (buckets 16 and 24). One compile in all (every size is a dynamic size of the
    graph), and the tokens of the reference loop for the same seed."""
    questions = [("Why?", "Which?"), ("Localize the action. Answer in seconds.", "Which phase comes next?")]
    questions.append(("Localize the action in the video. " * 3, "Which phase comes next? " * 2))
    batches = [batch_maker("left", q).to("cpu") for q in questions]
    assert len({bucket(b.input_ids.shape[1], minimum=16) for b in batches}) == 3
    sizes = [(3, 10), (2, 20), (4, 12)]  # (G, max_new_tokens)
    settings = {"temperature": 0.9, "top_k": 64, "top_p": 0.95, "check_every": 4}
    before = unique_graphs()
    for batch, (group, tokens) in zip(batches, sizes):
        rollouts = [
            generate(
                tiny_model,
                batch,
                RolloutConfig(**settings, group_size=group, max_new_tokens=tokens, decode=decode, compile=compile),
                **stops,
                generator=torch.Generator().manual_seed(5),
            )
            for decode, compile in (("dynamic", False), ("static", True))
        ]
        assert torch.equal(rollouts[1].completion_ids, rollouts[0].completion_ids)
    assert unique_graphs() - before <= 1
    assert static_decoder(tiny_model, compile=True).compiled


@pytest.mark.parametrize("every,checks", [(1, 11), (4, 3), (12, 1)])
def test_all_finished_is_read_every_k_steps(tiny_model, left_batch, monkeypatch, every, checks):
    """The host reads the all-finished flag at steps 0, k, 2k, ... of the 11 after the first token (no row ends
    here: the stop token is a vision placeholder, never sampled), and the rollout still runs all 12 tokens."""
    reads, original = [], decode_module.all_finished

    def counted(finished, model):
        reads.append(int(finished.sum()))
        return original(finished, model)

    monkeypatch.setattr(decode_module, "all_finished", counted)
    config = RolloutConfig(group_size=2, max_new_tokens=12, temperature=1.0, check_every=every)
    never = [tiny_model.config.video_token_id]
    rollout = generate(tiny_model, left_batch, config, eos_token_ids=never, pad_token_id=0, generator=torch.Generator())
    assert len(reads) == checks and reads == [0] * checks
    assert rollout.decode_steps == 12 and bool(rollout.is_truncated.all())


@pytest.mark.gpu
def test_cuda_graphs_replay_the_reference(tiny_model_dir, batch_maker, stops):
    """On a GPU: the compiled step captured per bucket and replayed gives the reference loop's tokens, and a
    second rollout of the same bucket reuses the captured graph."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        tiny_model_dir, local_files_only=True, dtype=torch.float32, attn_implementation="sdpa"
    ).to("cuda")
    with torch.no_grad():
        model.get_output_embeddings().weight.normal_(0.0, 0.5, generator=torch.Generator("cuda").manual_seed(0))
    questions = ("Localize the action. Answer in seconds.", "Which phase comes next?")
    batch = batch_maker("left", questions).to("cuda")
    settings = {"group_size": 4, "max_new_tokens": 12, "temperature": 1.0, "top_p": 0.9}
    decoder = static_decoder(model, compile=True)
    for seed in (1, 2):
        rollouts = [
            generate(
                model,
                batch,
                RolloutConfig(**settings, decode=decode, compile=compile),
                **stops,
                generator=torch.Generator("cuda").manual_seed(seed),
            )
            for decode, compile in (("dynamic", False), ("static", True))
        ]
        assert torch.equal(rollouts[1].completion_ids, rollouts[0].completion_ids)
    assert len(decoder.shapes) == 1 and next(iter(decoder.shapes.values())).graph is not None
