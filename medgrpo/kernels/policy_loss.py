"""Triton kernels of the clipped policy loss (GRPO / BNPO / Dr. GRPO / DAPO, token or GSPO IS).

Forward is two launches: one program per sequence streams its tokens once (twice for
sequence-level importance sampling) and writes six partial sums of the row; a
single-program finalize turns them into the loss, the metrics and the per-row weight
that the loss type gives each row's token sum. Backward is one launch, one program per
row, reading the saved per-row weight. All of it stays on device.

Per-row partial sums (columns of the (B, 8) buffer): masked loss, tokens, KL, tokens
clipped low, clipped high, dual-clipped.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from medgrpo.kernels._interpreter import INTERPRETED

# Mode codes (loss type, KL estimator) are PolicyLossConfig.modes() of medgrpo/ops/policy_loss.py.
PARTIALS = 8
MAX_BLOCK_T = 1024
MAX_BLOCK_B = 1024


@triton.jit
def _load_row(
    logp_ptr,
    old_ptr,
    ref_ptr,
    adv_ptr,
    mask_ptr,
    row,
    cols,
    T,
    adv_stride_b,
    adv_stride_t,
    HAS_OLD: tl.constexpr,
    HAS_REF: tl.constexpr,
):
    """One block of a row: log-probs, log-ratio (0 off the mask), ref, advantages, mask weight."""
    inb = cols < T
    offsets = row * T + cols
    weight = tl.load(mask_ptr + offsets, mask=inb, other=0).to(tl.float32)
    active = weight != 0
    logp = tl.load(logp_ptr + offsets, mask=inb, other=0.0).to(tl.float32)
    if HAS_OLD:
        old = tl.load(old_ptr + offsets, mask=inb, other=0.0).to(tl.float32)
    else:
        old = logp  # on-policy: ratio exp(logp - logp.detach()) = 1, gradient flows through logp
    log_ratio = tl.where(active, logp - old, 0.0)
    ref = logp
    if HAS_REF:
        ref = tl.load(ref_ptr + offsets, mask=inb, other=0.0).to(tl.float32)
    adv = tl.load(adv_ptr + row * adv_stride_b + cols * adv_stride_t, mask=inb, other=0.0).to(tl.float32)
    return logp, log_ratio, ref, adv, weight, active


@triton.jit
def _sequence_log_ratio(
    logp_ptr,
    old_ptr,
    ref_ptr,
    adv_ptr,
    mask_ptr,
    row,
    T,
    adv_stride_b,
    adv_stride_t,
    HAS_OLD: tl.constexpr,
    HAS_REF: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """GSPO: masked mean log-ratio of the row, and the row's token count."""
    total = tl.zeros([BLOCK_T], dtype=tl.float32)
    tokens = tl.zeros([BLOCK_T], dtype=tl.float32)
    for start in range(0, T, BLOCK_T):
        cols = start + tl.arange(0, BLOCK_T)
        logp, log_ratio, ref, adv, weight, active = _load_row(
            logp_ptr, old_ptr, ref_ptr, adv_ptr, mask_ptr, row, cols, T, adv_stride_b, adv_stride_t, HAS_OLD, HAS_REF
        )
        total += log_ratio * weight
        tokens += weight
    n = tl.sum(tokens, axis=0)
    return tl.sum(total, axis=0) / tl.maximum(n, 1.0), n


@triton.jit
def _kl(logp, ref, KL_ESTIMATOR: tl.constexpr):
    """Per-token KL(pi || ref) estimate and its derivative in logp."""
    delta = ref - logp
    if KL_ESTIMATOR == 1:
        return -delta, tl.full(delta.shape, 1.0, tl.float32)
    elif KL_ESTIMATOR == 2:
        return 0.5 * delta * delta, -delta
    else:
        e = tl.exp(delta)
        return e - delta - 1.0, 1.0 - e


@triton.jit
def _clip_state(ratio, adv, eps_low, eps_high, dual_clip):
    """Surrogate loss per token and which clip (if any) cut its gradient."""
    clipped = tl.minimum(tl.maximum(ratio, 1.0 - eps_low), 1.0 + eps_high)
    loss = tl.maximum(-adv * ratio, -adv * clipped)
    use_dual = (dual_clip > 0) & (adv < 0)
    loss = tl.where(use_dual, tl.minimum(loss, -adv * dual_clip), loss)
    low = (ratio < 1.0 - eps_low) & (adv < 0)
    high = (ratio > 1.0 + eps_high) & (adv > 0)
    dual = use_dual & (ratio > dual_clip)
    return loss, low, high, dual


