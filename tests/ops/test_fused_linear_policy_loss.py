"""fused_linear_policy_loss: vs the full-logits reference, vs Liger-Kernel, the drop-in module, edge cases."""

from __future__ import annotations

import itertools
import sys

import pytest
import torch

import medgrpo
from medgrpo.nn import FusedLinearGRPOLoss
from medgrpo.ops import reference
from medgrpo.testing.memory import PeakMemory
from medgrpo.testing.tolerance import assert_within_reference_error

LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo"]


def make_batch(batch=3, length=9, hidden=16, vocab=41, *, seed=0, per_token_advantages=False):
    """fp64 hidden states, head and policy inputs; the last sequence fully masked."""
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(batch, length, hidden, generator=gen, dtype=torch.float64)
    w = torch.randn(vocab, hidden, generator=gen, dtype=torch.float64) / hidden**0.5
    b = torch.randn(vocab, generator=gen, dtype=torch.float64)
    targets = torch.randint(0, vocab, (batch, length), generator=gen)
    mask = torch.rand(batch, length, generator=gen) > 0.3
    mask[0, 0] = True
    if batch > 1:
        mask[-1] = False
    with torch.no_grad():
        current, _ = reference.linear_logprob(h, w, targets, bias=b, temperature=0.8)
    old = current + 0.5 * torch.randn(batch, length, generator=gen, dtype=torch.float64)
    ref = current + 0.2 * torch.randn(batch, length, generator=gen, dtype=torch.float64)
    adv_shape = (batch, length) if per_token_advantages else (batch,)
    advantages = torch.randn(adv_shape, generator=gen, dtype=torch.float64)
    return dict(
        hidden=h, weight=w, bias=b, targets=targets, mask=mask, advantages=advantages, old_logp=old, ref_logp=ref
    )


def run(fn, batch: dict, dtype: torch.dtype, device: str = "cpu", **options):
    """Loss, entropy, clip fraction and the gradients for hidden, weight and bias (on the CPU), run on ``device``."""
    leaves = [batch[k].detach().to(device, dtype).clone().requires_grad_(True) for k in ("hidden", "weight", "bias")]
    cast = lambda t: t.to(device, dtype) if t.is_floating_point() else t.to(device)  # noqa: E731
    out = fn(
        leaves[0],
        leaves[1],
        batch["targets"].to(device),
        batch["mask"].to(device),
        cast(batch["advantages"]),
        bias=leaves[2],
        old_logp=cast(batch["old_logp"]),
        ref_logp=cast(batch["ref_logp"]),
        temperature=0.8,
        return_entropy=True,
        **options,
    )
    (1.7 * out.loss).backward()
    results = [out.loss.detach(), out.entropy, out.clip_fraction] + [leaf.grad for leaf in leaves]
    return [None if t is None else t.cpu() for t in results]


NAMES = ["loss", "entropy", "clip_fraction", "grad_hidden", "grad_weight", "grad_bias"]
OPTIONS = list(itertools.product(LOSS_TYPES, ["token", "sequence"], [0.0, 0.04], [None, 3.0], [False, True]))


def fused(chunk_rows):
    return lambda *a, **k: medgrpo.fused_linear_policy_loss(*a, chunk_rows=chunk_rows, **k)


