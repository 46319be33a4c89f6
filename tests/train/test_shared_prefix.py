"""The shared-prefix forward equals the dense prompt + completion rows: log-probs, loss and every gradient.

Rollouts are built directly (random completions of chosen lengths) over the session's two prompts of
different lengths, so every case is covered on purpose: completions of length 1 (EOS first),
truncated rows (no EOS within T), G = 1 and G = 8, one group per micro-batch and several groups
packed in one row, a frozen vision tower (the rollout's embeddings reused) and a trainable one (the
root forward re-encodes the videos, so gradients reach the vision tower).

Float64: Hugging Face's Qwen2.5-VL RMSNorm computes in float32 whatever the input dtype, so a float64
model rounds to float32 at every norm, and two exact rewritings of the same sums (G prompt copies
summed by the weight gradients, or one prompt whose gradient is summed first) differ at float32
rounding. The float64 model here swaps each RMSNorm for one that computes in the input dtype (same
weight Parameter): then the paths agree to 1e-9. The vision tower's rotary embedding also runs in
float32, which still leaves its gradients ~1e-10 apart. Float32 runs the model unchanged, under the
project's tolerance rule against the float64 dense result.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medgrpo.data.collate import VideoBatch, VideoCollator
from medgrpo.data.loader import VideoSample
from medgrpo.data.records import VideoRecord
from medgrpo.data.sampling import FramePlan
from medgrpo.ops.policy_loss import MEDGRPO_LOSS, PolicyLossConfig
from medgrpo.rewards.rewarder import Rewarder
from medgrpo.rewards.task_rewards import RewardBatch
from medgrpo.testing.tolerance import assert_within_reference_error
from medgrpo.train.grpo import GRPOConfig, GRPOSetup, grpo_step
from medgrpo.train.model import vision_tower
from medgrpo.train.optim import OptimConfig, build_optimizer
from medgrpo.train.rollout import Rollout, RolloutConfig
from medgrpo.train.sampler import BalancedSampler
from medgrpo.train.shared_prefix import GroupSpan, SharedPrefixLayout, shared_prefix_inputs
from medgrpo.train.state import TrainState
from medgrpo.train.update import LossOptions, backward_policy_loss, policy_inputs, sequence_logprobs

STEPS = 6
# (length, truncated) of every completion, group-major, per group size G (2 prompts). A truncated row has no EOS
# within STEPS (its mask is all ones); (1, False) is an EOS as the first token.
ROWS = {
    1: [(1, False), (STEPS, True)],
    8: [(1, False), (STEPS, True), (3, False), (STEPS, False), (2, False), (5, False), (STEPS, True), (4, False)]
    + [(STEPS, True), (1, False), (1, False), (2, False), (STEPS, False), (3, False), (5, False), (4, False)],
}
LOSSES = {"dapo": MEDGRPO_LOSS, "grpo_kl": PolicyLossConfig(loss_type="grpo", epsilon_high=0.3, beta=0.04)}


class FaithfulRMSNorm(nn.Module):
    """Qwen2.5-VL's RMSNorm computed in the input's dtype (HF's rounds to float32 first)."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.weight, self.eps = norm.weight, norm.variance_epsilon

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.weight * (hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + self.eps))


def float64_model(model: nn.Module) -> nn.Module:
    """A float64 copy of ``model`` whose RMSNorms compute in float64."""
    exact = copy.deepcopy(model).double()
    for name, module in list(exact.named_modules()):
        if type(module).__name__.endswith("RMSNorm"):
            parent, _, attribute = name.rpartition(".")
            setattr(exact.get_submodule(parent), attribute, FaithfulRMSNorm(module))
    return exact


@pytest.fixture(scope="module")
def models(tiny_model):
    """``{dtype: model}``: the session's tiny model in float32 (unchanged) and float64 (faithful norms)."""
    return {torch.float32: copy.deepcopy(tiny_model), torch.float64: float64_model(tiny_model)}


@pytest.fixture(scope="module")
def batches(batch_maker):
    """The two left-padded prompts (16 and 6 video tokens), patchified in each dtype."""
    batch = batch_maker("left")
    return {dtype: batch.to("cpu", dtype) for dtype in (torch.float32, torch.float64)}