@triton.jit(do_not_specialize=["T", "adv_stride_b", "adv_stride_t"])
def _policy_loss_rows_kernel(
    logp_ptr,
    old_ptr,
    ref_ptr,
    adv_ptr,
    mask_ptr,
    partial_ptr,
    T,
    adv_stride_b,
    adv_stride_t,
    eps_low,
    eps_high,
    beta,
    dual_clip,
    HAS_OLD: tl.constexpr,
    HAS_REF: tl.constexpr,
    KL_ESTIMATOR: tl.constexpr,
    SEQUENCE_IS: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    seq_log_ratio = 0.0
    if SEQUENCE_IS:
        seq_log_ratio, seq_tokens = _sequence_log_ratio(
            logp_ptr, old_ptr, ref_ptr, adv_ptr, mask_ptr, row, T, adv_stride_b, adv_stride_t, HAS_OLD, HAS_REF, BLOCK_T
        )
    loss_sum = tl.zeros([BLOCK_T], dtype=tl.float32)
    tokens = tl.zeros([BLOCK_T], dtype=tl.float32)
    kl_sum = tl.zeros([BLOCK_T], dtype=tl.float32)
    low_sum = tl.zeros([BLOCK_T], dtype=tl.float32)
    high_sum = tl.zeros([BLOCK_T], dtype=tl.float32)
    dual_sum = tl.zeros([BLOCK_T], dtype=tl.float32)
    for start in range(0, T, BLOCK_T):
        cols = start + tl.arange(0, BLOCK_T)
        logp, log_ratio, ref, adv, weight, active = _load_row(
            logp_ptr, old_ptr, ref_ptr, adv_ptr, mask_ptr, row, cols, T, adv_stride_b, adv_stride_t, HAS_OLD, HAS_REF
        )
        if SEQUENCE_IS:
            log_ratio = tl.zeros([BLOCK_T], dtype=tl.float32) + seq_log_ratio
        loss, low, high, dual = _clip_state(tl.exp(log_ratio), adv, eps_low, eps_high, dual_clip)
        if HAS_REF:
            kl, kl_grad = _kl(logp, ref, KL_ESTIMATOR)
            # beta == 0 must not turn an infinite KL into NaN (0 * inf): select, don't multiply.
            loss = tl.where(beta != 0, loss + beta * kl, loss)
            kl_sum += tl.where(active, kl * weight, 0.0)
        loss_sum += tl.where(active, loss * weight, 0.0)
        tokens += weight
        low_sum += tl.where(active & low, weight, 0.0)
        high_sum += tl.where(active & high, weight, 0.0)
        dual_sum += tl.where(active & dual, weight, 0.0)
    out = partial_ptr + row * 8
    tl.store(out + 0, tl.sum(loss_sum, axis=0))
    tl.store(out + 1, tl.sum(tokens, axis=0))
    tl.store(out + 2, tl.sum(kl_sum, axis=0))
    tl.store(out + 3, tl.sum(low_sum, axis=0))
    tl.store(out + 4, tl.sum(high_sum, axis=0))
    tl.store(out + 5, tl.sum(dual_sum, axis=0))


@triton.jit(do_not_specialize=["B"])
def _policy_loss_finalize_kernel(
    partial_ptr,
    num_items_ptr,
    loss_ptr,
    metrics_ptr,
    row_weight_ptr,
    B,
    num_items_value,
    max_completion_length,
    LOSS_TYPE: tl.constexpr,
    HAS_NUM_ITEMS: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    sums = tl.zeros([8], dtype=tl.float32)
    columns = tl.arange(0, 8)
    for start in range(0, B, BLOCK_B):
        rows = start + tl.arange(0, BLOCK_B)
        written = (rows[:, None] < B) & (columns[None, :] < 6)  # columns 6, 7 are padding, never written
        block = tl.load(partial_ptr + rows[:, None] * 8 + columns[None, :], mask=written, other=0.0)
        sums += tl.sum(block, axis=0)
    tokens = tl.sum(tl.where(columns == 1, sums, 0.0), axis=0)
    denom = tl.maximum(tokens, 1.0)
    batch = B.to(tl.float32)
    if HAS_NUM_ITEMS:
        items = tl.load(num_items_ptr).to(tl.float32)
    else:
        items = tl.where(num_items_value >= 0, num_items_value, tokens)
    loss = tl.zeros([BLOCK_B], dtype=tl.float32)
    for start in range(0, B, BLOCK_B):
        rows = start + tl.arange(0, BLOCK_B)
        inb = rows < B
        row_loss = tl.load(partial_ptr + rows * 8, mask=inb, other=0.0)
        row_tokens = tl.load(partial_ptr + rows * 8 + 1, mask=inb, other=0.0)
        if LOSS_TYPE == 0:
            weight = 1.0 / (batch * tl.maximum(row_tokens, 1.0))
        elif LOSS_TYPE == 1:
            weight = tl.zeros([BLOCK_B], dtype=tl.float32) + 1.0 / denom
        elif LOSS_TYPE == 2:
            weight = tl.zeros([BLOCK_B], dtype=tl.float32) + 1.0 / (batch * max_completion_length)
        else:
            weight = tl.zeros([BLOCK_B], dtype=tl.float32) + 1.0 / tl.maximum(items, 1.0)
        tl.store(row_weight_ptr + rows, weight, mask=inb)
        loss += tl.where(inb, weight * row_loss, 0.0)
    tl.store(loss_ptr, tl.sum(loss, axis=0))
    # metrics: kl, clip low, clip high, clip region, dual clip, tokens
    low = tl.sum(tl.where(columns == 3, sums, 0.0), axis=0)
    high = tl.sum(tl.where(columns == 4, sums, 0.0), axis=0)
    tl.store(metrics_ptr + 0, tl.sum(tl.where(columns == 2, sums, 0.0), axis=0) / denom)
    tl.store(metrics_ptr + 1, low / denom)
    tl.store(metrics_ptr + 2, high / denom)
    tl.store(metrics_ptr + 3, (low + high) / denom)
    tl.store(metrics_ptr + 4, tl.sum(tl.where(columns == 5, sums, 0.0), axis=0) / denom)
    tl.store(metrics_ptr + 5, tokens)


@triton.jit
def _sequence_gradient_factor(
    logp_ptr,
    old_ptr,
    ref_ptr,
    adv_ptr,
    mask_ptr,
    row,
    T,
    adv_stride_b,
    adv_stride_t,
    eps_low,
    eps_high,
    dual_clip,
    HAS_OLD: tl.constexpr,
    HAS_REF: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """GSPO: d loss / d logp_t = factor * w_t, factor = ratio / n * sum_t' w_t' d loss_t' / d ratio (one extra pass)."""
    seq_log_ratio, seq_tokens = _sequence_log_ratio(
        logp_ptr, old_ptr, ref_ptr, adv_ptr, mask_ptr, row, T, adv_stride_b, adv_stride_t, HAS_OLD, HAS_REF, BLOCK_T
    )
    seq_ratio = tl.exp(seq_log_ratio)
    dratio = tl.zeros([BLOCK_T], dtype=tl.float32)
    for start in range(0, T, BLOCK_T):
        cols = start + tl.arange(0, BLOCK_T)
        logp, log_ratio, ref, adv, weight, active = _load_row(
            logp_ptr, old_ptr, ref_ptr, adv_ptr, mask_ptr, row, cols, T, adv_stride_b, adv_stride_t, HAS_OLD, HAS_REF
        )
        token_ratio = tl.zeros([BLOCK_T], dtype=tl.float32) + seq_ratio
        surrogate, low, high, dual = _clip_state(token_ratio, adv, eps_low, eps_high, dual_clip)
        dratio += tl.where(active & ~(low | high | dual), -adv * weight, 0.0)
    return seq_ratio * tl.sum(dratio, axis=0) / tl.maximum(seq_tokens, 1.0)


@triton.jit(do_not_specialize=["T", "adv_stride_b", "adv_stride_t"])
def _policy_loss_backward_kernel(
    grad_loss_ptr,
    logp_ptr,
    old_ptr,
    ref_ptr,
    adv_ptr,
    mask_ptr,
    row_weight_ptr,
    grad_ptr,
    T,
    adv_stride_b,
    adv_stride_t,
    eps_low,
    eps_high,
    beta,
    dual_clip,
    HAS_OLD: tl.constexpr,
    HAS_REF: tl.constexpr,
    KL_ESTIMATOR: tl.constexpr,
    SEQUENCE_IS: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    scale = tl.load(grad_loss_ptr).to(tl.float32) * tl.load(row_weight_ptr + row)
    seq_factor = 0.0
    if SEQUENCE_IS:
        seq_factor = _sequence_gradient_factor(
            logp_ptr,
            old_ptr,
            ref_ptr,
            adv_ptr,
            mask_ptr,
            row,
            T,
            adv_stride_b,
            adv_stride_t,
            eps_low,
            eps_high,
            dual_clip,
            HAS_OLD,
            HAS_REF,
            BLOCK_T,
        )
    for start in range(0, T, BLOCK_T):
        cols = start + tl.arange(0, BLOCK_T)
        logp, log_ratio, ref, adv, weight, active = _load_row(
            logp_ptr, old_ptr, ref_ptr, adv_ptr, mask_ptr, row, cols, T, adv_stride_b, adv_stride_t, HAS_OLD, HAS_REF
        )
        if SEQUENCE_IS:
            grad = seq_factor * weight
        else:
            ratio = tl.exp(log_ratio)
            surrogate, low, high, dual = _clip_state(ratio, adv, eps_low, eps_high, dual_clip)
            grad = tl.where(low | high | dual, 0.0, -adv * ratio) * weight
        if HAS_REF:
            kl, kl_grad = _kl(logp, ref, KL_ESTIMATOR)
            grad += tl.where(beta != 0, beta * kl_grad * weight, 0.0)
        grad = tl.where(active, grad * scale, 0.0)
        tl.store(grad_ptr + row * T + cols, grad.to(grad_ptr.dtype.element_ty), mask=cols < T)


def _row_args(logp, advantages, mask, old_logp, ref_logp):
    logp, mask = logp.contiguous(), mask.contiguous()
    if mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)
    advantages = advantages.contiguous()
    adv_strides = (1, 0) if advantages.dim() == 1 else (advantages.shape[1], 1)
    old = old_logp.contiguous() if old_logp is not None else logp
    ref = ref_logp.contiguous() if ref_logp is not None else logp
    return logp, advantages, mask, old, ref, adv_strides


def _block_t(T: int) -> int:
    return min(max(triton.next_power_of_2(max(T, 1)), 16), MAX_BLOCK_T)


def policy_loss_forward(logp, advantages, mask, old_logp, ref_logp, num_items, hparams, modes):
    """Launch: see medgrpo.ops.policy_loss. Returns (loss, metrics (6,), row_weight (B,)), fp32."""
    eps_low, eps_high, beta, dual_clip, num_items_value, max_completion_length = hparams
    loss_type, kl_estimator, sequence_is = modes
    B, T = logp.shape
    logp, advantages, mask, old, ref, (adv_sb, adv_st) = _row_args(logp, advantages, mask, old_logp, ref_logp)
    device = logp.device
    partial = torch.empty((B, PARTIALS), dtype=torch.float32, device=device)
    loss = torch.empty((), dtype=torch.float32, device=device)
    metrics = torch.empty(6, dtype=torch.float32, device=device)
    row_weight = torch.empty(B, dtype=torch.float32, device=device)
    if B > 0:
        _policy_loss_rows_kernel[(B,)](
            logp,
            old,
            ref,
            advantages,
            mask,
            partial,
            T,
            adv_sb,
            adv_st,
            float(eps_low),
            float(eps_high),
            float(beta),
            float(dual_clip),
            HAS_OLD=old_logp is not None,
            HAS_REF=ref_logp is not None,
            KL_ESTIMATOR=int(kl_estimator),
            SEQUENCE_IS=bool(sequence_is),
            BLOCK_T=_block_t(T),
            num_warps=4,
        )
    _policy_loss_finalize_kernel[(1,)](
        partial,
        num_items if num_items is not None else partial,
        loss,
        metrics,
        row_weight,
        B,
        float(num_items_value),
        float(max_completion_length),
        LOSS_TYPE=int(loss_type),
        HAS_NUM_ITEMS=num_items is not None,
        BLOCK_B=min(max(triton.next_power_of_2(max(B, 1)), 16), MAX_BLOCK_B),
        num_warps=4,
    )
    return loss, metrics, row_weight


def policy_loss_backward(grad_loss, logp, advantages, mask, old_logp, ref_logp, row_weight, hparams, modes):
    """Launch: gradient of the loss w.r.t. logp, in logp's dtype."""
    eps_low, eps_high, beta, dual_clip = hparams[:4]
    _, kl_estimator, sequence_is = modes
    B, T = logp.shape
    logp, advantages, mask, old, ref, (adv_sb, adv_st) = _row_args(logp, advantages, mask, old_logp, ref_logp)
    round_in_torch = INTERPRETED and logp.dtype == torch.bfloat16
    grad = torch.empty(logp.shape, dtype=torch.float32 if round_in_torch else logp.dtype, device=logp.device)
    if B > 0 and T > 0:
        _policy_loss_backward_kernel[(B,)](
            grad_loss.contiguous(),
            logp,
            old,
            ref,
            advantages,
            mask,
            row_weight.contiguous(),
            grad,
            T,
            adv_sb,
            adv_st,
            float(eps_low),
            float(eps_high),
            float(beta),
            float(dual_clip),
            HAS_OLD=old_logp is not None,
            HAS_REF=ref_logp is not None,
            KL_ESTIMATOR=int(kl_estimator),
            SEQUENCE_IS=bool(sequence_is),
            BLOCK_T=_block_t(T),
            num_warps=4,
        )
    return grad.to(logp.dtype)