@pytest.mark.parametrize("loss_type,importance_sampling,beta,dual_clip,per_token", OPTIONS)
def test_matches_reference_in_fp64(loss_type, importance_sampling, beta, dual_clip, per_token):
    batch = make_batch(seed=1, per_token_advantages=per_token)
    options = dict(
        loss_type=loss_type,
        epsilon_high=0.3,
        beta=beta,
        importance_sampling=importance_sampling,
        dual_clip=dual_clip,
        max_completion_length=12,
    )
    actual = run(fused(chunk_rows=4), batch, torch.float64, **options)
    want = run(reference.fused_linear_policy_loss, batch, torch.float64, **options)
    for name, a, w in zip(NAMES, actual, want):
        torch.testing.assert_close(a, w, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("importance_sampling", ["token", "sequence"])
def test_tolerance_rule_in_low_precision(backend, dtype, importance_sampling, head_chunks):
    context, device = head_chunks(backend)
    batch = make_batch(batch=4, length=11, hidden=24, vocab=300, seed=2)
    options = dict(loss_type="dapo", epsilon_high=0.3, beta=0.04, importance_sampling=importance_sampling)
    rounded = {k: (v.to(dtype).double() if v.is_floating_point() else v) for k, v in batch.items()}
    exact = run(reference.fused_linear_policy_loss, rounded, torch.float64, **options)
    same = run(reference.fused_linear_policy_loss, batch, dtype, **options)
    with context:
        actual = run(fused(chunk_rows=5), batch, dtype, device, **options)
    for i, name in enumerate(NAMES):
        assert_within_reference_error(actual[i], same[i], exact[i], factor=3.0 if i >= 3 else 2.0, atol=1e-5, name=name)


@pytest.mark.parametrize(
    "loss_type,importance_sampling,beta", list(itertools.product(LOSS_TYPES, ["token", "sequence"], [0.0, 0.04]))
)
def test_matches_liger_fused_linear_grpo_loss(loss_type, importance_sampling, beta):
    liger = pytest.importorskip("liger_kernel.chunked_loss")
    batch = make_batch(seed=3)
    f32 = {k: (v.float() if v.is_floating_point() else v) for k, v in batch.items()}
    options = dict(
        beta=beta,
        epsilon_low=0.2,
        epsilon_high=0.3,
        loss_type=loss_type,
        max_completion_length=12,
        importance_sampling_level=importance_sampling,
        temperature=0.8,
    )
    results = []
    for module in (FusedLinearGRPOLoss(**options), liger.LigerFusedLinearGRPOLoss(compiled=False, **options)):
        leaves = [f32[k].clone().requires_grad_(True) for k in ("hidden", "weight", "bias")]
        loss, metrics = module(
            leaves[0],
            leaves[1],
            f32["targets"],
            f32["mask"],
            f32["advantages"],
            bias=leaves[2],
            ref_per_token_logps=f32["ref_logp"],
            old_per_token_logps=f32["old_logp"],
        )
        loss.backward()
        results.append([loss.detach(), *metrics, *(leaf.grad for leaf in leaves)])
    for ours, theirs in zip(*results):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)


def test_module_computes_reference_logps_from_ref_input():
    batch = make_batch(seed=4)
    f32 = {k: (v.float() if v.is_floating_point() else v) for k, v in batch.items()}
    module = FusedLinearGRPOLoss(beta=0.04, epsilon_high=0.3)
    ref_hidden = f32["hidden"] + 0.01
    with torch.no_grad():
        ref_logp, _ = medgrpo.linear_logprob(ref_hidden, f32["weight"], f32["targets"])
    from_input = module(
        f32["hidden"],
        f32["weight"],
        f32["targets"],
        f32["mask"],
        f32["advantages"],
        ref_input=ref_hidden,
        ref_weight=f32["weight"],
        old_per_token_logps=f32["old_logp"],
    )
    from_logps = module(
        f32["hidden"],
        f32["weight"],
        f32["targets"],
        f32["mask"],
        f32["advantages"],
        ref_per_token_logps=ref_logp,
        old_per_token_logps=f32["old_logp"],
    )
    torch.testing.assert_close(from_input[0], from_logps[0])
    with pytest.raises(NotImplementedError, match="vllm_is_ratio"):
        module(
            f32["hidden"],
            f32["weight"],
            f32["targets"],
            f32["mask"],
            f32["advantages"],
            ref_per_token_logps=ref_logp,
            vllm_is_ratio=torch.ones(3, 9),
        )


def test_fully_masked_batch_and_single_token():
    batch = make_batch(batch=2, length=5, seed=5)
    batch["mask"] = torch.zeros_like(batch["mask"])
    loss, entropy, clip, grad_h, grad_w, grad_b = run(fused(chunk_rows=4), batch, torch.float32)
    assert loss.item() == 0.0 and entropy.item() == 0.0 and clip.item() == 0.0
    assert torch.all(grad_h == 0) and torch.all(grad_w == 0) and torch.all(grad_b == 0)
    single = make_batch(batch=1, length=1, seed=6)
    actual = run(fused(chunk_rows=4), single, torch.float64)
    want = run(reference.fused_linear_policy_loss, single, torch.float64)
    for name, a, w in zip(NAMES, actual, want):
        torch.testing.assert_close(a, w, msg=name)


def test_masked_rows_never_reach_the_vocab_gemm(monkeypatch):
    """Only masked-in tokens are gathered into the logits GEMM: count the rows it sees."""
    fused_module = sys.modules["medgrpo.ops.fused_linear_policy_loss"]  # the function shadows the module name
    seen = []
    original = fused_module.chunk_logits
    monkeypatch.setattr(fused_module, "chunk_logits", lambda h, w, b: seen.append(h.shape[0]) or original(h, w, b))
    batch = make_batch(seed=7)
    run(fused(chunk_rows=4), batch, torch.float32)
    assert sum(seen) == int(batch["mask"].sum())


def test_no_grad_and_torch_compile():
    batch = make_batch(seed=8)
    f32 = {k: (v.float() if v.is_floating_point() else v) for k, v in batch.items()}
    args = (f32["hidden"], f32["weight"], f32["targets"], f32["mask"], f32["advantages"])
    with torch.no_grad():
        loss = medgrpo.fused_linear_policy_loss(*args, old_logp=f32["old_logp"]).loss
    fn = lambda *a: medgrpo.fused_linear_policy_loss(*a, old_logp=f32["old_logp"]).loss  # noqa: E731
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(*args), loss)


