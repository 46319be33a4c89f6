"""The shared-prefix passes under FSDP2 (gloo, 2 CPU ranks) equal one process running the dense layout.

Each rank holds one prompt's group (the two prompts differ in length), runs the old-policy log-prob
pass and one update through the sharded model's root forward (packed ids, its video's patch rows,
precomputed positions, the layout as attention mask), with the DAPO loss over the global token count
and gradients summed over ranks. One process runs the dense rows of both groups on the unsharded
model. Log-probs and every parameter's gradient, the vision tower's included, must agree.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from medgrpo.testing.distributed import GLOO, run_gloo
from medgrpo.train.rollout import Rollout
from medgrpo.train.update import LossOptions, video_rows

GROUP = 4
STEPS = 5
ROWS = [(1, False), (STEPS, True), (3, False), (4, False), (2, False), (STEPS, False), (STEPS, True), (1, False)]


def group_rollout(rollout: Rollout, index: int) -> Rollout:
    """The rollout of prompt ``index`` alone (its G rows)."""
    rows = slice(index * GROUP, (index + 1) * GROUP)
    per_row = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "completion_lengths", "is_truncated")
    sliced = {name: getattr(rollout, name)[rows] for name in per_row}
    return dataclasses.replace(
        rollout, **sliced, prompt_index=torch.zeros(GROUP, dtype=torch.long), video_embeds=[rollout.video_embeds[index]]
    )


def update(model, inputs, advantages, noise) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Old-policy log-probs, then one DAPO update against them (perturbed); log-probs and full gradients."""
    from medgrpo.train.compat import full_tensor
    from medgrpo.train.update import backward_policy_loss, sequence_logprobs

    logp = sequence_logprobs(model, inputs, temperature=1.0, micro_batch_size=GROUP)
    backward_policy_loss(model, inputs, advantages, LossOptions(micro_batch_size=GROUP), old_logp=logp + noise)
    grads = {name: full_tensor(param.grad) for name, param in model.named_parameters() if param.grad is not None}
    return logp, grads


def worker(rank: int, model_dir: str, parts: dict) -> dict[str, float]:
    from medgrpo.train.distributed import warm_up
    from medgrpo.train.model import ModelConfig, load_model, shard_model
    from medgrpo.train.shared_prefix import shared_prefix_inputs

    model = shard_model(
        load_model(ModelConfig(model_dir, dtype="float32")),
        param_dtype=None,
        reduce_dtype=None,
        gradient_divide_factor=1.0,
    )
    warm_up(model)
    part = parts["ranks"][rank]
    inputs = shared_prefix_inputs(model, part["rollout"], part["grid"], part["seconds"], part["pixels"])
    assert inputs.pixels is not None  # sharded: the root forward re-encodes the video
    logp, grads = update(model, inputs, part["advantages"], part["noise"])
    expected = parts["expected"]
    mask = part["rollout"].completion_mask.bool()
    rows = slice(rank * GROUP, (rank + 1) * GROUP)
    scale = max(float(g.abs().max()) for g in expected["grads"].values())
    assert grads.keys() == expected["grads"].keys()
    return {
        "logp_error": float((logp - expected["logp"][rows])[mask].abs().max()),
        "grad_error": max(float((grads[n] - g).abs().max()) for n, g in expected["grads"].items()) / scale,
        "vision_grads": float(any(n.startswith("model.visual.") and g.abs().sum() > 0 for n, g in grads.items())),
    }


@pytest.mark.slow
@pytest.mark.skipif(not GLOO, reason="needs torch.distributed gloo")
def test_fsdp2_shared_prefix_step_equals_one_dense_process(tiny_model_dir, rollout_maker, left_batch):
    from medgrpo.train.model import ModelConfig, load_model
    from medgrpo.train.update import policy_inputs

    model = load_model(ModelConfig(str(tiny_model_dir), dtype="float32"))
    batch = left_batch
    rollout = rollout_maker(model, batch, rows=ROWS, steps=STEPS)
    generator = torch.Generator().manual_seed(0)
    advantages = torch.randn(len(rollout), generator=generator)
    noise = 0.2 * torch.randn(rollout.completion_ids.shape, generator=generator)
    args = (model, rollout, batch.video_grid_thw, batch.second_per_grid_ts, batch.pixel_values_videos)
    logp, grads = update(model, policy_inputs(*args, root_forward=True), advantages, noise)
    pixels = video_rows(batch.pixel_values_videos, batch.video_grid_thw)
    ranks = [
        {
            "rollout": group_rollout(rollout, b),
            "grid": batch.video_grid_thw[b : b + 1],
            "seconds": batch.second_per_grid_ts[b : b + 1],
            "pixels": pixels[b].clone(),
            "advantages": advantages[b * GROUP : (b + 1) * GROUP],
            "noise": noise[b * GROUP : (b + 1) * GROUP],
        }
        for b in range(2)
    ]
    expected = {"logp": logp, "grads": {n: g.clone() for n, g in grads.items()}}
    results = run_gloo(worker, str(tiny_model_dir), {"ranks": ranks, "expected": expected}, world_size=2)
    for out in results:
        assert out["logp_error"] < 1e-5 and out["grad_error"] < 1e-5, out
        assert out["vision_grads"] == 1.0, out
