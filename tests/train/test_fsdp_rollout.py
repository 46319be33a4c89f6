"""Rollouts of the tiny Qwen2.5-VL under FSDP2 (gloo, 2 CPU ranks), on both decoders: the tokens of one process,
and the ranks step together when one rank's rows all end long before the other's (the decoder layers all-gather
their weights in every step, so a rank that stopped early would leave the other waiting)."""

from __future__ import annotations

import pytest
import torch

from medgrpo.testing.distributed import GLOO, run_gloo
from medgrpo.train.rollout import RolloutConfig, generate

WORLD_SIZE = 2
SETTINGS = {"group_size": 2, "max_new_tokens": 6, "temperature": 0.0, "check_every": 2}


def rollouts(model, batch, eos_token_ids: list[int], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Completion ids of a greedy rollout on each decoder (the static one asked to compile: eager when sharded)."""
    from medgrpo.train.distributed import gathered

    out = {}
    for decode in ("static", "dynamic"):
        config = RolloutConfig(**SETTINGS, decode=decode, compile=decode == "static")
        with gathered(model):
            rollout = generate(model, batch, config, eos_token_ids=eos_token_ids, pad_token_id=pad_token_id)
        out[decode] = rollout.completion_ids
    return out


def worker(rank: int, model_dir: str, batch, eos_by_rank: list[list[int]], pad_token_id: int) -> dict:
    from medgrpo.train.distributed import warm_up
    from medgrpo.train.model import ModelConfig, load_model, shard_model

    model = shard_model(load_model(ModelConfig(model_dir, dtype="float32")), param_dtype=None, reduce_dtype=None)
    warm_up(model)
    return rollouts(model, batch, eos_by_rank[rank], pad_token_id)


@pytest.mark.slow
@pytest.mark.skipif(not GLOO, reason="needs torch.distributed gloo")
def test_fsdp2_rollouts_equal_one_process_when_ranks_end_at_different_steps(
    tiny_model, tokenizer, left_batch, tmp_path
):
    end_of_text = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    stops = [tokenizer.convert_tokens_to_ids("<|im_end|>"), end_of_text]
    first = rollouts(tiny_model, left_batch, stops, end_of_text)["dynamic"][:, 0].tolist()
    # Rank 0 stops at its prompts' first greedy tokens (its rows all end at the first step); rank 1 runs on.
    eos_by_rank = [sorted(set(first)), stops]
    expected = [rollouts(tiny_model, left_batch, eos, end_of_text) for eos in eos_by_rank]
    assert expected[0]["dynamic"].shape[1] == 1 and expected[1]["dynamic"].shape[1] > SETTINGS["check_every"]
    tiny_model.save_pretrained(tmp_path)  # its lm head is scaled (greedy argmaxes well apart)
    results = run_gloo(worker, str(tmp_path), left_batch, eos_by_rank, end_of_text, world_size=WORLD_SIZE)
    for rank in range(WORLD_SIZE):
        for decode in ("static", "dynamic"):
            assert torch.equal(results[rank][decode], expected[rank][decode]), (rank, decode)
