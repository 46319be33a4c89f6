"""linear_logprob: lm-head token log-probs (and entropy) that never hold the full logits.

The head runs over row chunks: one GEMM writes a (rows x V) logits chunk, a row kernel
reduces it to log-prob, log-sum-exp and entropy, and the backward recomputes the chunk
and turns it into d loss / d logits in place for the two backward GEMMs. Extra memory
is one chunk, bounded by ``CHUNK_BYTES`` whatever the number of tokens. On CUDA the row
kernels are Triton; on CPU the same steps run as PyTorch ops on the chunk.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from medgrpo.ops import _checks, _library
from medgrpo.ops.reference import accumulation_dtype

# Bytes of one logits chunk: bounds the head's extra memory (plus the chunk's gradients).
# Bytes of one logits chunk: bounds the head's extra memory. Large on GPUs, where the GEMM
# wants many rows; small on CPUs, whose GEMMs are efficient at a few hundred rows and whose
# PyTorch chunk math keeps a few chunk-sized temporaries alive.
CHUNK_BYTES = {"cuda": 256 * 2**20, "cpu": 32 * 2**20}


# ------------------------------------------------------------------------------ chunk math
@dataclass(frozen=True)
class ChunkKernels:
    """The two row kernels of one logits chunk (Triton or PyTorch)."""

    stats: Callable[[Tensor, Tensor, float, bool], tuple[Tensor, Tensor, Tensor]]
    grad_: Callable[[Tensor, Tensor, Tensor, Tensor, Tensor, Optional[Tensor], float], Tensor]


def _torch_stats(
    logits: Tensor, targets: Tensor, temperature: float, with_entropy: bool = True
) -> tuple[Tensor, Tensor, Tensor]:
    z = logits.to(accumulation_dtype(logits.dtype)) / temperature
    lse = torch.logsumexp(z, dim=-1)
    log_p = z.sub_(lse.unsqueeze(-1))
    logp = log_p.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    if not with_entropy:
        return logp, lse, torch.zeros_like(lse)
    # entropy = -sum p log p; p = 0 entries (log p = -inf) contribute 0
    entropy = -torch.linalg.vecdot(log_p.exp(), log_p.nan_to_num(neginf=0.0))
    return logp, lse, entropy


def _torch_grad_(
    logits: Tensor,
    targets: Tensor,
    lse: Tensor,
    entropy: Tensor,
    grad_logp: Tensor,
    grad_entropy: Optional[Tensor],
    temperature: float,
) -> Tensor:
    # d/dz [g log p_t + h H] = g (onehot - p) - h p (log p + H), with log p = z - lse.
    log_p = logits.to(accumulation_dtype(logits.dtype)).div(temperature).sub_(lse.unsqueeze(-1))
    p = log_p.exp()
    g = grad_logp.unsqueeze(-1).to(log_p.dtype)
    if grad_entropy is not None:
        h = grad_entropy.unsqueeze(-1).to(log_p.dtype)
        coefficient = torch.where(p > 0, log_p.add_(entropy.unsqueeze(-1)), 0.0).mul_(h).add_(g)
    else:
        coefficient = g
    grad_z = p.mul_(coefficient).neg_()
    grad_z.scatter_add_(-1, targets.unsqueeze(-1), g)
    return logits.copy_(grad_z.div_(temperature))


TORCH_CHUNK = ChunkKernels(_torch_stats, _torch_grad_)


def triton_chunk() -> ChunkKernels:
    from medgrpo.kernels import linear_logprob as kernels

    return ChunkKernels(kernels.logprob_forward, kernels.logprob_backward_)


_TRITON_ON_CPU = False


@contextlib.contextmanager
def triton_chunks_on_cpu() -> Iterator[None]:
    """Testing hook: run the Triton row kernels on CPU tensors too (needs TRITON_INTERPRET=1)."""
    global _TRITON_ON_CPU
    previous, _TRITON_ON_CPU = _TRITON_ON_CPU, True
    try:
        yield
    finally:
        _TRITON_ON_CPU = previous


def chunk_kernels_for(hidden: Tensor) -> ChunkKernels:
    """Triton on CUDA (fp32 math); PyTorch on CPU and for fp64 (gradcheck) anywhere."""
    use_triton = (hidden.is_cuda or _TRITON_ON_CPU) and hidden.dtype != torch.float64
    return triton_chunk() if use_triton else TORCH_CHUNK


# Every chunk reads the whole (V, H) weight: fewer rows than this starve the GEMM.
MIN_CHUNK_ROWS = 256


def default_chunk_rows(vocab: int, dtype: torch.dtype, device: torch.device) -> int:
    """Rows per chunk: logits within CHUNK_BYTES, at least MIN_CHUNK_ROWS, a multiple of 64."""
    budget = CHUNK_BYTES["cuda" if device.type == "cuda" else "cpu"]
    rows = budget // max(vocab * torch.finfo(dtype).bits // 8, 1)
    return max(MIN_CHUNK_ROWS, rows // 64 * 64)


def chunk_logits(hidden: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """One chunk of logits, in the inputs' dtype (as the model's lm-head computes them)."""
    return torch.nn.functional.linear(hidden, weight, bias)


_FUSED_OUT_DTYPE_GEMM = True  # cleared if this torch build has no fp32-output bf16 GEMM
ACCUMULATE_BLOCK_ROWS = 8192  # rows of `out` per fallback GEMM: bounds its fp32 temporary


def add_matmul_fp32_(out: Tensor, a: Tensor, b: Tensor) -> None:
    """out (fp32) += a @ b for low-precision a, b, without an fp32 copy of a or b.

    On CUDA one cuBLAS GEMM reads bf16/fp16 and accumulates into ``out`` in fp32; where the
    torch build lacks that GEMM, blocks of ``out``'s rows are computed (fp32 accumulate
    inside cuBLAS, one rounding) and added, with a bounded temporary.
    """
    global _FUSED_OUT_DTYPE_GEMM
    if a.dtype == out.dtype:
        out.addmm_(a, b)
        return
    if out.is_cuda and _FUSED_OUT_DTYPE_GEMM:
        try:
            torch.addmm(out, a, b, out_dtype=out.dtype, out=out)
            return
        except (RuntimeError, TypeError, NotImplementedError):
            _FUSED_OUT_DTYPE_GEMM = False
    for start in range(0, out.shape[0], ACCUMULATE_BLOCK_ROWS):
        block = slice(start, start + ACCUMULATE_BLOCK_ROWS)
        out[block] += (a[block] @ b).to(out.dtype) if out.is_cuda else a[block].to(out.dtype) @ b.to(out.dtype)


# ------------------------------------------------------------------------------ the head
def head_forward(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    bias: Optional[Tensor],
    temperature: float,
    chunk_rows: int,
    kernels: ChunkKernels,
    with_entropy: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """(M, H) hidden -> fp32 (log-prob, log-sum-exp, entropy) of each row, chunk by chunk."""
    m = hidden.shape[0]
    dtype = accumulation_dtype(hidden.dtype)
    logp, lse, entropy = (torch.empty(m, dtype=dtype, device=hidden.device) for _ in range(3))
    for start in range(0, m, chunk_rows):
        end = min(start + chunk_rows, m)
        logits = chunk_logits(hidden[start:end], weight, bias)
        logp[start:end], lse[start:end], entropy[start:end] = kernels.stats(
            logits, targets[start:end], temperature, with_entropy
        )
    return logp, lse, entropy


class HeadGradients:
    """Gradient sinks of the head: hidden rows, and fp32 accumulators of weight and bias.

    ``place_hidden(start, end, rows)`` stores a chunk's hidden gradient; by default into a
    (M, H) buffer, the fused loss scatters it straight into the (B, T, H) gradient instead.
    """

    def __init__(
        self,
        hidden: Tensor,
        weight: Tensor,
        bias: Optional[Tensor],
        needs: tuple[bool, bool, bool],
        place_hidden: Optional[Callable[[int, int, Tensor], None]] = None,
    ):
        self.needs = needs
        self.hidden = torch.empty_like(hidden) if needs[0] and place_hidden is None else hidden.new_empty(0)
        self.place_hidden = place_hidden or self._store_rows
        dtype = accumulation_dtype(weight.dtype)
        self.weight = torch.zeros(weight.shape, dtype=dtype, device=weight.device) if needs[1] else None
        self.bias = torch.zeros(bias.shape, dtype=dtype, device=bias.device) if needs[2] and bias is not None else None

    def _store_rows(self, start: int, end: int, rows: Tensor) -> None:
        self.hidden[start:end] = rows

    def add_chunk(self, start: int, grad_logits: Tensor, hidden_chunk: Tensor, weight: Tensor) -> None:
        """Consume one chunk's d loss / d logits: the two backward GEMMs (and the bias sum)."""
        if self.needs[0]:
            self.place_hidden(start, start + grad_logits.shape[0], grad_logits @ weight.to(grad_logits.dtype))
        if self.weight is not None:
            add_matmul_fp32_(self.weight, grad_logits.t(), hidden_chunk.to(grad_logits.dtype))
        if self.bias is not None:
            self.bias += grad_logits.to(self.bias.dtype).sum(0)

    def result(self, weight: Tensor, bias: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        grad_weight = self.weight.to(weight.dtype) if self.weight is not None else weight.new_empty(0)
        grad_bias = self.bias.to(bias.dtype) if self.bias is not None else weight.new_empty(0)
        return self.hidden, grad_weight, grad_bias


def head_backward(
    grad_logp: Tensor,
    grad_entropy: Optional[Tensor],
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    bias: Optional[Tensor],
    lse: Tensor,
    entropy: Tensor,
    temperature: float,
    chunk_rows: int,
    kernels: ChunkKernels,
    grads: HeadGradients,
) -> None:
    """Recompute each logits chunk, turn it into d loss / d logits, feed the backward GEMMs."""
    for start in range(0, hidden.shape[0], chunk_rows):
        end = min(start + chunk_rows, hidden.shape[0])
        logits = chunk_logits(hidden[start:end], weight, bias)
        kernels.grad_(
            logits,
            targets[start:end],
            lse[start:end],
            entropy[start:end],
            grad_logp[start:end],
            None if grad_entropy is None else grad_entropy[start:end],
            temperature,
        )
        grads.add_chunk(start, logits, hidden[start:end], weight)


# ------------------------------------------------------------------------------ custom ops
def _forward_impl(hidden, weight, targets, bias, temperature, chunk_rows, with_entropy):
    return head_forward(hidden, weight, targets, bias, temperature, chunk_rows, chunk_kernels_for(hidden), with_entropy)


def _backward_impl(
    grad_logp, grad_entropy, hidden, weight, targets, bias, lse, entropy, temperature, chunk_rows, needs
):
    grads = HeadGradients(hidden, weight, bias, tuple(needs))
    head_backward(
        grad_logp,
        grad_entropy,
        hidden,
        weight,
        targets,
        bias,
        lse,
        entropy,
        temperature,
        chunk_rows,
        chunk_kernels_for(hidden),
        grads,
    )
    return grads.result(weight, bias)


for _key in ("CPU", "CUDA"):
    _library.LIBRARY.impl("linear_logprob_forward", _forward_impl, _key)
    _library.LIBRARY.impl("linear_logprob_backward", _backward_impl, _key)


@_library.register_fake("linear_logprob_forward")
def _fake_forward(hidden, weight, targets, bias, temperature, chunk_rows, with_entropy):
    return tuple(hidden.new_empty(hidden.shape[0], dtype=accumulation_dtype(hidden.dtype)) for _ in range(3))


@_library.register_fake("linear_logprob_backward")
def _fake_backward(
    grad_logp, grad_entropy, hidden, weight, targets, bias, lse, entropy, temperature, chunk_rows, needs
):
    grad_hidden = torch.empty_like(hidden) if needs[0] else hidden.new_empty(0)
    grad_weight = torch.empty_like(weight) if needs[1] else weight.new_empty(0)
    grad_bias = torch.empty_like(bias) if needs[2] and bias is not None else weight.new_empty(0)
    return grad_hidden, grad_weight, grad_bias


def _setup_context(ctx, inputs, output) -> None:
    hidden, weight, targets, bias, temperature, chunk_rows, with_entropy = inputs
    _, lse, entropy = output
    ctx.save_for_backward(hidden, weight, targets, bias, lse, entropy)
    ctx.temperature, ctx.chunk_rows, ctx.with_entropy = temperature, chunk_rows, with_entropy
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_logp, _grad_lse, grad_entropy):
    hidden, weight, targets, bias, lse, entropy = ctx.saved_tensors
    needs = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[3]]
    if not any(needs):
        return None, None, None, None, None, None, None
    grad_hidden, grad_weight, grad_bias = torch.ops.medgrpo.linear_logprob_backward(
        grad_logp,
        grad_entropy if ctx.with_entropy else None,
        hidden,
        weight,
        targets,
        bias,
        lse,
        entropy,
        ctx.temperature,
        ctx.chunk_rows,
        needs,
    )
    return (
        grad_hidden if needs[0] else None,
        grad_weight if needs[1] else None,
        None,
        grad_bias if needs[2] else None,
        None,
        None,
        None,
    )


