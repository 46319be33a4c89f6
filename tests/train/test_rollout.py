"""The rollout, on both decoders (the reference loop on a DynamicCache and the static cache, eager here; the
compiled step is tests/train/test_decode.py's): equal to HF generate when greedy, grouped, masked, reproducible."""

from __future__ import annotations

import pytest
import torch

from medgrpo.train import qwen
from medgrpo.train.rollout import (
    RolloutConfig,
    completion_masks,
    decode_text,
    filter_logits,
    generate,
    sample_tokens,
    vision_placeholder_ids,
)
from medgrpo.train.token_sampling import draw_uniforms


@pytest.fixture(params=["dynamic", "static"])
def decode(request) -> str:
    """Each rollout test runs on both decoders."""
    return request.param


@pytest.fixture(scope="module")
def special(tokenizer) -> dict[str, int]:
    return {t: tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")}


def stop_kwargs(special) -> dict:
    return {
        "eos_token_ids": [special["<|im_end|>"], special["<|endoftext|>"]],
        "pad_token_id": special["<|endoftext|>"],
    }


def hf_greedy(model, batch, eos_token_ids, pad_token_id, max_new_tokens: int) -> torch.Tensor:
    """``model.generate(do_sample=False)``'s new tokens, the vision placeholders suppressed as in rollouts."""
    inputs = batch.model_inputs()
    with torch.no_grad():
        out = model.generate(
            **inputs,
            do_sample=False,
            max_new_tokens=max_new_tokens,
            eos_token_id=eos_token_ids,
            pad_token_id=pad_token_id,
            suppress_tokens=vision_placeholder_ids(model, batch.input_ids.device).tolist(),
        )
    return out[:, batch.input_ids.shape[1] :]


def test_greedy_equals_hf_generate(tiny_model, left_batch, special, decode):
    config = RolloutConfig(group_size=1, max_new_tokens=12, temperature=0.0, decode=decode)
    rollout = generate(tiny_model, left_batch, config, **stop_kwargs(special))
    expected = hf_greedy(tiny_model, left_batch, **stop_kwargs(special), max_new_tokens=12)
    assert torch.equal(rollout.completion_ids, expected)
    # The two prompts (different videos) do not produce the same completion.
    assert not torch.equal(rollout.completion_ids[0], rollout.completion_ids[1])


def test_greedy_equals_hf_generate_with_eos(tiny_model, left_batch, special, decode):
    """Stopping at EOS: make the model's 3rd greedy token of prompt 0 the EOS by choosing the EOS set."""
    free = generate(
        tiny_model,
        left_batch,
        RolloutConfig(group_size=1, max_new_tokens=8, temperature=0.0, decode=decode),
        **stop_kwargs(special),
    )
    stop = int(free.completion_ids[0, 2])
    kwargs = {"eos_token_ids": [stop], "pad_token_id": special["<|endoftext|>"]}
    config = RolloutConfig(group_size=1, max_new_tokens=8, temperature=0.0, decode=decode)
    rollout = generate(tiny_model, left_batch, config, **kwargs)
    expected = hf_greedy(tiny_model, left_batch, **kwargs, max_new_tokens=8)
    assert torch.equal(rollout.completion_ids, expected)
    first_stop = int((free.completion_ids[0] == stop).nonzero()[0])
    assert int(rollout.completion_lengths[0]) == first_stop + 1
    assert not bool(rollout.is_truncated[0])


def test_groups_share_the_prompt_and_are_contiguous(tiny_model, left_batch, special, decode):
    group = 3
    config = RolloutConfig(group_size=group, max_new_tokens=6, temperature=1.0, decode=decode)
    rollout = generate(
        tiny_model, left_batch, config, **stop_kwargs(special), generator=torch.Generator().manual_seed(0)
    )
    assert len(rollout) == 2 * group
    assert rollout.prompt_index.tolist() == [0, 0, 0, 1, 1, 1]
    for row in range(2 * group):
        prompt = row // group
        assert torch.equal(rollout.prompt_ids[row], left_batch.input_ids[prompt])
        assert torch.equal(rollout.prompt_mask[row], left_batch.attention_mask[prompt])
    # Sampling at temperature 1 from a peaked-but-not-degenerate head gives distinct completions in a group.
    assert len({tuple(r) for r in rollout.completion_ids[:group].tolist()}) > 1
    assert [e.shape[0] for e in rollout.video_embeds] == [16, 6]


def test_sampled_completions_follow_their_prompt(tiny_model, left_batch, special, decode):
    """Replaying the sampler on a fresh full forward of each row's own prompt + completion redraws the
    same tokens: every row was sampled from its own prompt's distribution (the prefix sharing is right)."""
    group = 2
    config = RolloutConfig(group_size=group, max_new_tokens=5, temperature=0.8, top_k=100, top_p=0.9, decode=decode)
    rollout = generate(
        tiny_model, left_batch, config, **stop_kwargs(special), generator=torch.Generator().manual_seed(3)
    )
    ids = torch.cat([rollout.prompt_ids, rollout.completion_ids], dim=1)
    mask = torch.cat([rollout.prompt_mask, torch.ones_like(rollout.completion_ids)], dim=1)
    grids = left_batch.video_grid_thw.repeat_interleave(group, dim=0)
    seconds = left_batch.second_per_grid_ts.repeat_interleave(group)
    embeds = qwen.build_inputs_embeds(tiny_model, ids, qwen.repeat_videos(rollout.video_embeds, group))
    positions, _ = qwen.rope_positions(tiny_model, ids, grids, seconds, mask)
    with torch.no_grad():
        hidden = qwen.hidden_states(tiny_model, embeds, positions, mask)
    prompt_len = rollout.prompt_ids.shape[1]
    logits = qwen.logits(tiny_model, hidden[:, prompt_len - 1 : -1])
    steps = logits.shape[1]
    uniforms = draw_uniforms(
        config, config.max_new_tokens, len(rollout), logits.device, torch.Generator().manual_seed(3)
    )
    banned = vision_placeholder_ids(tiny_model, logits.device)
    draw = lambda rows, t: sample_tokens(rows[:, t], config, uniforms[t], banned_token_ids=banned)
    redrawn = torch.stack([draw(logits, t) for t in range(steps)], dim=1)
    valid = rollout.completion_mask.bool()
    assert torch.equal(redrawn[valid], rollout.completion_ids[valid])
    # The other prompt's distribution does not redraw them.
    other = torch.stack([draw(logits.flip(0), t) for t in range(steps)], dim=1)
    assert not torch.equal(other[valid], rollout.completion_ids[valid])


def test_eos_masks_and_padding(special):
    eos, pad = special["<|im_end|>"], special["<|endoftext|>"]
    eos_ids = torch.tensor([eos, pad])
    ids = torch.tensor(
        [
            [5, 6, eos, pad, pad],  # stops at <|im_end|>
            [5, pad, pad, pad, pad],  # stops at <|endoftext|> (also the pad token)
            [5, 6, 7, 8, 9],  # truncated
            [eos, pad, pad, pad, pad],  # empty answer
        ]
    )
    mask, lengths, truncated = completion_masks(ids, eos_ids)
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert lengths.tolist() == [3, 2, 5, 1]
    assert truncated.tolist() == [False, False, True, False]


def test_rollout_stops_and_pads_after_eos(tiny_model, left_batch, tokenizer, special, decode):
    """With every token an EOS, each completion is one token long and the loop runs one step."""
    everything = list(range(len(tokenizer)))
    config = RolloutConfig(group_size=2, max_new_tokens=6, decode=decode)
    rollout = generate(
        tiny_model,
        left_batch,
        config,
        eos_token_ids=everything,
        pad_token_id=special["<|endoftext|>"],
        generator=torch.Generator().manual_seed(0),
    )
    assert rollout.completion_ids.shape == (4, 1) and rollout.decode_steps == 1
    assert rollout.completion_lengths.tolist() == [1, 1, 1, 1]
    assert not rollout.is_truncated.any()
    # A partly-finished batch: rows after their EOS hold the pad token and mask 0.
    free = generate(
        tiny_model,
        left_batch,
        RolloutConfig(group_size=1, max_new_tokens=6, temperature=0.0, decode=decode),
        **stop_kwargs(special),
    )
    stop = int(free.completion_ids[0, 1])
    rows = generate(
        tiny_model,
        left_batch,
        RolloutConfig(group_size=1, max_new_tokens=6, temperature=0.0, decode=decode),
        eos_token_ids=[stop],
        pad_token_id=special["<|endoftext|>"],
    )
    first = int((free.completion_ids[0] == stop).nonzero()[0])
    assert rows.completion_ids[0, first + 1 :].eq(special["<|endoftext|>"]).all()
    assert rows.completion_mask[0].tolist() == [1] * (first + 1) + [0] * (rows.completion_ids.shape[1] - first - 1)


def test_max_new_tokens_truncates(tiny_model, left_batch, special, decode):
    rollout = generate(
        tiny_model,
        left_batch,
        RolloutConfig(group_size=2, max_new_tokens=3, decode=decode),
        eos_token_ids=[10**6],
        pad_token_id=special["<|endoftext|>"],
        generator=torch.Generator().manual_seed(1),
    )
    assert rollout.completion_ids.shape == (4, 3)
    assert rollout.is_truncated.all() and rollout.completion_mask.all()
    assert rollout.completion_tokens == 12


def test_fixed_seed_reproduces(tiny_model, left_batch, special, decode):
    config = RolloutConfig(group_size=3, max_new_tokens=6, temperature=1.0, top_k=50, top_p=0.95, decode=decode)
    runs = [
        generate(tiny_model, left_batch, config, **stop_kwargs(special), generator=torch.Generator().manual_seed(seed))
        for seed in (7, 7, 8)
    ]
    assert torch.equal(runs[0].completion_ids, runs[1].completion_ids)
    assert torch.equal(runs[0].completion_mask, runs[1].completion_mask)
    assert not torch.equal(runs[0].completion_ids, runs[2].completion_ids)


def test_tiny_top_p_is_greedy(tiny_model, left_batch, special, decode):
    greedy = generate(
        tiny_model,
        left_batch,
        RolloutConfig(group_size=2, max_new_tokens=6, temperature=0.0, decode=decode),
        **stop_kwargs(special),
    )
    nucleus = generate(
        tiny_model,
        left_batch,
        RolloutConfig(group_size=2, max_new_tokens=6, top_p=1e-6, decode=decode),
        **stop_kwargs(special),
        generator=torch.Generator().manual_seed(0),
    )
    assert torch.equal(greedy.completion_ids, nucleus.completion_ids)
    top1 = generate(
        tiny_model,
        left_batch,
        RolloutConfig(group_size=2, max_new_tokens=6, top_k=1, decode=decode),
        **stop_kwargs(special),
        generator=torch.Generator().manual_seed(0),
    )
    assert torch.equal(greedy.completion_ids, top1.completion_ids)


def test_timings_and_text(tiny_model, left_batch, tokenizer, special, decode):
    rollout = generate(
        tiny_model,
        left_batch,
        RolloutConfig(group_size=2, max_new_tokens=4, decode=decode),
        **stop_kwargs(special),
        generator=torch.Generator().manual_seed(0),
    )
    timings = rollout.timings()
    for key in ("rollout/encode_s", "rollout/prefill_s", "rollout/decode_s"):
        assert timings[key] > 0
    assert rollout.prompt_tokens == int(left_batch.attention_mask.sum())
    assert rollout.completion_tokens == int(rollout.completion_mask.sum())
    texts = decode_text(tokenizer, rollout)
    assert len(texts) == 4
    for text, ids, length in zip(texts, rollout.completion_ids, rollout.completion_lengths):
        assert text == tokenizer.decode(ids[:length], skip_special_tokens=True)


def test_training_mode_is_restored(tiny_model, left_batch, special, decode):
    tiny_model.train()
    try:
        generate(
            tiny_model,
            left_batch,
            RolloutConfig(group_size=1, max_new_tokens=2, temperature=0.0, decode=decode),
            **stop_kwargs(special),
        )
        assert tiny_model.training
    finally:
        tiny_model.eval()


def test_filter_logits():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, top_k=2)[0, 2:]).all()
    assert torch.isfinite(filter_logits(logits, top_k=2)[0, :2]).all()
    # top_p 0.8 keeps 0.5 + 0.3 (reaches 0.8); 0.81 needs the third token as well.
    assert torch.isfinite(filter_logits(logits, top_p=0.8)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.81)).tolist() == [[True, True, True, False]]
    assert torch.isfinite(filter_logits(logits, top_p=1e-9)).tolist() == [[True, False, False, False]]
    # Sampling only ever picks kept tokens.
    config = RolloutConfig(top_k=2)
    draws = sample_tokens(logits.expand(2000, -1), config, torch.rand(2000, generator=torch.Generator().manual_seed(0)))
    assert set(draws.tolist()) == {0, 1}
    share = (draws == 0).float().mean().item()
    assert abs(share - 0.5 / 0.8) < 0.05