@pytest.mark.parametrize(
    "overrides,error,words",
    [
        (dict(hidden=torch.randn(27, 16)), ValueError, "hidden"),
        (dict(mask=torch.ones(3, 8, dtype=torch.bool)), ValueError, "mask"),
        (dict(advantages=torch.randn(4)), ValueError, "advantages"),
        (dict(targets=torch.zeros(3, 9)), TypeError, "targets"),
        (dict(loss_type="ppo"), ValueError, "loss_type"),
        (dict(beta=0.1, ref_logp=None), ValueError, "ref_logp"),
    ],
)
def test_bad_input_names_the_argument(overrides, error, words):
    batch = {k: (v.float() if v.is_floating_point() else v) for k, v in make_batch(seed=9).items()}
    kwargs = dict(old_logp=batch["old_logp"], ref_logp=batch["ref_logp"])
    positional = {k: batch[k] for k in ("hidden", "weight", "targets", "mask", "advantages")}
    for key, value in overrides.items():
        (positional if key in positional else kwargs)[key] = value
    with pytest.raises(error, match=words):
        medgrpo.fused_linear_policy_loss(*positional.values(), **kwargs)


def float_batch(**kwargs) -> dict:
    return {k: (v.float() if v.is_floating_point() else v) for k, v in make_batch(**kwargs).items()}


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("importance_sampling", ["token", "sequence"])
def test_entropy_only_when_asked(backend, importance_sampling, head_chunks):
    context, device = head_chunks(backend)
    batch = {k: v.to(device) for k, v in float_batch(seed=10).items()}
    args = [batch[k] for k in ("hidden", "weight", "targets", "mask", "advantages")]
    options = dict(old_logp=batch["old_logp"], importance_sampling=importance_sampling)
    with context:
        plain = medgrpo.fused_linear_policy_loss(*args, chunk_rows=4, **options)
        asked = medgrpo.fused_linear_policy_loss(*args, return_entropy=True, chunk_rows=4, **options)
    assert plain.entropy is None and asked.entropy is not None
    torch.testing.assert_close(plain.loss, asked.loss)
    want = reference.fused_linear_policy_loss(*args, return_entropy=True, **options)
    torch.testing.assert_close(asked.entropy, want.entropy, rtol=1e-5, atol=1e-6)
    assert reference.fused_linear_policy_loss(*args, **options).entropy is None


def test_backward_scales_in_place_and_refuses_a_second_backward():
    batch = float_batch(batch=2, length=6, hidden=16, vocab=4096, seed=11)
    leaves = [batch[k].clone().requires_grad_(True) for k in ("hidden", "weight")]
    args = (*leaves, batch["targets"], batch["mask"], batch["advantages"])
    out = medgrpo.fused_linear_policy_loss(*args, old_logp=batch["old_logp"], chunk_rows=4)
    with PeakMemory("cpu") as meter:
        (2.5 * out.loss).backward(retain_graph=True)
    # The forward's weight gradient becomes weight.grad as it is: backward allocates nothing weight-sized
    # (before: a zero-filled gradient for the unused weight-gradient output, and a copy to scale it).
    weight_bytes = leaves[1].numel() * 4
    assert meter.peak_extra_bytes < 0.25 * weight_bytes, "backward allocated a weight-sized tensor"
    fresh = [t.detach().clone().requires_grad_(True) for t in leaves]
    medgrpo.fused_linear_policy_loss(*fresh, *args[2:], old_logp=batch["old_logp"], chunk_rows=4).loss.backward()
    for got, want in zip(leaves, fresh):
        torch.testing.assert_close(got.grad, 2.5 * want.grad)
    with pytest.raises(RuntimeError, match="backward was already run"):
        out.loss.backward()


def test_gradients_accumulate_over_two_calls():
    """Micro-batches: a second call's in-place-scaled gradients add onto the first's."""
    batch = float_batch(seed=12)
    leaves = [batch[k].clone().requires_grad_(True) for k in ("hidden", "weight", "bias")]
    args = (leaves[0], leaves[1], batch["targets"], batch["mask"], batch["advantages"])
    for scale in (1.0, 0.5):
        (scale * medgrpo.fused_linear_policy_loss(*args, bias=leaves[2], chunk_rows=4).loss).backward()
    fresh = [t.detach().clone().requires_grad_(True) for t in leaves]
    loss = medgrpo.fused_linear_policy_loss(fresh[0], fresh[1], *args[2:], bias=fresh[2], chunk_rows=4).loss
    (1.5 * loss).backward()
    for got, want in zip(leaves, fresh):
        torch.testing.assert_close(got.grad, want.grad)