torch.library.register_autograd(
    "medgrpo::linear_logprob_forward", _backward, setup_context=_setup_context, lib=_library.LIBRARY
)


# ------------------------------------------------------------------------------ public API
def full_weight(weight: Tensor) -> Tensor:
    """The whole lm-head weight: a DTensor shard (FSDP2 outside forward) is gathered, with autograd."""
    from torch.distributed.tensor import DTensor

    return weight.full_tensor() if isinstance(weight, DTensor) else weight


def check_head_inputs(
    hidden: Tensor, weight: Tensor, targets: Tensor, bias: Optional[Tensor], temperature: float
) -> None:
    _checks.check_floating("hidden", hidden)
    _checks.check_floating("weight", weight)
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight dtype {weight.dtype} must match hidden dtype {hidden.dtype}")
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"weight must be (V, H) with H = hidden.shape[-1] = {hidden.shape[-1]}, got {tuple(weight.shape)}"
        )
    _checks.check_integer("targets", targets)
    _checks.check_shape("targets", targets, hidden.shape[:-1], "one target token per hidden row")
    if bias is not None:
        _checks.check_floating("bias", bias)
        if bias.dtype != weight.dtype:
            raise TypeError(f"bias dtype {bias.dtype} must match weight dtype {weight.dtype}")
        _checks.check_shape("bias", bias, (weight.shape[0],), "one per vocabulary entry")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    _checks.check_same_device("hidden", hidden, weight=weight, targets=targets, bias=bias)
    _checks.check_index_range("targets", targets, weight.shape[0], "vocabulary size V")


