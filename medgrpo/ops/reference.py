"""The plain-PyTorch reference of every medgrpo op: the spec.

Every kernel (Triton in ``medgrpo/kernels``, C++ in ``csrc/``) is tested against these
functions, and the benchmarks time them as the eager baseline. Nobody writes a second
reference: tests and benchmarks import this module.

Conventions shared by all ops:

* Accumulation happens in fp32 (fp64 when the input is fp64, so ``gradcheck`` works).
* A reward of NaN means "unscorable"; it stays NaN through normalization and is
  excluded from every group statistic; its advantage is 0.
* Masked-out tokens contribute exactly 0, even if their log-probs are NaN/inf padding.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch
from torch import Tensor

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
KL_ESTIMATORS = ("k1", "k2", "k3")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
ADVANTAGE_SCALES = ("group", "batch", "none")
# TRL flags a group as zero-std with torch.isclose(std, 0), i.e. std <= 1e-8.
ZERO_STD_ATOL = 1e-8


class PolicyLossOutput(NamedTuple):
    """Loss and detached, device-side metrics of one policy-loss evaluation.

    ``kl`` is None without ``ref_logp``; ``clip_fraction_dual`` is None without
    ``dual_clip``; ``entropy`` is None unless the op computed it (fused lm-head with
    ``return_entropy=True``).
    Fractions are token-weighted over masked-in tokens.
    """

    loss: Tensor
    kl: Optional[Tensor]
    clip_fraction: Tensor
    clip_fraction_low: Tensor
    clip_fraction_high: Tensor
    clip_fraction_dual: Optional[Tensor]
    entropy: Optional[Tensor] = None


class GroupAdvantagesOutput(NamedTuple):
    """Advantages plus per-group statistics for logging, all on the input's device.

    ``rewards`` are the rewards the advantages were computed from (normalized when
    keys/stats were given). Group tensors have one slot per group: ``N // group_size``
    slots for contiguous groups, ``N`` slots (one per possible id) for ``group_ids``;
    unused slots have count 0. ``zero_std_fraction`` is over non-empty groups.
    """

    advantages: Tensor
    rewards: Tensor
    group_mean: Tensor
    group_std: Tensor
    group_count: Tensor
    zero_std_fraction: Tensor
    nan_fraction: Tensor


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 stays fp64 (for gradcheck); every other float dtype accumulates in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------------------
# normalize_rewards
# --------------------------------------------------------------------------------------
def normalize_rewards(rewards: Tensor, keys: Tensor, stats: Tensor, *, k: float = 3.0) -> Tensor:
    """``sigmoid(k * (r - p50) / (p75 - p25))`` with the (p25, p50, p75) row of each key.

    A degenerate key (IQR <= 0) takes the limit IQR -> 0+ of the same sigmoid: a step
    that maps rewards above the median to 1, below to 0 and the median itself to 0.5,
    so every key's median still maps to 0.5 and the output stays finite.
    A key outside ``[0, K)`` gives NaN (an unscorable reward), never a wrong row.
    """
    acc = accumulation_dtype(rewards.dtype)
    r = rewards.to(acc)
    num_keys = stats.shape[0]
    if num_keys == 0:
        return torch.full_like(r, float("nan"))
    key_valid = (keys >= 0) & (keys < num_keys)
    rows = stats.to(acc)[keys.long().clamp(0, num_keys - 1)]
    p25, p50, p75 = rows.unbind(-1)
    iqr = p75 - p25
    degenerate = ~(iqr > 0)
    smooth = torch.sigmoid(k * (r - p50) / torch.where(degenerate, torch.ones_like(iqr), iqr))
    step = torch.where(r > p50, 1.0, torch.where(r < p50, 0.0, 0.5)).to(acc)
    out = torch.where(degenerate, step, smooth)
    return torch.where(key_valid & ~torch.isnan(r), out, torch.full_like(out, float("nan")))


# --------------------------------------------------------------------------------------
# group_advantages
# --------------------------------------------------------------------------------------
def _group_index(n: int, group_size: Optional[int], group_ids: Optional[Tensor], device) -> tuple[Tensor, int]:
    if group_ids is not None:
        return group_ids.long(), n
    assert group_size is not None and group_size > 0
    return torch.arange(n, device=device) // group_size, n // group_size


def _masked_std(values: Tensor, valid: Tensor) -> Tensor:
    """Bessel-corrected std over the valid entries; 0 with fewer than two."""
    count = valid.sum()
    mean = torch.where(valid, values, 0).sum() / count.clamp(min=1)
    sq = torch.where(valid, values - mean, 0).square().sum()
    return torch.where(count >= 2, (sq / (count - 1).clamp(min=1)).sqrt(), torch.zeros_like(sq))


def group_advantages(
    rewards: Tensor,
    *,
    group_size: Optional[int] = None,
    group_ids: Optional[Tensor] = None,
    keys: Optional[Tensor] = None,
    stats: Optional[Tensor] = None,
    k: float = 3.0,
    scale: str = "group",
    eps: float = 1e-4,
) -> GroupAdvantagesOutput:
    """Group-relative advantages ``(r - mean_g) / (std_g + eps)`` (TRL / verl semantics).

    ``scale="batch"`` divides by the std of all (non-NaN) rewards, ``"none"`` does not
    divide (Dr. GRPO). std is Bessel-corrected; a group with fewer than two scorable
    members has std 0. NaN rewards get advantage 0 and are left out of every statistic.
    """
    acc = accumulation_dtype(rewards.dtype)
    r = rewards.to(acc)
    if keys is not None:
        r = normalize_rewards(r, keys, stats, k=k)
    n = r.shape[0]
    gid, num_groups = _group_index(n, group_size, group_ids, r.device)
    valid = ~torch.isnan(r)
    zeros = torch.zeros(num_groups, dtype=acc, device=r.device)
    count = zeros.index_add(0, gid, valid.to(acc))
    mean = zeros.index_add(0, gid, torch.where(valid, r, 0)) / count.clamp(min=1)
    deviation = torch.where(valid, r - mean[gid], 0)
    sq = zeros.index_add(0, gid, deviation.square())
    std = torch.where(count >= 2, (sq / (count - 1).clamp(min=1)).sqrt(), zeros)

    if scale == "group":
        denom = std[gid] + eps
    elif scale == "batch":
        denom = (_masked_std(r, valid) + eps).expand(n)
    else:
        denom = torch.ones_like(r)
    divisible = valid & (denom > 0)
    advantages = torch.where(divisible, deviation / torch.where(divisible, denom, 1), 0)

    nonempty = count >= 1
    zero_std = nonempty & (std <= ZERO_STD_ATOL)
    return GroupAdvantagesOutput(
        advantages=advantages,
        rewards=r,
        group_mean=torch.where(nonempty, mean, 0),
        group_std=std,
        group_count=count.to(torch.int32),
        zero_std_fraction=zero_std.sum().to(acc) / nonempty.sum().clamp(min=1).to(acc),
        nan_fraction=(~valid).sum().to(acc) / max(n, 1),
    )


# --------------------------------------------------------------------------------------
# policy_loss
# --------------------------------------------------------------------------------------
def kl_penalty(logp: Tensor, ref_logp: Tensor, estimator: str = "k3") -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) at tokens sampled from pi.

    k1 = logp - ref, k2 = (logp - ref)^2 / 2, k3 = exp(ref - logp) - (ref - logp) - 1
    (k3 is TRL's and Liger's estimator; unclamped, as they do).
    """
    delta = ref_logp - logp
    if estimator == "k1":
        return -delta
    if estimator == "k2":
        return 0.5 * delta.square()
    return torch.exp(delta) - delta - 1.0


