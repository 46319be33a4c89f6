"""Triton kernels of the lm-head log-prob path over one bounded chunk of logits.

The head is computed ``rows_per_chunk`` tokens at a time: a cuBLAS GEMM writes the
chunk's logits (rows x V, the only logits that ever exist), then these kernels, one
program per row, stream the row once for its online log-sum-exp, target logit (and,
when asked, entropy), and once more to overwrite the logits in place with d loss / d logits, which
the two backward GEMMs consume. Memory stays bounded by the chunk, whatever M is.

d/dz of log p_target = onehot - p; d/dz of the entropy H = -p (z - E_p[z]), with
z = logits / temperature and E_p[z] = lse - H.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from medgrpo.kernels._interpreter import INTERPRETED

MAX_BLOCK_V = 4096


@triton.jit
def _row_stats(logits_ptr, row, stride, V, inv_temperature, WITH_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr):
    """Online (max, sum exp[, sum exp * z]) of z = logits / T over the row, in fp32: (lse, entropy or 0)."""
    m = tl.full([BLOCK_V], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_V], dtype=tl.float32)
    t = tl.zeros([BLOCK_V], dtype=tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        z = tl.load(logits_ptr + row * stride + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        z = z * inv_temperature
        m_new = tl.maximum(m, z)
        # A lane that has seen only -inf (padding past V) subtracts 0, never -inf - -inf = NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        rescale = tl.exp(m - m_safe)
        e = tl.exp(z - m_safe)
        s = s * rescale + e
        if WITH_ENTROPY:
            t = t * rescale + e * tl.where(e > 0, z, 0.0)
        m = m_new
    m_row = tl.max(m, axis=0)
    scale = tl.exp(m - m_row)  # 0 for padding lanes (m = -inf); m_row is finite
    sum_exp = tl.sum(s * scale, axis=0)
    lse = m_row + tl.log(sum_exp)
    entropy = 0.0
    if WITH_ENTROPY:
        entropy = lse - tl.sum(t * scale, axis=0) / sum_exp
    return lse, entropy


@triton.jit(do_not_specialize=["V", "stride"])
def _logprob_forward_kernel(
    logits_ptr,
    targets_ptr,
    logp_ptr,
    lse_ptr,
    entropy_ptr,
    V,
    stride,
    inv_temperature,
    WITH_ENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    lse, entropy = _row_stats(logits_ptr, row, stride, V, inv_temperature, WITH_ENTROPY, BLOCK_V)
    target = tl.load(targets_ptr + row).to(tl.int64)
    z_target = tl.load(logits_ptr + row * stride + target).to(tl.float32) * inv_temperature
    tl.store(logp_ptr + row, z_target - lse)
    tl.store(lse_ptr + row, lse)
    tl.store(entropy_ptr + row, entropy)


@triton.jit(do_not_specialize=["V", "stride"])
def _logprob_backward_kernel(
    logits_ptr,
    targets_ptr,
    lse_ptr,
    entropy_ptr,
    grad_logp_ptr,
    grad_entropy_ptr,
    V,
    stride,
    inv_temperature,
    HAS_ENTROPY_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """Overwrite the row's logits with d loss / d logits (= d loss / dz / T)."""
    row = tl.program_id(0).to(tl.int64)
    lse = tl.load(lse_ptr + row)
    grad_logp = tl.load(grad_logp_ptr + row).to(tl.float32)
    grad_entropy = 0.0
    mean_z = 0.0
    if HAS_ENTROPY_GRAD:
        grad_entropy = tl.load(grad_entropy_ptr + row).to(tl.float32)
        mean_z = lse - tl.load(entropy_ptr + row)
    target = tl.load(targets_ptr + row).to(tl.int64)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        inb = cols < V
        z = tl.load(logits_ptr + row * stride + cols, mask=inb, other=float("-inf")).to(tl.float32) * inv_temperature
        p = tl.exp(z - lse)
        grad_z = tl.where(cols == target, grad_logp, 0.0) - grad_logp * p
        if HAS_ENTROPY_GRAD:
            grad_z -= grad_entropy * p * tl.where(p > 0, z - mean_z, 0.0)
        grad_z = tl.where(inb, grad_z * inv_temperature, 0.0)
        tl.store(logits_ptr + row * stride + cols, grad_z.to(logits_ptr.dtype.element_ty), mask=inb)


def _block_v(V: int) -> int:
    return min(max(triton.next_power_of_2(V), 16), MAX_BLOCK_V)


def logprob_forward(logits: torch.Tensor, targets: torch.Tensor, temperature: float, with_entropy: bool = True):
    """(rows, V) logits chunk -> fp32 (log-prob of target, log-sum-exp, entropy) per row.

    The entropy (one more FMA per logit in the same pass, and one more accumulator) is
    computed only ``with_entropy``; otherwise it is 0.
    """
    rows, V = logits.shape
    out = [torch.empty(rows, dtype=torch.float32, device=logits.device) for _ in range(3)]
    if rows:
        _logprob_forward_kernel[(rows,)](
            logits,
            targets,
            *out,
            V,
            logits.stride(0),
            1.0 / temperature,
            WITH_ENTROPY=bool(with_entropy),
            BLOCK_V=_block_v(V),
            num_warps=8,
        )
    return tuple(out)


def logprob_backward_(
    logits: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor,
    grad_logp: torch.Tensor,
    grad_entropy: torch.Tensor | None,
    temperature: float,
) -> torch.Tensor:
    """In place: the logits chunk becomes d loss / d logits (in its own dtype, for the GEMMs)."""
    rows, V = logits.shape
    if INTERPRETED and logits.dtype == torch.bfloat16:
        return logits.copy_(
            logprob_backward_(logits.float(), targets, lse, entropy, grad_logp, grad_entropy, temperature)
        )
    if rows:
        _logprob_backward_kernel[(rows,)](
            logits,
            targets,
            lse,
            entropy,
            grad_logp.contiguous(),
            grad_entropy.contiguous() if grad_entropy is not None else grad_logp,
            V,
            logits.stride(0),
            1.0 / temperature,
            HAS_ENTROPY_GRAD=grad_entropy is not None,
            BLOCK_V=_block_v(V),
            num_warps=8,
        )
    return logits