def linear_logprob(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    bias: Optional[Tensor] = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    chunk_rows: Optional[int] = None,
) -> tuple[Tensor, Optional[Tensor]]:
    """Log-prob of each target token under ``softmax((hidden @ weight.T + bias) / temperature)``.

    Never materializes the (tokens x V) logits: the head runs over row chunks whose
    logits fit in ``CHUNK_BYTES`` (256 MiB on CUDA, 32 MiB on CPU), so extra memory is bounded
    as tokens grow.
    Pass only the rows that need a log-prob (completion tokens): every row costs a
    vocab-sized GEMM row.

    Args:
        hidden: (M, H) or (B, T, H) final hidden states (fp32/bf16/fp16).
        weight: (V, H) lm-head weight (a DTensor shard is gathered; tied embeddings work).
        targets: (M,) or (B, T) integer token ids in [0, V).
        bias: optional (V,) bias.
        temperature: logits are divided by it (the sampling temperature).
        return_entropy: also return the entropy of each row's distribution.
        chunk_rows: rows per chunk (default: from CHUNK_BYTES and V).

    Returns:
        (logp, entropy): fp32 tensors of targets' shape; entropy is None unless asked.
        Differentiable w.r.t. hidden, weight and bias (weight gradient accumulated in
        fp32 across chunks, returned in weight's dtype).
    """
    weight = full_weight(weight)
    check_head_inputs(hidden, weight, targets, bias, temperature)
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    rows = chunk_rows or default_chunk_rows(weight.shape[0], flat_hidden.dtype, flat_hidden.device)
    logp, _, entropy = torch.ops.medgrpo.linear_logprob_forward(
        flat_hidden, weight, targets.reshape(-1), bias, float(temperature), int(rows), bool(return_entropy)
    )
    shape = targets.shape
    return logp.view(shape), (entropy.view(shape) if return_entropy else None)
