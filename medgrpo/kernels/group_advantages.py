"""Triton kernels: reward normalization + group-relative advantages in ONE launch.

Both kernels run as a single program that loops over the batch. A GRPO batch is
small (N = prompts x G, a few thousand rewards), so one CTA finishes it in a few
microseconds, and one program needs no grid-wide synchronization for the batch std or
for arbitrary group ids. Nothing is read back to the host.

* contiguous groups (member i belongs to group i // group_size): each loop step loads a
  [groups x G] tile and reduces along G, deterministic, no atomics;
* arbitrary ``group_ids``: per-group sums are scattered with atomics into scratch that
  the kernel zeroes itself, phases separated by CTA barriers. Ids must lie in [0, N)
  (a member whose id does not is left out, like a NaN reward). fp32 atomics make the
  last bit of a group sum depend on arrival order; contiguous groups are bit-exact.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from medgrpo.kernels.normalize_rewards import normalized_reward

BLOCK_N = 1024


def _num_warps(tile: int) -> int:
    """Warps for one program over a ``tile``-element block: 4, up to 16 for 2048+ (no register spills on sm_90)."""
    return min(max(tile // 128, 4), 16)


@triton.jit
def _load_rewards(rewards_ptr, keys_ptr, stats_ptr, offsets, inb, num_keys, k, NORMALIZE: tl.constexpr):
    """Rewards as used for advantages (normalized when NORMALIZE); NaN outside the batch."""
    r = tl.load(rewards_ptr + offsets, mask=inb, other=float("nan")).to(tl.float32)
    if NORMALIZE:
        key = tl.load(keys_ptr + offsets, mask=inb, other=0)
        r = normalized_reward(r, key, inb, stats_ptr, num_keys, k)
    return r


@triton.jit
def _batch_std(rewards_ptr, keys_ptr, stats_ptr, n, num_keys, k, NORMALIZE: tl.constexpr, BLOCK: tl.constexpr):
    """Bessel std over every non-NaN reward of the batch (two passes: mean, then squares)."""
    total = tl.zeros([BLOCK], dtype=tl.float32)
    count = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n, BLOCK):
        offsets = start + tl.arange(0, BLOCK)
        r = _load_rewards(rewards_ptr, keys_ptr, stats_ptr, offsets, offsets < n, num_keys, k, NORMALIZE)
        valid = r == r
        total += tl.where(valid, r, 0.0)
        count += valid.to(tl.float32)
    n_valid = tl.sum(count, axis=0)
    mean = tl.sum(total, axis=0) / tl.maximum(n_valid, 1.0)
    squares = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n, BLOCK):
        offsets = start + tl.arange(0, BLOCK)
        r = _load_rewards(rewards_ptr, keys_ptr, stats_ptr, offsets, offsets < n, num_keys, k, NORMALIZE)
        squares += tl.where(r == r, (r - mean) * (r - mean), 0.0)
    variance = tl.sum(squares, axis=0) / tl.maximum(n_valid - 1.0, 1.0)
    return tl.where(n_valid >= 2, tl.sqrt(variance), 0.0)


@triton.jit
def _advantage(deviation, valid, std, batch_std, eps, SCALE: tl.constexpr):
    zeros = tl.zeros(deviation.shape, tl.float32)  # broadcast every choice to the tile
    if SCALE == 0:
        denom = zeros + std + eps
    elif SCALE == 1:
        denom = zeros + batch_std + eps
    else:
        denom = zeros + 1.0
    ok = valid & (denom > 0)
    return tl.where(ok, deviation / tl.where(ok, denom, 1.0), 0.0)


@triton.jit(do_not_specialize=["n", "group_size", "num_groups", "num_keys"])
def _group_advantages_contiguous_kernel(
    rewards_ptr,
    keys_ptr,
    stats_ptr,
    adv_ptr,
    used_ptr,
    mean_ptr,
    std_ptr,
    count_ptr,
    summary_ptr,
    n,
    group_size,
    num_groups,
    num_keys,
    k,
    eps,
    zero_std_atol,
    NORMALIZE: tl.constexpr,
    SCALE: tl.constexpr,
    BLOCK_GROUPS: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    batch_std = 0.0
    if SCALE == 1:
        batch_std = _batch_std(rewards_ptr, keys_ptr, stats_ptr, n, num_keys, k, NORMALIZE, BLOCK_GROUPS * BLOCK_G)
    zero_std = tl.zeros([BLOCK_GROUPS], dtype=tl.float32)
    nonempty = tl.zeros([BLOCK_GROUPS], dtype=tl.float32)
    invalid = tl.zeros([BLOCK_GROUPS], dtype=tl.float32)
    members = tl.arange(0, BLOCK_G)[None, :]
    for first in range(0, num_groups, BLOCK_GROUPS):
        groups = first + tl.arange(0, BLOCK_GROUPS)
        offsets = groups[:, None].to(tl.int64) * group_size + members
        inb = (groups[:, None] < num_groups) & (members < group_size)
        r = _load_rewards(rewards_ptr, keys_ptr, stats_ptr, offsets, inb, num_keys, k, NORMALIZE)
        valid = r == r
        count = tl.sum(valid.to(tl.float32), axis=1)
        mean = tl.sum(tl.where(valid, r, 0.0), axis=1) / tl.maximum(count, 1.0)
        deviation = tl.where(valid, r - mean[:, None], 0.0)
        sq = tl.sum(deviation * deviation, axis=1)
        std = tl.where(count >= 2, tl.sqrt(sq / tl.maximum(count - 1.0, 1.0)), 0.0)
        adv = _advantage(deviation, valid, std[:, None], batch_std, eps, SCALE)
        tl.store(adv_ptr + offsets, adv, mask=inb)
        tl.store(used_ptr + offsets, r, mask=inb)
        group_ok = groups < num_groups
        tl.store(mean_ptr + groups, tl.where(count >= 1, mean, 0.0), mask=group_ok)
        tl.store(std_ptr + groups, std, mask=group_ok)
        tl.store(count_ptr + groups, count.to(tl.int32), mask=group_ok)
        has_members = group_ok & (count >= 1)
        nonempty += has_members.to(tl.float32)
        zero_std += (has_members & (std <= zero_std_atol)).to(tl.float32)
        invalid += tl.sum((inb & ~valid).to(tl.float32), axis=1)
    tl.store(summary_ptr, tl.sum(zero_std, axis=0) / tl.maximum(tl.sum(nonempty, axis=0), 1.0))
    tl.store(summary_ptr + 1, tl.sum(invalid, axis=0) / tl.maximum(n.to(tl.float32), 1.0))


@triton.jit
def _member_group(used_ptr, ids_ptr, sum_ptr, counts_ptr, offsets, n):
    """Used reward, membership, safe group index, group count and group mean of members."""
    inb = offsets < n
    gid = tl.load(ids_ptr + offsets, mask=inb, other=-1).to(tl.int64)
    r = tl.load(used_ptr + offsets, mask=inb, other=float("nan"), cache_modifier=".cg")
    member = inb & (gid >= 0) & (gid < n) & (r == r)
    safe = tl.where(member, gid, 0)
    count = tl.load(counts_ptr + safe, mask=member, other=0.0, cache_modifier=".cg")
    total = tl.load(sum_ptr + safe, mask=member, other=0.0, cache_modifier=".cg")
    return r, member, safe, count, total / tl.maximum(count, 1.0)


@triton.jit(do_not_specialize=["n", "num_keys"])
def _group_advantages_ids_kernel(
    rewards_ptr,
    ids_ptr,
    keys_ptr,
    stats_ptr,
    adv_ptr,
    used_ptr,
    mean_ptr,
    std_ptr,
    count_ptr,
    summary_ptr,
    scratch_ptr,
    n,
    num_keys,
    k,
    eps,
    zero_std_atol,
    NORMALIZE: tl.constexpr,
    SCALE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # Per-group slots (n of them): the mean output first accumulates the sum; scratch
    # holds the float count [0, n) and the sum of squared deviations [n, 2n). The kernel
    # zeroes them itself; scratch reads bypass L1 (.cg) so they see the atomics.
    sum_ptr = mean_ptr
    counts_ptr = scratch_ptr
    squares_ptr = scratch_ptr + n
    for start in range(0, n, BLOCK):
        offsets = start + tl.arange(0, BLOCK)
        inb = offsets < n
        tl.store(sum_ptr + offsets, 0.0, mask=inb)
        tl.store(counts_ptr + offsets, 0.0, mask=inb)
        tl.store(squares_ptr + offsets, 0.0, mask=inb)
    tl.debug_barrier()
    # phase 1: normalize, scatter per-group sums and counts
    for start in range(0, n, BLOCK):
        offsets = start + tl.arange(0, BLOCK)
        inb = offsets < n
        gid = tl.load(ids_ptr + offsets, mask=inb, other=-1).to(tl.int64)
        r = _load_rewards(rewards_ptr, keys_ptr, stats_ptr, offsets, inb, num_keys, k, NORMALIZE)
        member = inb & (gid >= 0) & (gid < n) & (r == r)
        tl.store(used_ptr + offsets, r, mask=inb)
        tl.atomic_add(sum_ptr + gid, tl.where(member, r, 0.0), mask=member)
        tl.atomic_add(counts_ptr + gid, tl.where(member, 1.0, 0.0), mask=member)
    tl.debug_barrier()
    # phase 2: squared deviations from each group's mean
    for start in range(0, n, BLOCK):
        offsets = start + tl.arange(0, BLOCK)
        r, member, safe, count, mean = _member_group(used_ptr, ids_ptr, sum_ptr, counts_ptr, offsets, n)
        deviation = r - mean
        tl.atomic_add(squares_ptr + safe, deviation * deviation, mask=member)
    tl.debug_barrier()
    batch_std = 0.0
    if SCALE == 1:
        batch_std = _batch_std(rewards_ptr, keys_ptr, stats_ptr, n, num_keys, k, NORMALIZE, BLOCK)
    # phase 3: advantages of every member
    for start in range(0, n, BLOCK):
        offsets = start + tl.arange(0, BLOCK)
        r, member, safe, count, mean = _member_group(used_ptr, ids_ptr, sum_ptr, counts_ptr, offsets, n)
        sq = tl.load(squares_ptr + safe, mask=member, other=0.0, cache_modifier=".cg")
        std = tl.where(count >= 2, tl.sqrt(sq / tl.maximum(count - 1.0, 1.0)), 0.0)
        deviation = tl.where(member, r - mean, 0.0)
        adv = _advantage(deviation, member, std, batch_std, eps, SCALE)
        tl.store(adv_ptr + offsets, adv, mask=offsets < n)
    tl.debug_barrier()
    # phase 4: per-group outputs, slot by slot (each slot read and rewritten by one thread)
    zero_std = tl.zeros([BLOCK], dtype=tl.float32)
    nonempty = tl.zeros([BLOCK], dtype=tl.float32)
    members = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n, BLOCK):
        offsets = start + tl.arange(0, BLOCK)
        inb = offsets < n
        count = tl.load(counts_ptr + offsets, mask=inb, other=0.0, cache_modifier=".cg")
        total = tl.load(sum_ptr + offsets, mask=inb, other=0.0, cache_modifier=".cg")
        sq = tl.load(squares_ptr + offsets, mask=inb, other=0.0, cache_modifier=".cg")
        std = tl.where(count >= 2, tl.sqrt(sq / tl.maximum(count - 1.0, 1.0)), 0.0)
        tl.store(mean_ptr + offsets, tl.where(count >= 1, total / tl.maximum(count, 1.0), 0.0), mask=inb)
        tl.store(std_ptr + offsets, std, mask=inb)
        tl.store(count_ptr + offsets, count.to(tl.int32), mask=inb)
        has_members = inb & (count >= 1)
        nonempty += has_members.to(tl.float32)
        zero_std += (has_members & (std <= zero_std_atol)).to(tl.float32)
        members += count
    n_float = n.to(tl.float32)
    tl.store(summary_ptr, tl.sum(zero_std, axis=0) / tl.maximum(tl.sum(nonempty, axis=0), 1.0))
    tl.store(summary_ptr + 1, (n_float - tl.sum(members, axis=0)) / tl.maximum(n_float, 1.0))


def group_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor | None,
    group_size: int,
    keys: torch.Tensor | None,
    stats: torch.Tensor | None,
    k: float,
    scale: int,
    eps: float,
    zero_std_atol: float,
) -> tuple[torch.Tensor, ...]:
    """Launch: see medgrpo.ops.group_advantages. Returns the op's 6 output tensors (fp32).

    ``zero_std_atol``: a group whose std is at most this counts as zero-std (the op passes
    ``medgrpo.ops.reference.ZERO_STD_ATOL``, TRL's ``isclose(std, 0)``).
    """
    n = rewards.shape[0]
    device = rewards.device
    rewards = rewards.contiguous()
    normalize = keys is not None
    keys_arg = keys.contiguous() if normalize else rewards
    stats_arg = stats.contiguous() if normalize else rewards
    num_keys = stats.shape[0] if normalize else 0
    num_groups = n // group_size if group_size > 0 else n
    f32 = dict(dtype=torch.float32, device=device)
    advantages, used = torch.empty(n, **f32), torch.empty(n, **f32)
    mean, std = torch.empty(num_groups, **f32), torch.empty(num_groups, **f32)
    count = torch.empty(num_groups, dtype=torch.int32, device=device)
    summary = torch.empty(2, **f32)
    if group_size > 0:
        block_g = max(triton.next_power_of_2(group_size), 1)
        block_groups = max(min(BLOCK_N // block_g, triton.next_power_of_2(max(num_groups, 1))), 1)
        _group_advantages_contiguous_kernel[(1,)](
            rewards,
            keys_arg,
            stats_arg,
            advantages,
            used,
            mean,
            std,
            count,
            summary,
            n,
            group_size,
            num_groups,
            num_keys,
            float(k),
            float(eps),
            zero_std_atol,
            NORMALIZE=normalize,
            SCALE=scale,
            BLOCK_GROUPS=block_groups,
            BLOCK_G=block_g,
            num_warps=_num_warps(block_groups * block_g),
        )
    else:
        block = min(BLOCK_N, max(triton.next_power_of_2(max(n, 1)), 16))
        _group_advantages_ids_kernel[(1,)](
            rewards,
            group_ids.contiguous(),
            keys_arg,
            stats_arg,
            advantages,
            used,
            mean,
            std,
            count,
            summary,
            torch.empty(2 * n, **f32),
            n,
            num_keys,
            float(k),
            float(eps),
            zero_std_atol,
            NORMALIZE=normalize,
            SCALE=scale,
            BLOCK=block,
            num_warps=_num_warps(block),
        )
    return advantages, used, mean, std, count, summary
