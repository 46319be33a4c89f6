"""Triton kernel of the cross-dataset reward normalization (sigmoid of the IQR-scaled reward)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_N = 1024


@triton.jit
def normalized_reward(r, key, inb, stats_ptr, num_keys, k):
    """sigmoid(k (r - p50) / IQR) of each reward, its key's (p25, p50, p75) row gathered.

    Degenerate IQR (<= 0): the IQR -> 0+ limit (step 0 / 0.5 / 1) keeps it finite.
    NaN rewards and keys outside [0, num_keys) give NaN.
    """
    key_ok = inb & (key >= 0) & (key < num_keys)
    row = tl.where(key_ok, key, 0).to(tl.int64) * 3
    p25 = tl.load(stats_ptr + row, mask=key_ok, other=0.0).to(tl.float32)
    p50 = tl.load(stats_ptr + row + 1, mask=key_ok, other=0.0).to(tl.float32)
    p75 = tl.load(stats_ptr + row + 2, mask=key_ok, other=0.0).to(tl.float32)
    iqr = p75 - p25
    degenerate = ~(iqr > 0)
    z = k * (r - p50) / tl.where(degenerate, 1.0, iqr)
    smooth = 1.0 / (1.0 + tl.exp(-z))
    step = tl.where(r > p50, 1.0, tl.where(r < p50, 0.0, 0.5))
    out = tl.where(degenerate, step, smooth)
    return tl.where(key_ok & (r == r), out, float("nan"))


@triton.jit(do_not_specialize=["n", "num_keys"])
def _normalize_rewards_kernel(rewards_ptr, keys_ptr, stats_ptr, out_ptr, n, num_keys, k, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offsets < n
    r = tl.load(rewards_ptr + offsets, mask=inb, other=0.0).to(tl.float32)
    key = tl.load(keys_ptr + offsets, mask=inb, other=0)
    tl.store(out_ptr + offsets, normalized_reward(r, key, inb, stats_ptr, num_keys, k), mask=inb)


def normalize_rewards(rewards: torch.Tensor, keys: torch.Tensor, stats: torch.Tensor, k: float) -> torch.Tensor:
    """Launch: (N,) rewards, (N,) int keys, (K, 3) stats -> (N,) fp32 normalized rewards."""
    rewards, keys, stats = rewards.contiguous(), keys.contiguous(), stats.contiguous()
    n = rewards.shape[0]
    out = torch.empty(n, dtype=torch.float32, device=rewards.device)
    if n == 0:
        return out
    grid = (triton.cdiv(n, BLOCK_N),)
    _normalize_rewards_kernel[grid](rewards, keys, stats, out, n, stats.shape[0], float(k), BLOCK=BLOCK_N)
    return out