def make_rollout(model, batch, rollout_maker, group: int) -> Rollout:
    """The batch's prompts with G completions each, of the lengths and truncations in ROWS."""
    rollout = rollout_maker(model, batch, rows=ROWS[group], steps=STEPS, seed=group)
    assert list(zip(rollout.completion_lengths.tolist(), rollout.is_truncated.tolist())) == ROWS[group]
    return rollout


def run_passes(model, inputs, loss: PolicyLossConfig, micro_batch_size: int, anchor: torch.Tensor) -> dict:
    """Log-probs, then one update whose old/ref log-probs are ``anchor`` perturbed (clipping and KL active).

    ``anchor`` is the same for the runs being compared, so their losses differ only by their own log-probs.
    """
    logp = sequence_logprobs(model, inputs, temperature=1.0, micro_batch_size=micro_batch_size)
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn((2, *anchor.shape), generator=generator, dtype=torch.float64)
    advantages = torch.randn(anchor.shape[0], generator=generator, dtype=torch.float64).to(logp.dtype)
    old, ref = ((anchor.double().cpu() + scale * n).to(logp) for scale, n in zip((0.2, 0.1), noise))
    model.zero_grad(set_to_none=True)
    options = LossOptions(loss=loss, micro_batch_size=micro_batch_size)
    metrics = backward_policy_loss(
        model, inputs, advantages.to(logp.device), options, old_logp=old, ref_logp=ref if loss.beta > 0 else None
    )
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return {"logp": logp, "loss": metrics.loss, "clip": metrics.clip_fraction, "grads": grads}


def both_layouts(model, batch, rollout, *, trainable_vision: bool, loss, micro_batch_size: int, anchor=None):
    """``(dense, shared)`` results of :func:`run_passes` on the same rollout (anchor: the dense log-probs)."""
    vision_tower(model).requires_grad_(trainable_vision)
    args = (model, rollout, batch.video_grid_thw, batch.second_per_grid_ts, batch.pixel_values_videos)
    dense_inputs = policy_inputs(*args, root_forward=trainable_vision)
    if anchor is None:
        anchor = sequence_logprobs(model, dense_inputs, temperature=1.0, micro_batch_size=micro_batch_size)
    anchor = anchor.masked_fill(~rollout.completion_mask.bool().to(anchor.device), 0.0)
    dense = run_passes(model, dense_inputs, loss, micro_batch_size, anchor)
    shared_inputs = shared_prefix_inputs(*args, root_forward=trainable_vision)
    return dense, run_passes(model, shared_inputs, loss, micro_batch_size, anchor)


CASES = [
    pytest.param(group, per_row, vision, loss, id=f"G{group}-{per_row}groups-{'vision' if vision else 'frozen'}-{loss}")
    for group in (1, 8)
    for per_row in (1, 2)
    for vision in (False, True)
    for loss in LOSSES
]


def assert_relative(actual: torch.Tensor, expected: torch.Tensor, rtol: float, name: str) -> None:
    scale = float(expected.abs().max().clamp_min(1e-30))
    error = float((actual - expected).abs().max())
    assert error <= rtol * scale, f"{name}: error {error:.3e} > {rtol:g} x {scale:.3e}"


@pytest.mark.parametrize(("group", "per_row", "trainable_vision", "loss"), CASES)
def test_float64_equals_dense(models, batches, rollout_maker, group, per_row, trainable_vision, loss):
    model, batch = models[torch.float64], batches[torch.float64]
    rollout = make_rollout(model, batch, rollout_maker, group)
    dense, shared = both_layouts(
        model, batch, rollout, trainable_vision=trainable_vision, loss=LOSSES[loss], micro_batch_size=per_row * group
    )
    mask = rollout.completion_mask.bool()
    assert_relative(shared["logp"][mask], dense["logp"][mask], 1e-9, "log-probs")
    assert_relative(shared["loss"], dense["loss"], 1e-9, "loss")
    assert float(dense["clip"]) > 0  # the perturbed old log-probs clip some tokens: the clipped branch is tested too
    assert shared["grads"].keys() == dense["grads"].keys()
    has_vision_grads = any(name.startswith("model.visual.") for name in dense["grads"])
    assert has_vision_grads == trainable_vision
    for name, grad in dense["grads"].items():
        assert_relative(shared["grads"][name], grad, 1e-9, name)