def test_bad_inputs(tiny_model, batch_maker, special, decode):
    with pytest.raises(ValueError, match="group_size"):
        RolloutConfig(group_size=0)
    with pytest.raises(ValueError, match="top_p"):
        RolloutConfig(top_p=0.0)
    right = batch_maker("right").to("cpu")
    with pytest.raises(ValueError, match="left-padded"):
        generate(
            tiny_model, right, RolloutConfig(group_size=1, max_new_tokens=2, decode=decode), **stop_kwargs(special)
        )
    host = batch_maker("left")
    with pytest.raises(ValueError, match="to\\(device\\)"):
        generate(tiny_model, host, RolloutConfig(group_size=1, max_new_tokens=2, decode=decode), **stop_kwargs(special))


def test_vision_placeholders_are_never_sampled(tiny_model, left_batch, special, decode):
    banned = vision_placeholder_ids(tiny_model, torch.device("cpu"))
    logits = torch.zeros(4, 512)
    logits[:, banned] = 50.0  # the placeholders would win every draw
    uniforms = torch.rand(4, generator=torch.Generator().manual_seed(0))
    for config in (RolloutConfig(temperature=0.0), RolloutConfig(), RolloutConfig(top_p=1e-6)):
        draws = sample_tokens(logits, config, uniforms, banned_token_ids=banned)
        assert not torch.isin(draws, banned).any()
    config = RolloutConfig(group_size=4, max_new_tokens=16, temperature=3.0, decode=decode)
    rollout = generate(
        tiny_model, left_batch, config, **stop_kwargs(special), generator=torch.Generator().manual_seed(0)
    )
    assert not torch.isin(rollout.completion_ids, banned).any()