class PerTokenPolicyLoss(NamedTuple):
    """Masked per-token loss (B, T) plus the masked indicator maps behind the metrics."""

    loss: Tensor
    kl: Optional[Tensor]
    clipped_low: Tensor
    clipped_high: Tensor
    clipped_dual: Tensor


def per_token_policy_loss(
    logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    old_logp: Optional[Tensor] = None,
    ref_logp: Optional[Tensor] = None,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    beta: float = 0.0,
    kl_estimator: str = "k3",
    importance_sampling: str = "token",
    dual_clip: Optional[float] = None,
) -> PerTokenPolicyLoss:
    """The clipped surrogate per token, already multiplied by the mask (differentiable in logp).

    ``-min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A)`` with
    ratio = exp(logp - old_logp) per token, or exp of the masked mean log-ratio of the
    row for ``importance_sampling="sequence"`` (GSPO). ``dual_clip`` = c > 1 further
    bounds the loss of negative-advantage tokens by ``-c * A`` (verl's clip_ratio_c).
    """
    acc = accumulation_dtype(logp.dtype)
    weight = mask.to(acc)
    active = mask != 0

    def on_mask(x: Tensor) -> Tensor:
        # Select (not multiply) so NaN/inf padding never reaches a value or a gradient.
        return torch.where(active, x.to(acc), 0)

    lp = on_mask(logp)
    old = lp.detach() if old_logp is None else on_mask(old_logp)
    adv = advantages.to(acc)
    adv = adv.unsqueeze(-1).expand_as(lp) if adv.dim() == 1 else adv

    log_ratio = lp - old
    if importance_sampling == "sequence":
        log_ratio = (log_ratio * weight).sum(-1, keepdim=True) / weight.sum(-1, keepdim=True).clamp(min=1.0)
    ratio = torch.exp(log_ratio).expand_as(lp)
    clipped_ratio = torch.clamp(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high)
    loss = torch.maximum(-adv * ratio, -adv * clipped_ratio)
    clipped_dual = torch.zeros_like(active)
    if dual_clip is not None:
        clipped_dual = (adv < 0) & (ratio > dual_clip)
        loss = torch.where(adv < 0, torch.minimum(loss, -adv * dual_clip), loss)

    kl = None
    if ref_logp is not None:
        kl = kl_penalty(lp, on_mask(ref_logp), kl_estimator)
        if beta != 0.0:
            loss = loss + beta * kl
        kl = torch.where(active, kl.detach() * weight, 0)

    def masked(x: Tensor) -> Tensor:
        return torch.where(active, x.to(acc) * weight, 0)

    return PerTokenPolicyLoss(
        loss=masked(loss),
        kl=kl,
        clipped_low=masked((ratio < 1.0 - epsilon_low) & (adv < 0)),
        clipped_high=masked((ratio > 1.0 + epsilon_high) & (adv > 0)),
        clipped_dual=masked(clipped_dual),
    )