@pytest.mark.parametrize(("group", "trainable_vision"), [(1, False), (8, False), (8, True)])
def test_float32_within_tolerance(models, batches, rollout_maker, group, trainable_vision):
    """Float32 shared-prefix error against the float64 dense result: at most the float32 dense path's (x2, x3)."""
    options = {"trainable_vision": trainable_vision, "loss": MEDGRPO_LOSS, "micro_batch_size": 2 * group}
    model64, batch64 = models[torch.float64], batches[torch.float64]
    exact, _ = both_layouts(model64, batch64, make_rollout(model64, batch64, rollout_maker, group), **options)
    model32, batch32 = models[torch.float32], batches[torch.float32]
    rollout = make_rollout(model32, batch32, rollout_maker, group)
    dense, shared = both_layouts(model32, batch32, rollout, anchor=exact["logp"], **options)
    mask = rollout.completion_mask.bool()
    assert_within_reference_error(shared["logp"][mask], dense["logp"][mask], exact["logp"][mask], name="log-probs")
    assert_within_reference_error(shared["loss"], dense["loss"], exact["loss"], name="loss")
    assert shared["grads"].keys() == exact["grads"].keys()
    for name, grad in exact["grads"].items():
        assert_within_reference_error(shared["grads"][name], dense["grads"][name], grad, factor=3.0, name=name)


def test_positions_and_tokens_are_the_dense_ones(models, batches, rollout_maker):
    """Every packed token and its 3D position is a valid token of the dense rows, in packing order."""
    model, batch = models[torch.float32], batches[torch.float32]
    rollout = make_rollout(model, batch, rollout_maker, 8)
    args = (model, rollout, batch.video_grid_thw, batch.second_per_grid_ts)
    dense, shared = policy_inputs(*args), shared_prefix_inputs(*args)
    expected_ids, expected_positions = [], []
    for b, span in enumerate(shared.spans):
        rows = range(b * 8, (b + 1) * 8)
        prompt = dense.attention_mask[rows[0], : dense.prompt_length].bool()
        expected_ids.append(dense.input_ids[rows[0], : dense.prompt_length][prompt])
        expected_positions.append(dense.position_ids[:, rows[0], : dense.prompt_length][:, prompt])
        for row, length in zip(rows, span.completions):
            completion = slice(dense.prompt_length, dense.prompt_length + length)
            expected_ids.append(dense.input_ids[row, completion])
            expected_positions.append(dense.position_ids[:, row, completion])
    assert torch.equal(shared.input_ids, torch.cat(expected_ids))
    assert torch.equal(shared.position_ids, torch.cat(expected_positions, dim=1))
    assert shared.packed_tokens() == int(batch.attention_mask.sum()) + sum(length for length, _ in ROWS[8])


def test_micro_batches_are_whole_groups(models, batches, rollout_maker):
    assert GRPOConfig().shared_prefix  # on by default; grpo.shared_prefix: false is the dense reference
    model, batch = models[torch.float32], batches[torch.float32]
    shared = shared_prefix_inputs(
        model, make_rollout(model, batch, rollout_maker, 8), batch.video_grid_thw, batch.second_per_grid_ts
    )
    assert shared.micro_batch_rows(8) == [slice(0, 8), slice(8, 16)]
    assert shared.micro_batch_rows(3) == [slice(0, 8), slice(8, 16)]  # at least one group
    assert shared.micro_batch_rows(15) == [slice(0, 8), slice(8, 16)]  # rounded down to whole groups
    assert shared.micro_batch_rows(16) == [slice(0, 16)]
    with pytest.raises(ValueError, match="whole groups"):
        shared.completion_hidden(model, slice(0, 4))


