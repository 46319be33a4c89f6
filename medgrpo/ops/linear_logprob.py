"""linear_logprob: lm-head token log-probs (and entropy) that never hold the full logits.

The head runs over row chunks: one GEMM writes a (rows x V) logits chunk, a row kernel
reduces it to log-prob, log-sum-exp and entropy, and the backward recomputes the chunk
and turns it into d loss / d logits in place for the two backward GEMMs. Extra memory
is one chunk (``default_chunk_rows``: at most the size of the fp32 weight gradient),
whatever the number of tokens. On CUDA the row kernels are Triton; on CPU the same steps
run as PyTorch ops over small row blocks of the chunk.
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


# ------------------------------------------------------------------------------ chunk math
@dataclass(frozen=True)
class ChunkKernels:
    """The two row kernels of one logits chunk (Triton or PyTorch)."""

    stats: Callable[[Tensor, Tensor, float, bool], tuple[Tensor, Tensor, Tensor]]
    grad_: Callable[[Tensor, Tensor, Tensor, Tensor, Tensor, Optional[Tensor], float], Tensor]


# The PyTorch chunk math runs over row blocks of the chunk of about this many bytes, so that its
# temporaries (fp32 copies of bf16 logits, exp, log-softmax) stay small beside the chunk.
TORCH_BLOCK_BYTES = 8 * 2**20


def _row_blocks(logits: Tensor) -> Iterator[slice]:
    rows, vocab = logits.shape
    step = max(1, TORCH_BLOCK_BYTES // max(vocab * 4, 1))
    return (slice(start, min(start + step, rows)) for start in range(0, rows, step))


def _scaled_logits(logits: Tensor, temperature: float) -> Tensor:
    """z = logits / temperature in the accumulation dtype: ``logits`` itself for fp32 at temperature 1 (no copy)."""
    z = logits.to(accumulation_dtype(logits.dtype))
    return z if temperature == 1.0 else z / temperature


def _torch_stats(
    logits: Tensor, targets: Tensor, temperature: float, with_entropy: bool = True
) -> tuple[Tensor, Tensor, Tensor]:
    logp, lse, entropy = (logits.new_zeros(logits.shape[0], dtype=accumulation_dtype(logits.dtype)) for _ in range(3))
    for rows in _row_blocks(logits):
        z = _scaled_logits(logits[rows], temperature)  # may be a view of the logits: read only
        lse[rows] = torch.logsumexp(z, dim=-1)
        logp[rows] = z.gather(-1, targets[rows].unsqueeze(-1)).squeeze(-1) - lse[rows]
        if with_entropy:  # entropy = -sum p log p; p = 0 entries (log p = -inf) contribute 0
            log_p = z - lse[rows].unsqueeze(-1)
            entropy[rows] = -torch.linalg.vecdot(log_p.exp(), log_p.nan_to_num_(neginf=0.0))
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
    # d/dz [g log p_t + h H] = g (onehot - p) - h p (log p + H), with log p = z - lse; d/dlogits = d/dz / T.
    # In place on the logits (consumed: they become their gradient); on fp32 copies of bf16/fp16 row blocks.
    for rows in _row_blocks(logits):
        z = logits[rows].to(accumulation_dtype(logits.dtype))
        log_p = (z if temperature == 1.0 else z.div_(temperature)).sub_(lse[rows].unsqueeze(-1))
        g = grad_logp[rows].unsqueeze(-1).to(log_p.dtype)
        if grad_entropy is None:
            grad_z = log_p.exp_().mul_(g).neg_()  # -g p
        else:
            h = grad_entropy[rows].unsqueeze(-1).to(log_p.dtype)
            p = log_p.exp()
            # where p = 0, log p may be -inf: zero it (p times anything finite is 0 there)
            coefficient = log_p.add_(entropy[rows].unsqueeze(-1)).nan_to_num_(neginf=0.0).mul_(h).add_(g)
            grad_z = coefficient.mul_(p).neg_()  # still in z's storage
        grad_z.scatter_add_(-1, targets[rows].unsqueeze(-1), g)
        if temperature != 1.0:
            grad_z.div_(temperature)
        if z.dtype != logits.dtype:  # worked on an fp32 copy
            logits[rows] = grad_z
    return logits


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


# Rows per chunk. Each chunk re-reads the (V, H) weight in the logits GEMM and in the hidden-gradient
# GEMM, and reads and writes the fp32 weight gradient in the third: weight-sized traffic per chunk
# against 6 * rows * V * H FLOPs, so few rows make the head memory-bound. Measured on 2 CPU cores
# (H 2048, V 151936, fp32, fused fwd+bwd, M 2048): 256-row chunks ~30% slower than 512-1024, 2048
# no faster; on an H200 (~155 FLOP/byte) the fp32 weight-gradient read+write alone stays under ~8%
# of the GEMM time only from ~4096 rows (the GPU benchmark is to confirm it).
GEMM_ROWS = {"cuda": 4096, "cpu": 1024}
# Memory: one chunk's logits at most as large as the fp32 weight gradient the head holds anyway
# (rows <= 4 H / logits itemsize), never fewer rows than MIN_CHUNK_ROWS. Bounded whatever M is.
MIN_CHUNK_ROWS = 256


def default_chunk_rows(rows: int, hidden: int, dtype: torch.dtype, device: torch.device) -> int:
    """Rows per chunk for an (rows x hidden) @ (hidden x V) head: all rows if few, else a multiple of 64.

    min(rows, GEMM_ROWS of the device, max(MIN_CHUNK_ROWS, rows whose logits fit the fp32 weight gradient)).
    The last bound does not depend on V: rows * V * itemsize <= V * hidden * 4 is rows <= 4 hidden / itemsize.
    """
    itemsize = torch.finfo(dtype).bits // 8
    by_memory = max(MIN_CHUNK_ROWS, hidden * 4 // itemsize)
    chunk = min(GEMM_ROWS["cuda" if device.type == "cuda" else "cpu"], by_memory) // 64 * 64
    return max(1, min(rows, chunk))


def chunk_logits(hidden: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """One chunk of logits, in the inputs' dtype (as the model's lm-head computes them)."""
    return torch.nn.functional.linear(hidden, weight, bias)


_FUSED_OUT_DTYPE_GEMM = True  # cleared if this torch build has no fp32-output bf16 GEMM
ACCUMULATE_BLOCK_ROWS = 8192  # rows of `out` per fallback GEMM: bounds its fp32 temporary


def matmul_into_(out: Tensor, a: Tensor, b: Tensor, *, accumulate: bool) -> None:
    """out = a @ b, or out += a @ b with ``accumulate``; fp32 ``out`` for low-precision a, b without their fp32 copy.

    Without ``accumulate`` ``out`` is only written (beta = 0: its old contents, even NaN,
    are ignored), so it needs no zero fill. On CUDA one cuBLAS GEMM reads bf16/fp16 and
    writes ``out`` in fp32; where the torch build lacks that GEMM, blocks of ``out``'s rows
    are computed (fp32 accumulate inside cuBLAS, one rounding) and added, with a bounded
    temporary.
    """
    global _FUSED_OUT_DTYPE_GEMM
    beta = 1.0 if accumulate else 0.0
    if a.dtype == out.dtype:
        out.addmm_(a, b, beta=beta)
        return
    if out.is_cuda and _FUSED_OUT_DTYPE_GEMM:
        try:
            torch.addmm(out, a, b, out_dtype=out.dtype, beta=beta, out=out)
            return
        except (RuntimeError, TypeError, NotImplementedError):
            _FUSED_OUT_DTYPE_GEMM = False
    for start in range(0, out.shape[0], ACCUMULATE_BLOCK_ROWS):
        block = slice(start, start + ACCUMULATE_BLOCK_ROWS)
        product = (a[block] @ b).to(out.dtype) if out.is_cuda else a[block].to(out.dtype) @ b.to(out.dtype)
        if accumulate:
            out[block] += product
        else:
            out[block] = product


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
    """Gradient sinks of the head: hidden rows, the weight gradient and the bias gradient.

    ``place_hidden(start, end, rows)`` stores a chunk's hidden gradient; by default into a
    (M, H) buffer, the fused loss scatters it straight into the (B, T, H) gradient instead.

    The weight gradient is summed over chunks in fp32. For an fp32 weight the chunks write
    straight into the returned gradient (the first chunk overwrites, the next ones add: no
    zero fill, no copy). For a bf16/fp16 weight an fp32 accumulator (twice the weight's
    bytes) is rounded once at the end; Liger-Kernel accumulates in the weight's dtype.
    Whether that extra memory buys enough accuracy is for the GPU benchmark to decide.
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
        self.weight = torch.empty(weight.shape, dtype=dtype, device=weight.device) if needs[1] else None
        self.weight_written = False  # host-side: has a chunk written self.weight yet
        self.bias = torch.zeros(bias.shape, dtype=dtype, device=bias.device) if needs[2] and bias is not None else None

    def _store_rows(self, start: int, end: int, rows: Tensor) -> None:
        self.hidden[start:end] = rows

    def add_chunk(self, start: int, grad_logits: Tensor, hidden_chunk: Tensor, weight: Tensor) -> None:
        """Consume one chunk's d loss / d logits: the two backward GEMMs (and the bias sum)."""
        if self.needs[0]:
            self.place_hidden(start, start + grad_logits.shape[0], grad_logits @ weight.to(grad_logits.dtype))
        if self.weight is not None:
            matmul_into_(
                self.weight, grad_logits.t(), hidden_chunk.to(grad_logits.dtype), accumulate=self.weight_written
            )
            self.weight_written = True
        if self.bias is not None:
            self.bias += grad_logits.to(self.bias.dtype).sum(0)

    def result(self, weight: Tensor, bias: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        if self.weight is not None and not self.weight_written:  # no token reached the head
            self.weight.zero_()
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

    Never materializes the (tokens x V) logits: the head runs over row chunks (up to 4096
    rows on CUDA, 1024 on CPU, fewer when a chunk's logits would outgrow the fp32 weight
    gradient; see ``default_chunk_rows``), so extra memory is bounded as tokens grow.
    Pass only the rows that need a log-prob (completion tokens): every row costs a
    vocab-sized GEMM row.

    Args:
        hidden: (M, H) or (B, T, H) final hidden states (fp32/bf16/fp16).
        weight: (V, H) lm-head weight (a DTensor shard is gathered; tied embeddings work).
        targets: (M,) or (B, T) integer token ids in [0, V).
        bias: optional (V,) bias.
        temperature: logits are divided by it (the sampling temperature).
        return_entropy: also return the entropy of each row's distribution.
        chunk_rows: rows per chunk (default: ``default_chunk_rows`` of the shape, dtype and device).

    Returns:
        (logp, entropy): fp32 tensors of targets' shape; entropy is None unless asked.
        Differentiable w.r.t. hidden, weight and bias (weight gradient accumulated in
        fp32 across chunks, returned in weight's dtype).
    """
    weight = full_weight(weight)
    check_head_inputs(hidden, weight, targets, bias, temperature)
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    rows = chunk_rows or default_chunk_rows(
        flat_hidden.shape[0], weight.shape[1], flat_hidden.dtype, flat_hidden.device
    )
    logp, _, entropy = torch.ops.medgrpo.linear_logprob_forward(
        flat_hidden, weight, targets.reshape(-1), bias, float(temperature), int(rows), bool(return_entropy)
    )
    shape = targets.shape
    return logp.view(shape), (entropy.view(shape) if return_entropy else None)