@pytest.mark.parametrize(
    "settings",
    [
        {"group_size": 3, "max_new_tokens": 10, "temperature": 1.0},
        {"group_size": 2, "max_new_tokens": 12, "temperature": 0.7, "top_k": 50, "top_p": 0.9, "check_every": 5},
        {"group_size": 4, "max_new_tokens": 9, "temperature": 2.0, "top_p": 0.8, "check_every": 1},
    ],
)
def test_static_equals_dynamic_for_the_same_seed(tiny_model, left_batch, special, settings):
    """The same generator gives the same tokens on both decoders, rows stopping at EOS at different steps
    included (the EOS set holds a frequent token), and leaves the generator in the same state."""
    free = generate(
        tiny_model,
        left_batch,
        RolloutConfig(**settings, decode="dynamic"),
        **stop_kwargs(special),
        generator=torch.Generator().manual_seed(11),
    )
    frequent = int(free.completion_ids[:, :4].flatten().mode().values)
    kwargs = {"eos_token_ids": [frequent, special["<|im_end|>"]], "pad_token_id": special["<|endoftext|>"]}
    runs, next_draws = {}, {}
    for decode in ("dynamic", "static"):
        generator = torch.Generator().manual_seed(11)
        runs[decode] = generate(
            tiny_model, left_batch, RolloutConfig(**settings, decode=decode), **kwargs, generator=generator
        )
        next_draws[decode] = torch.rand(1, generator=generator)
    dynamic, static = runs["dynamic"], runs["static"]
    assert torch.equal(static.completion_ids, dynamic.completion_ids)
    assert torch.equal(static.completion_mask, dynamic.completion_mask)
    assert static.decode_steps == dynamic.decode_steps
    assert torch.equal(next_draws["static"], next_draws["dynamic"])
    lengths = dynamic.completion_lengths
    assert lengths.min() < lengths.max()  # rows ended at different steps