# ---------------------------------------------------------------------------------- attention alone
SPANS = [GroupSpan(0, 5, (1, 3, 2)), GroupSpan(11, 7, (4,)), GroupSpan(22, 3, (1, 1))]


def dense_mask(spans: list[GroupSpan]) -> torch.Tensor:
    """The rule written out token by token: same group, then prompt keys, or own-completion keys, causally."""
    owner = []  # per packed token: (group, completion index or -1)
    for g, span in enumerate(spans):
        owner += [(g, -1)] * span.prompt
        for c, length in enumerate(span.completions):
            owner += [(g, c)] * length
    length = len(owner)
    mask = torch.zeros(length, length, dtype=torch.bool)
    for q, (gq, cq) in enumerate(owner):
        for k, (gk, ck) in enumerate(owner[: q + 1]):
            mask[q, k] = gq == gk and (ck == -1 or ck == cq)
    return mask


def reference_attention(query, key, value, scaling):
    mask = dense_mask(SPANS)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling, enable_gqa=True)
    return out.transpose(1, 2)


def random_qkv(dtype: torch.dtype, requires_grad: bool):
    generator = torch.Generator().manual_seed(0)
    length = SPANS[-1].end
    shapes = ((1, 4, length, 8), (1, 2, length, 8), (1, 2, length, 8))
    return [torch.randn(s, generator=generator, dtype=dtype).requires_grad_(requires_grad) for s in shapes]


def test_sdpa_layout_equals_the_masked_reference_with_gradients():
    query, key, value = random_qkv(torch.float64, True)
    layout = SharedPrefixLayout(SPANS, backend="sdpa")
    got = layout.attend(nn.Identity(), query, key, value, scaling=0.3)
    expected = reference_attention(query, key, value, 0.3)
    upstream = torch.randn_like(expected)
    grads = torch.autograd.grad(got, (query, key, value), upstream)
    expected_grads = torch.autograd.grad(expected, (query, key, value), upstream)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)


def test_flex_block_mask_equals_the_rule():
    """The flex backend's mask and forward (eager on CPU: forward only) against the rule."""
    query, key, value = random_qkv(torch.float64, False)
    layout = SharedPrefixLayout(SPANS, backend="flex")
    mask = layout.block_mask(torch.device("cpu"))
    assert torch.equal(mask.to_dense().bool().any(), torch.tensor(True))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "flex_attention called without torch.compile()"
        got = layout.attend(nn.Identity(), query, key, value, scaling=0.3)
    torch.testing.assert_close(got, reference_attention(query, key, value, 0.3), rtol=1e-12, atol=1e-12)


def test_layout_rejects_rows_of_another_length():
    query, key, value = random_qkv(torch.float32, False)
    with pytest.raises(ValueError, match="shared-prefix row"):
        SharedPrefixLayout(SPANS[:2]).attend(nn.Identity(), query, key, value, scaling=1.0)


# ---------------------------------------------------------------------------------- CUDA: flex attention
@pytest.mark.gpu
@pytest.mark.parametrize("trainable_vision", [False, True])
def test_cuda_flex_equals_dense(models, batches, rollout_maker, trainable_vision):
    """The compiled flex-attention path on CUDA against the dense path, under the tolerance rule (float64 CPU exact)."""
    options = {"trainable_vision": trainable_vision, "loss": MEDGRPO_LOSS, "micro_batch_size": 16}
    model64, batch64 = models[torch.float64], batches[torch.float64]
    exact, _ = both_layouts(model64, batch64, make_rollout(model64, batch64, rollout_maker, 8), **options)
    model = copy.deepcopy(models[torch.float32]).cuda()
    batch = batches[torch.float32].to("cuda", torch.float32)
    rollout = make_rollout(model, batch, rollout_maker, 8)
    rollout = Rollout(**{k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in vars(rollout).items()})
    dense, shared = both_layouts(model, batch, rollout, anchor=exact["logp"].cuda(), **options)
    mask = rollout.completion_mask.bool().cpu()
    cpu = lambda t: t.detach().cpu()
    assert_within_reference_error(
        cpu(shared["logp"])[mask], cpu(dense["logp"])[mask], exact["logp"][mask], atol=1e-5, name="log-probs"
    )
    assert_within_reference_error(cpu(shared["loss"]), cpu(dense["loss"]), exact["loss"], atol=1e-5, name="loss")
    for name, grad in exact["grads"].items():
        assert_within_reference_error(
            cpu(shared["grads"][name]), cpu(dense["grads"][name]), grad, factor=3.0, atol=1e-5, name=name
        )