def loss_row_weights(
    mask: Tensor,
    *,
    loss_type: str = "dapo",
    max_completion_length: Optional[int] = None,
    num_items: Union[Tensor, float, None] = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Weight (B,) by which each row's masked per-token loss sum enters the scalar loss.

    grpo: mean over rows of each row's token mean; bnpo: token mean over the batch;
    dr_grpo: sum / (B * max_completion_length); dapo: sum / num_items (default: the
    batch's masked token count), each denominator clamped at 1 like TRL and Liger.
    """
    acc = dtype
    weight = mask.to(acc)
    batch = weight.shape[0]
    row_tokens = weight.sum(-1)
    if loss_type == "grpo":
        return 1.0 / (batch * row_tokens.clamp(min=1.0))
    if loss_type == "bnpo":
        return (1.0 / weight.sum().clamp(min=1.0)).expand(batch)
    if loss_type == "dr_grpo":
        return torch.full((batch,), 1.0 / (batch * max_completion_length), dtype=acc, device=mask.device)
    if num_items is None:
        normalizer = weight.sum()
    elif isinstance(num_items, Tensor):
        normalizer = num_items.to(device=mask.device, dtype=acc)
    else:  # filled on the device: torch.as_tensor of a number copies it from the host, a sync on CUDA
        normalizer = torch.full((), num_items, dtype=acc, device=mask.device)
    return (1.0 / normalizer.clamp(min=1.0)).expand(batch)


def policy_loss(
    logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    old_logp: Optional[Tensor] = None,
    ref_logp: Optional[Tensor] = None,
    loss_type: str = "dapo",
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    beta: float = 0.0,
    kl_estimator: str = "k3",
    importance_sampling: str = "token",
    dual_clip: Optional[float] = None,
    max_completion_length: Optional[int] = None,
    num_items: Union[Tensor, float, None] = None,
) -> PolicyLossOutput:
    """Reference clipped policy loss; same semantics as medgrpo.policy_loss (see there)."""
    per_token = per_token_policy_loss(
        logp,
        advantages,
        mask,
        old_logp=old_logp,
        ref_logp=ref_logp,
        epsilon_low=epsilon_low,
        epsilon_high=epsilon_high,
        beta=beta,
        kl_estimator=kl_estimator,
        importance_sampling=importance_sampling,
        dual_clip=dual_clip,
    )
    weights = loss_row_weights(
        mask,
        loss_type=loss_type,
        max_completion_length=max_completion_length,
        num_items=num_items,
        dtype=per_token.loss.dtype,
    )
    loss = (per_token.loss.sum(-1) * weights).sum()
    tokens = mask.to(per_token.loss.dtype).sum().clamp(min=1.0)
    low = per_token.clipped_low.sum() / tokens
    high = per_token.clipped_high.sum() / tokens
    return PolicyLossOutput(
        loss=loss,
        kl=None if per_token.kl is None else per_token.kl.sum() / tokens,
        clip_fraction=low + high,
        clip_fraction_low=low,
        clip_fraction_high=high,
        clip_fraction_dual=None if dual_clip is None else per_token.clipped_dual.sum() / tokens,
    )


# --------------------------------------------------------------------------------------
# linear_logprob and fused_linear_policy_loss (the lm-head)
# --------------------------------------------------------------------------------------
def linear_logprob(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    bias: Optional[Tensor] = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
) -> tuple[Tensor, Optional[Tensor]]:
    """log softmax(hidden @ weight.T + bias) / temperature at ``targets``, with the full logits.

    The logits GEMM runs in the inputs' dtype (as the model's lm-head would); the softmax,
    log-probs and entropy in fp32 (fp64 for fp64). Returns fp32 (..., ) log-probs and the
    entropy of each row's distribution (None unless ``return_entropy``).
    """
    acc = accumulation_dtype(hidden.dtype)
    logits = torch.nn.functional.linear(hidden, weight, bias).to(acc) / temperature
    log_probs = torch.log_softmax(logits, dim=-1)
    logp = log_probs.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1) if return_entropy else None
    return logp, entropy


def fused_linear_policy_loss(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    mask: Tensor,
    advantages: Tensor,
    *,
    bias: Optional[Tensor] = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    **policy_loss_options,
) -> PolicyLossOutput:
    """policy_loss(linear_logprob(hidden, weight, targets), ...), with the masked mean entropy if asked."""
    logp, entropy = linear_logprob(
        hidden, weight, targets, bias=bias, temperature=temperature, return_entropy=return_entropy
    )
    out = policy_loss(logp, advantages, mask, **policy_loss_options)
    if entropy is None:
        return out
    weight_mask = mask.to(entropy.dtype)
    mean_entropy = torch.where(mask != 0, entropy.detach() * weight_mask, 0).sum() / weight_mask.sum().clamp(min=1)
    return out._replace(entropy=mean_entropy)


# --------------------------------------------------------------------------------------
# patchify (Qwen2.5-VL's video input layout)
# --------------------------------------------------------------------------------------
# The Hugging Face Qwen2-VL video processor's values (after its resize, do_resize=False).
PATCH_SIZE = 14
MERGE_SIZE = 2
TEMPORAL_PATCH_SIZE = 2
CHANNELS = 3
ROW_LEN = CHANNELS * TEMPORAL_PATCH_SIZE * PATCH_SIZE * PATCH_SIZE  # 1176
RESCALE_FACTOR = 1.0 / 255.0
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def patchify_grid(frames: Tensor) -> tuple[int, int, int]:
    """``(grid_t, grid_h, grid_w)`` of a ``(T, H, W, 3)`` uint8 clip: the clips the layout is defined for.

    Raises:
        TypeError: ``frames`` is not a tensor.
        ValueError: wrong dtype, rank or channel count, ``T`` not a positive even number, or ``H`` / ``W``
            not a positive multiple of ``patch_size * merge_size`` (28).
    """
    if not isinstance(frames, Tensor):
        raise TypeError(f"frames must be a torch.Tensor, got {type(frames).__name__}")
    if frames.dtype != torch.uint8:
        raise ValueError(f"frames must be uint8, got {frames.dtype}")
    if frames.dim() != 4:
        raise ValueError(f"frames must have shape (T, H, W, 3), got {tuple(frames.shape)}")
    t, h, w, c = frames.shape
    if c != CHANNELS:
        raise ValueError(f"frames must have {CHANNELS} channels in the last dim, got shape {tuple(frames.shape)}")
    if t <= 0 or t % TEMPORAL_PATCH_SIZE:
        raise ValueError(
            f"number of frames must be a positive multiple of {TEMPORAL_PATCH_SIZE} "
            f"(pad by repeating the last frame), got T={t}"
        )
    factor = PATCH_SIZE * MERGE_SIZE
    if h <= 0 or w <= 0 or h % factor or w % factor:
        raise ValueError(f"H and W must be positive multiples of {factor}, got H={h}, W={w}")
    return t // TEMPORAL_PATCH_SIZE, h // PATCH_SIZE, w // PATCH_SIZE


def patchify(frames: Tensor, *, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """Reshape / permute patchify of a ``(T, H, W, 3)`` uint8 clip.

    Normalization is computed in float32 as ``(x * (1 / 255) - mean) / std``. The normalized
    ``(T, C, H, W)`` clip is viewed as ``(grid_t, temporal_patch, C, grid_h / merge, merge, patch,
    grid_w / merge, merge, patch)`` and permuted to ``(grid_t, grid_h / merge, grid_w / merge, merge,
    merge, C, temporal_patch, patch, patch)``: each output row (1176 values) is one 2x14x14
    spatio-temporal patch, and the rows of each 2x2 merge window are consecutive.

    Returns:
        ``pixel_values`` of shape ``(grid_t * grid_h * grid_w, 1176)`` in ``dtype``, and ``grid_thw``,
        int64 ``[[grid_t, grid_h, grid_w]]``, both on the device of ``frames``.
    """
    grid_t, grid_h, grid_w = patchify_grid(frames)
    device = frames.device
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32, device=device).view(1, CHANNELS, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=torch.float32, device=device).view(1, CHANNELS, 1, 1)
    x = frames.permute(0, 3, 1, 2).to(torch.float32)  # (T, C, H, W)
    x = (x * RESCALE_FACTOR - mean) / std
    m, p, tp = MERGE_SIZE, PATCH_SIZE, TEMPORAL_PATCH_SIZE
    x = x.reshape(grid_t, tp, CHANNELS, grid_h // m, m, p, grid_w // m, m, p)
    # -> (grid_t, grid_h/m, grid_w/m, m_h, m_w, C, tp, p_h, p_w)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    pixel_values = x.reshape(grid_t * grid_h * grid_w, ROW_LEN).to(dtype)
    grid_thw = torch.tensor([[grid_t, grid_h, grid_w]], dtype=torch.int64, device=device)
    return pixel_values, grid_thw
