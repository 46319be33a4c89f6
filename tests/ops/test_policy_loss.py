"""policy_loss: Triton (interpreted on CPU), C++ and the public op against the fp64 reference."""

from __future__ import annotations

import itertools

import pytest
import torch

import medgrpo
from medgrpo.ops import reference
from medgrpo.ops.policy_loss import PolicyLossConfig
from medgrpo.testing.tolerance import assert_within_reference_error

SHAPES = [(1, 1), (3, 7), (4, 97), (2, 1025)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
METRIC_NAMES = ["kl", "clip_low", "clip_high", "clip_region", "clip_dual", "tokens"]


def make_inputs(
    batch: int,
    length: int,
    *,
    seed: int = 0,
    per_token_advantages: bool = False,
    log_ratio_scale: float = 0.3,
    with_old: bool = True,
) -> dict:
    """fp64 inputs with a fully masked row (when B > 1), ratios on both sides of the clip range."""
    gen = torch.Generator().manual_seed(seed)
    logp = -3.0 * torch.rand(batch, length, generator=gen, dtype=torch.float64) - 0.01
    old = logp + log_ratio_scale * torch.randn(batch, length, generator=gen, dtype=torch.float64)
    ref = logp + 0.2 * torch.randn(batch, length, generator=gen, dtype=torch.float64)
    adv_shape = (batch, length) if per_token_advantages else (batch,)
    advantages = torch.randn(adv_shape, generator=gen, dtype=torch.float64)
    mask = torch.rand(batch, length, generator=gen) > 0.25
    mask[0, 0] = True
    if batch > 1:
        mask[-1] = False
    return dict(logp=logp, advantages=advantages, mask=mask, old_logp=old if with_old else None, ref_logp=ref)


def cast(inputs: dict, dtype: torch.dtype, device: str = "cpu") -> dict:
    out = {}
    for key, value in inputs.items():
        if value is None or not value.is_floating_point():
            out[key] = None if value is None else value.to(device)
        else:
            out[key] = value.to(dtype).to(device)
    return out


def reference_run(inputs: dict, config: PolicyLossConfig, num_items=None):
    """Reference loss, metrics vector and d loss / d logp (autograd), in the inputs' dtype."""
    logp = inputs["logp"].detach().clone().requires_grad_(True)
    out = reference.policy_loss(
        logp,
        inputs["advantages"],
        inputs["mask"],
        old_logp=inputs["old_logp"],
        ref_logp=inputs["ref_logp"],
        loss_type=config.loss_type,
        max_completion_length=config.max_completion_length,
        num_items=num_items,
        **config.per_token_options(),
    )
    (grad,) = torch.autograd.grad(out.loss, logp)
    zero = out.loss.new_zeros(())
    metrics = torch.stack(
        [
            zero if out.kl is None else out.kl,
            out.clip_fraction_low,
            out.clip_fraction_high,
            out.clip_fraction,
            zero if out.clip_fraction_dual is None else out.clip_fraction_dual,
            inputs["mask"].to(out.loss.dtype).sum(),
        ]
    )
    return out.loss.detach(), metrics.detach(), grad


def kernel_run(backend: str, inputs: dict, config: PolicyLossConfig, num_items_value: float = -1.0):
    """Forward + backward of one backend: the Triton launchers or the registered C++ ops."""
    args = (inputs["logp"], inputs["advantages"], inputs["mask"], inputs["old_logp"], inputs["ref_logp"])
    hparams, modes = config.hparams(num_items_value), config.modes()
    grad_out = torch.ones((), device=inputs["logp"].device)
    if backend == "triton":
        from medgrpo.kernels import policy_loss as kernels

        loss, metrics, row_weight = kernels.policy_loss_forward(*args, None, hparams, modes)
        grad = kernels.policy_loss_backward(grad_out, *args, row_weight, hparams, modes)
    else:
        loss, metrics, row_weight = torch.ops.medgrpo.policy_loss_forward(*args, None, hparams, modes)
        grad = torch.ops.medgrpo.policy_loss_backward(grad_out, *args, row_weight, hparams, modes)
    return loss.cpu(), metrics.cpu(), grad.cpu()


def assert_backend_matches(
    backend: str, inputs64: dict, dtype: torch.dtype, config: PolicyLossConfig, device: str = "cpu"
) -> None:
    rounded = cast(inputs64, dtype)
    exact = reference_run(cast(rounded, torch.float64), config)
    same_dtype = reference_run(rounded, config)
    actual = kernel_run(backend, cast(inputs64, dtype, device), config)
    assert actual[2].dtype == dtype, "grad_logp must come back in logp's dtype"
    assert_within_reference_error(actual[0], same_dtype[0], exact[0], name="loss")
    for i, name in enumerate(METRIC_NAMES):
        assert_within_reference_error(actual[1][i], same_dtype[1][i], exact[1][i], name=name)
    assert_within_reference_error(actual[2], same_dtype[2], exact[2], factor=3.0, name="grad_logp")


BACKENDS = ["triton", "cpp"]


def _skip_unavailable(backend: str, request) -> str:
    if backend == "triton":
        return request.getfixturevalue("triton_device")
    request.getfixturevalue("native_cpu")
    return "cpu"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("importance_sampling", reference.IMPORTANCE_SAMPLING_LEVELS)
@pytest.mark.parametrize("loss_type", reference.LOSS_TYPES)
def test_loss_types_and_shapes(backend, dtype, shape, importance_sampling, loss_type, request):
    device = _skip_unavailable(backend, request)
    config = PolicyLossConfig(
        loss_type=loss_type,
        epsilon_low=0.2,
        epsilon_high=0.3,
        importance_sampling=importance_sampling,
        max_completion_length=shape[1] + 3,
    )
    assert_backend_matches(backend, make_inputs(*shape, seed=sum(shape)), dtype, config, device)


OPTION_GRID = list(itertools.product(reference.KL_ESTIMATORS, [0.0, 0.04], [None, 3.0], [False, True], [False, True]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("importance_sampling", reference.IMPORTANCE_SAMPLING_LEVELS)
@pytest.mark.parametrize("kl_estimator,beta,dual_clip,per_token,with_old", OPTION_GRID)
def test_kl_dual_clip_and_advantage_shapes(
    backend, importance_sampling, kl_estimator, beta, dual_clip, per_token, with_old, request
):
    device = _skip_unavailable(backend, request)
    config = PolicyLossConfig(
        loss_type="bnpo",
        epsilon_low=0.2,
        epsilon_high=0.3,
        beta=beta,
        kl_estimator=kl_estimator,
        importance_sampling=importance_sampling,
        dual_clip=dual_clip,
    )
    inputs = make_inputs(3, 37, seed=7, per_token_advantages=per_token, log_ratio_scale=1.5, with_old=with_old)
    assert_backend_matches(backend, inputs, torch.float32, config, device)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_extreme_log_ratios(backend, dtype, sign, request):
    device = _skip_unavailable(backend, request)
    inputs = make_inputs(4, 33, seed=3)
    inputs["old_logp"] = inputs["logp"] - sign * 50.0  # log-ratio +-50: ratio e^{+-50}
    for importance_sampling in reference.IMPORTANCE_SAMPLING_LEVELS:
        config = PolicyLossConfig(
            loss_type="dapo", epsilon_high=0.3, dual_clip=3.0, beta=0.04, importance_sampling=importance_sampling
        )
        assert_backend_matches(backend, inputs, dtype, config, device)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fully_masked_batch_and_nan_padding(backend, request):
    device = _skip_unavailable(backend, request)
    inputs = make_inputs(3, 17, seed=5)
    for key in ("logp", "old_logp", "ref_logp"):
        inputs[key] = inputs[key].masked_fill(~inputs["mask"], float("nan"))  # padding garbage
    config = PolicyLossConfig(loss_type="grpo", beta=0.04, dual_clip=3.0)
    assert_backend_matches(backend, inputs, torch.float32, config, device)
    inputs["mask"] = torch.zeros_like(inputs["mask"])
    for loss_type in reference.LOSS_TYPES:
        config = PolicyLossConfig(loss_type=loss_type, beta=0.04, max_completion_length=17)
        loss, metrics, grad = kernel_run(backend, cast(inputs, torch.float32, device), config)
        assert loss.item() == 0.0 and torch.all(metrics == 0) and torch.all(grad == 0)


@pytest.mark.parametrize("loss_type", reference.LOSS_TYPES)
@pytest.mark.parametrize("importance_sampling", reference.IMPORTANCE_SAMPLING_LEVELS)
def test_gradcheck_reference_and_public_op(loss_type, importance_sampling):
    inputs = make_inputs(3, 6, seed=11, per_token_advantages=True, log_ratio_scale=0.5)
    options = dict(
        old_logp=inputs["old_logp"],
        ref_logp=inputs["ref_logp"],
        loss_type=loss_type,
        beta=0.04,
        epsilon_high=0.3,
        dual_clip=2.0,
        importance_sampling=importance_sampling,
        max_completion_length=8,
    )
    adv, mask = inputs["advantages"], inputs["mask"]
    logp = inputs["logp"].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: reference.policy_loss(x, adv, mask, **options).loss, (logp,))
    # The public op on CPU: C++ kernels in fp64 (or the reference without the extension).
    assert torch.autograd.gradcheck(lambda x: medgrpo.policy_loss(x, adv, mask, **options).loss, (logp,))


def test_public_op_outputs_and_dtypes():
    inputs = cast(make_inputs(4, 9, seed=2), torch.bfloat16)
    logp = inputs["logp"].clone().requires_grad_(True)
    out = medgrpo.policy_loss(logp, inputs["advantages"], inputs["mask"], old_logp=inputs["old_logp"], epsilon_high=0.3)
    assert out.loss.dtype == torch.float32 and out.kl is None and out.clip_fraction_dual is None
    assert out.entropy is None and not out.clip_fraction.requires_grad
    out.loss.backward()
    assert logp.grad.dtype == torch.bfloat16 and torch.isfinite(logp.grad).all()
    out = medgrpo.policy_loss(logp, inputs["advantages"], inputs["mask"], ref_logp=inputs["ref_logp"], dual_clip=3.0)
    assert out.kl is not None and out.clip_fraction_dual is not None


@pytest.mark.parametrize("num_items", [123, 0.5, "tensor"])
def test_dapo_num_items(num_items):
    inputs = make_inputs(3, 11, seed=4)
    items = torch.tensor(77.0, dtype=torch.float64) if num_items == "tensor" else num_items
    got = medgrpo.policy_loss(
        inputs["logp"], inputs["advantages"], inputs["mask"], old_logp=inputs["old_logp"], num_items=items
    ).loss
    want = reference.policy_loss(
        inputs["logp"], inputs["advantages"], inputs["mask"], old_logp=inputs["old_logp"], num_items=items
    ).loss
    torch.testing.assert_close(got, want)


def test_torch_compile_fullgraph():
    inputs = make_inputs(3, 13, seed=6)

    def step(logp, advantages, mask, old_logp):
        out = medgrpo.policy_loss(logp, advantages, mask, old_logp=old_logp, epsilon_high=0.3)
        return out.loss, out.clip_fraction

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    args = (inputs["advantages"].float(), inputs["mask"], inputs["old_logp"].float())
    logp_eager = inputs["logp"].float().requires_grad_(True)
    logp_compiled = inputs["logp"].float().requires_grad_(True)
    eager, compiled_out = step(logp_eager, *args), compiled(logp_compiled, *args)
    eager[0].backward()
    compiled_out[0].backward()
    torch.testing.assert_close(compiled_out[0], eager[0])
    torch.testing.assert_close(logp_compiled.grad, logp_eager.grad)


def _call(**overrides):
    inputs = make_inputs(2, 5)
    kwargs = dict(logp=inputs["logp"], advantages=inputs["advantages"], mask=inputs["mask"])
    kwargs.update(overrides)
    logp, advantages, mask = kwargs.pop("logp"), kwargs.pop("advantages"), kwargs.pop("mask")
    return medgrpo.policy_loss(logp, advantages, mask, **kwargs)


@pytest.mark.parametrize(
    "overrides,error,words",
    [
        (dict(mask=torch.ones(2, 6, dtype=torch.bool)), ValueError, "mask"),
        (dict(logp=torch.zeros(2, 5, dtype=torch.int64)), TypeError, "logp"),
        (dict(logp=torch.zeros(10)), ValueError, "logp"),
        (dict(advantages=torch.zeros(3)), ValueError, "advantages"),
        (dict(old_logp=torch.zeros(2, 4)), ValueError, "old_logp"),
        (dict(loss_type="ppo"), ValueError, "loss_type"),
        (dict(kl_estimator="k4"), ValueError, "kl_estimator"),
        (dict(importance_sampling="seq"), ValueError, "importance_sampling"),
        (dict(loss_type="dr_grpo"), ValueError, "max_completion_length"),
        (dict(beta=0.1), ValueError, "ref_logp"),
        (dict(dual_clip=0.5), ValueError, "dual_clip"),
        (dict(epsilon_low=1.5), ValueError, "epsilon_low"),
        (dict(num_items=torch.ones(3)), ValueError, "num_items"),
    ],
)
def test_bad_input_names_the_argument(overrides, error, words):
    with pytest.raises(error, match=words):
        _call(**overrides)


@pytest.mark.gpu
def test_public_op_on_cuda_matches_reference():
    inputs = make_inputs(64, 257, seed=9)
    for dtype in (torch.float32, torch.bfloat16):
        config = PolicyLossConfig(loss_type="dapo", epsilon_high=0.3, beta=0.04, dual_clip=3.0)
        rounded = cast(inputs, dtype)
        exact = reference_run(cast(rounded, torch.float64), config)
        same = reference_run(rounded, config)
        on_gpu = cast(inputs, dtype, "cuda")
        logp = on_gpu["logp"].clone().requires_grad_(True)
        out = medgrpo.policy_loss(
            logp,
            on_gpu["advantages"],
            on_gpu["mask"],
            old_logp=on_gpu["old_logp"],
            ref_logp=on_gpu["ref_logp"],
            epsilon_high=0.3,
            beta=0.04,
            dual_clip=3.0,
        )
        out.loss.backward()
        assert_within_reference_error(out.loss.cpu(), same[0], exact[0], name="loss")
        assert_within_reference_error(logp.grad.cpu(), same[2], exact[2], factor=3.0, name="grad")