# ---------------------------------------------------------------------------------- whole GRPO steps
class LengthReward:
    """A reward that varies within a group (the rollout's text length, mod 5), so updates are not trivial."""

    def __call__(self, texts: list[str], records: list) -> RewardBatch:
        rewards = torch.tensor([len(text) % 5 / 4 for text in texts], dtype=torch.float32)
        return RewardBatch(rewards=rewards, format_ok=torch.ones(len(texts), dtype=torch.bool), counts={})


def grpo_batch(tokenizer, questions, clips) -> VideoBatch:
    """Two left-padded prompts of different lengths, with records (what the loader yields), in float64."""
    samples = []
    for i, (question, frames) in enumerate(zip(questions, clips)):
        record = VideoRecord(
            index=i,
            id=f"r{i}",
            question=question,
            answer="1.0-2.0 seconds.",
            qa_type="tal",
            qa_type_raw="tal",
            data_source="Synthetic",
            video=Path("unused.mp4"),
            fps=1.0,
        )
        plan = FramePlan(tuple(range(frames.shape[0])), frames.shape[1], frames.shape[2], 1.0)
        samples.append(VideoSample(record=record, frames=frames, plan=plan))
    return VideoCollator(tokenizer, padding_side="left")(samples).to("cpu", torch.float64)


def grpo_run(model, reference, tokenizer, batch, *, shared_prefix: bool, steps: int) -> list[dict]:
    """``steps`` MedGRPO steps (two updates per rollout: old log-probs; beta > 0: reference log-probs)."""
    model = copy.deepcopy(model).train()
    optimizer, scheduler = build_optimizer(model, OptimConfig(lr=1e-4), steps)
    sampler = BalancedSampler(["Synthetic/tal"], samples_per_epoch=1, seed=0)
    state = TrainState(model, optimizer, scheduler, sampler, torch.Generator().manual_seed(11))
    config = GRPOConfig(
        prompts_per_step=2,
        num_iterations=2,
        micro_batch_size=4,
        shared_prefix=shared_prefix,
        rollout=RolloutConfig(group_size=4, max_new_tokens=8),
        loss=PolicyLossConfig(epsilon_high=0.3, beta=0.04),
    )
    setup = GRPOSetup.build(config, tokenizer, max_grad_norm=1.0, reference=reference)
    return [grpo_step(state, batch, Rewarder(LengthReward()), setup).metrics for _ in range(steps)]


@pytest.mark.slow
def test_grpo_runs_with_and_without_shared_prefix_match(models, tokenizer, questions, clips):
    """Same seed, float64: the same metrics step after step, with the shared-prefix passes and the dense ones."""
    reference = copy.deepcopy(models[torch.float64]).requires_grad_(False).eval()
    policy = copy.deepcopy(models[torch.float64])
    vision_tower(policy).requires_grad_(False)
    batch = grpo_batch(tokenizer, questions, clips)
    shared = grpo_run(policy, reference, tokenizer, batch, shared_prefix=True, steps=3)
    dense = grpo_run(policy, reference, tokenizer, batch, shared_prefix=False, steps=3)
    names = ("loss", "kl", "clip_fraction", "entropy", "grad_norm", "reward_raw", "advantage_std")
    for step, (got, expected) in enumerate(zip(shared, dense)):
        assert got["completion_tokens"] == expected["completion_tokens"], step
        for name in names:
            assert_relative(torch.as_tensor(got[name]), torch.as_tensor(expected[name]), 1e-9, f"step {step} {name}")
    assert float(dense[-1]["grad_norm"]) > 0 and float(dense[-1]["kl"]) > 0  # the policy moved: not a trivial run
