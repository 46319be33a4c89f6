"""linear_logprob: chunked head (PyTorch and Triton row kernels) vs the full-logits fp64 reference."""

from __future__ import annotations

import pytest
import torch

import medgrpo
from medgrpo.ops import reference
from medgrpo.ops.linear_logprob import GEMM_ROWS, MIN_CHUNK_ROWS, default_chunk_rows
from medgrpo.testing.tolerance import assert_within_reference_error

# (M, H, V); V=4099 spans two vocab tiles; 97 rows of V=1025 take seconds per case under the Triton interpreter
SHAPES = [(1, 5, 37), (7, 33, 37), pytest.param((97, 16, 1025), marks=pytest.mark.slow), (5, 8, 4099)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make_head(m: int, hidden: int, vocab: int, *, seed: int = 0, bias: bool = True, logit_scale: float = 1.0):
    gen = torch.Generator().manual_seed(seed)
    return dict(
        hidden=torch.randn(m, hidden, generator=gen, dtype=torch.float64),
        weight=logit_scale * torch.randn(vocab, hidden, generator=gen, dtype=torch.float64) / hidden**0.5,
        bias=torch.randn(vocab, generator=gen, dtype=torch.float64) if bias else None,
        targets=torch.randint(0, vocab, (m,), generator=gen),
        grad_logp=torch.randn(m, generator=gen, dtype=torch.float64),
        grad_entropy=torch.randn(m, generator=gen, dtype=torch.float64),
    )


def run_head(fn, inputs: dict, dtype: torch.dtype, temperature: float, device: str = "cpu"):
    """(logp, entropy, grad hidden, grad weight, grad bias) of L = sum(g1 logp + g2 entropy)."""
    leaves = {
        k: (None if inputs[k] is None else inputs[k].detach().to(device, dtype).clone().requires_grad_(True))
        for k in ("hidden", "weight", "bias")
    }
    logp, entropy = fn(
        leaves["hidden"],
        leaves["weight"],
        inputs["targets"].to(device),
        bias=leaves["bias"],
        temperature=temperature,
        return_entropy=True,
    )
    loss = (logp * inputs["grad_logp"].to(device, logp.dtype)).sum() + (
        entropy * inputs["grad_entropy"].to(device, entropy.dtype)
    ).sum()
    loss.backward()
    grads = [None if leaves[k] is None else leaves[k].grad.cpu() for k in ("hidden", "weight", "bias")]
    return [logp.detach().cpu(), entropy.detach().cpu(), *grads]


def medgrpo_head(chunk_rows: int):
    return lambda *args, **kwargs: medgrpo.linear_logprob(*args, chunk_rows=chunk_rows, **kwargs)


NAMES = ["logp", "entropy", "grad_hidden", "grad_weight", "grad_bias"]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_matches_full_logits_reference(backend, dtype, shape, temperature, head_chunks):
    inputs = make_head(*shape, seed=sum(shape))
    rounded = {k: (v.to(dtype).double() if v is not None and v.is_floating_point() else v) for k, v in inputs.items()}
    exact = run_head(reference.linear_logprob, rounded, torch.float64, temperature)
    same = run_head(reference.linear_logprob, inputs, dtype, temperature)
    context, device = head_chunks(backend)
    with context:
        actual = run_head(medgrpo_head(chunk_rows=3), inputs, dtype, temperature, device)
    for i, name in enumerate(NAMES):
        factor = 3.0 if name.startswith("grad") else 2.0
        assert_within_reference_error(actual[i], same[i], exact[i], factor=factor, atol=1e-5, name=name)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_extreme_logits(backend, head_chunks):
    inputs = make_head(6, 8, 300, seed=1, logit_scale=3e3)  # logits of order +-1e4 after scaling
    exact = run_head(reference.linear_logprob, inputs, torch.float64, 0.5)
    same = run_head(reference.linear_logprob, inputs, torch.float32, 0.5)
    context, device = head_chunks(backend)
    with context:
        actual = run_head(medgrpo_head(chunk_rows=4), inputs, torch.float32, 0.5, device)
    assert all(torch.isfinite(t).all() for t in actual if t is not None)
    for i, name in enumerate(NAMES):
        assert_within_reference_error(actual[i], same[i], exact[i], factor=3.0, atol=1e-5, name=name)


def test_shapes_single_token_and_default_chunking():
    inputs = make_head(1, 4, 9, seed=2, bias=False)
    logp, entropy = medgrpo.linear_logprob(inputs["hidden"].float(), inputs["weight"].float(), inputs["targets"])
    assert logp.shape == (1,) and entropy is None and logp.dtype == torch.float32
    hidden = torch.randn(2, 3, 4)
    logp, entropy = medgrpo.linear_logprob(
        hidden, torch.randn(9, 4), torch.zeros(2, 3, dtype=torch.long), return_entropy=True
    )
    assert logp.shape == entropy.shape == (2, 3)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize(
    "hidden,vocab,dtype", [(3584, 152064, torch.bfloat16), (2048, 151936, torch.float32), (16, 4099, torch.float32)]
)
def test_default_chunk_rows_follow_the_shape(device, hidden, vocab, dtype):
    itemsize = torch.finfo(dtype).bits // 8
    rows = default_chunk_rows(10**6, hidden, dtype, torch.device(device))
    # a multiple of 64, at most the device's GEMM rows; logits within the fp32 weight gradient unless at the floor
    assert rows % 64 == 0 and MIN_CHUNK_ROWS <= rows <= GEMM_ROWS[device]
    assert rows == MIN_CHUNK_ROWS or rows * vocab * itemsize <= vocab * hidden * 4
    assert default_chunk_rows(100, hidden, dtype, torch.device(device)) == 100  # few rows: one chunk
    assert default_chunk_rows(10**6, 2048, torch.float32, torch.device("cpu")) == 1024


def test_gradcheck_fp64():
    inputs = make_head(5, 6, 11, seed=3)
    targets = inputs["targets"]

    def fn(hidden, weight, bias):
        logp, entropy = medgrpo.linear_logprob(
            hidden, weight, targets, bias=bias, temperature=0.9, return_entropy=True, chunk_rows=2
        )
        return logp, entropy

    leaves = tuple(inputs[k].clone().requires_grad_(True) for k in ("hidden", "weight", "bias"))
    assert torch.autograd.gradcheck(fn, leaves)


def test_frozen_weight_computes_no_weight_gradient():
    inputs = make_head(4, 6, 11, seed=4, bias=False)
    hidden = inputs["hidden"].float().requires_grad_(True)
    logp, _ = medgrpo.linear_logprob(hidden, inputs["weight"].float(), inputs["targets"])
    logp.sum().backward()
    assert hidden.grad is not None and torch.isfinite(hidden.grad).all()


def test_torch_compile_fullgraph():
    inputs = make_head(6, 8, 13, seed=5)
    args = (inputs["hidden"].float(), inputs["weight"].float(), inputs["targets"])
    fn = lambda h, w, t: medgrpo.linear_logprob(h, w, t, return_entropy=True)  # noqa: E731
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(*args), fn(*args)):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize(
    "overrides,error,words",
    [
        (dict(weight=torch.randn(9, 5)), ValueError, "weight"),
        (dict(weight=torch.randn(9, 4, dtype=torch.float64)), TypeError, "weight"),
        (dict(targets=torch.zeros(3, dtype=torch.long)), ValueError, "targets"),
        (dict(targets=torch.full((2,), 9)), ValueError, "targets"),
        (dict(targets=torch.zeros(2)), TypeError, "targets"),
        (dict(bias=torch.randn(8)), ValueError, "bias"),
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(hidden=torch.zeros(2, 4, dtype=torch.long)), TypeError, "hidden"),
    ],
)
def test_bad_input_names_the_argument(overrides, error, words):
    kwargs = dict(hidden=torch.randn(2, 4), weight=torch.randn(9, 4), targets=torch.zeros(2, dtype=torch.long))
    kwargs.update(overrides)
    hidden, weight, targets = kwargs.pop("hidden"), kwargs.pop("weight"), kwargs.pop("targets")
    with pytest.raises(error, match=words):
        medgrpo.linear_logprob(hidden, weight, targets, **kwargs)


@pytest.mark.gpu
def test_cuda_bf16_matches_reference():
    inputs = make_head(300, 64, 5000, seed=6)
    exact = run_head(reference.linear_logprob, inputs, torch.float64, 1.0)
    same = run_head(reference.linear_logprob, inputs, torch.bfloat16, 1.0)
    actual = run_head(medgrpo_head(chunk_rows=128), inputs, torch.bfloat16, 1.0, "cuda")
    for i, name in enumerate(NAMES):
        assert_within_reference_error(actual[i], same[i], exact[i], factor=3.0, atol=1e-5, name=name)