def chi2_quantile(dof: int, z: float = 3.719) -> float:
    """The chi-square distribution's upper quantile at a normal z-score (3.719: 1e-4), Wilson-Hilferty."""
    return dof * (1 - 2 / (9 * dof) + z * (2 / (9 * dof)) ** 0.5) ** 3


@pytest.mark.parametrize(
    "config",
    [
        RolloutConfig(temperature=1.0),
        RolloutConfig(temperature=0.5, top_k=12),
        RolloutConfig(temperature=1.5, top_p=0.7),
        RolloutConfig(temperature=0.8, top_k=20, top_p=0.9),
    ],
    ids=["plain", "top_k", "top_p", "top_k_top_p"],
)
def test_sampler_draws_the_filtered_softmax(config):
    """200,000 draws of one row: the token frequencies fit the exact filtered softmax (chi-square at p = 1e-4),
    and filtered-out or banned tokens are never drawn."""
    draws, vocab = 200_000, 40
    logits = torch.randn(vocab, generator=torch.Generator().manual_seed(0), dtype=torch.float64).float() * 2
    banned = torch.tensor([3, 17])
    expected = (
        filter_logits(
            logits.index_fill(0, banned, float("-inf"))[None] / config.temperature,
            **{
                "top_k": config.top_k,
                "top_p": config.top_p,
            },
        )[0]
        .double()
        .softmax(-1)
    )
    uniforms = torch.rand(draws, generator=torch.Generator().manual_seed(1))
    tokens = sample_tokens(logits.expand(draws, -1), config, uniforms, banned_token_ids=banned)
    counts = torch.bincount(tokens, minlength=vocab).double()
    kept = expected > 0
    assert counts[~kept].sum() == 0
    chi2 = ((counts[kept] - draws * expected[kept]) ** 2 / (draws * expected[kept])).sum()
    assert chi2 < chi2_quantile(int(kept.sum()) - 1)


def test_config_validates_the_decoder():
    with pytest.raises(ValueError, match="decode"):
        RolloutConfig(decode="graph")
    with pytest.raises(ValueError, match="check_every"):
        RolloutConfig(check_every=0)
