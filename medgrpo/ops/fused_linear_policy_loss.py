"""fused_linear_policy_loss: lm-head + clipped policy loss as one op, logits never in full.

Only masked-in tokens (completions) go through the vocab GEMM: their rows are packed
first, which costs one host sync (the GEMM sizes must be known), and every chunk of
them is gathered from ``hidden`` when it is processed.

The loss gradient is computed during the forward and scaled by the incoming gradient
in backward, as Liger-Kernel does, so the head costs the three GEMMs of its floor:

* token-level importance sampling: d loss / d logp of a token depends only on that
  token and on per-row weights known from the mask, so each chunk is done in one pass:
  logits GEMM -> log-probs -> per-token policy gradient (the policy_loss backward
  kernel, one "row" per token) -> d loss / d logits in place -> the two backward GEMMs;
* sequence-level (GSPO): a token's gradient needs its whole row's ratio, so a first
  pass gets every log-prob (one GEMM), the policy loss backward runs on (B, T), and a
  second pass recomputes each chunk's logits for the gradient (a fourth GEMM).
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from medgrpo.ops import _library, reference
from medgrpo.ops.linear_logprob import (
    HeadGradients,
    check_head_inputs,
    chunk_kernels_for,
    chunk_logits,
    default_chunk_rows,
    full_weight,
    head_backward,
    head_forward,
)
from medgrpo.ops.policy_loss import (
    PolicyLossConfig,
    _check_inputs,
    output_from_metrics,
    resolve_num_items,
    split_num_items,
)
from medgrpo.ops.reference import PolicyLossOutput, accumulation_dtype


class PackedTokens:
    """Masked-in (row, column) positions of a (B, T) batch and per-token views of (B, T) data."""

    def __init__(self, mask: Tensor):
        self.rows, self.cols = (mask != 0).nonzero(as_tuple=True)  # the op's one host sync
        self.count = self.rows.shape[0]

    def take(self, values: Optional[Tensor], start: int = 0, end: Optional[int] = None) -> Optional[Tensor]:
        """values[row, col] (or values[row] for per-row values) of packed tokens [start, end)."""
        if values is None:
            return None
        rows, cols = self.rows[start:end], self.cols[start:end]
        return values[rows] if values.dim() == 1 else values[rows, cols]

    def scatter(self, packed: Tensor, shape: tuple[int, int]) -> Tensor:
        out = packed.new_zeros(shape)
        out[self.rows, self.cols] = packed
        return out


def _token_policy_gradient(
    tokens: PackedTokens,
    start: int,
    end: int,
    logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    old_logp: Optional[Tensor],
    ref_logp: Optional[Tensor],
    row_weight: Tensor,
    hparams: list[float],
    modes: list[int],
) -> Tensor:
    """d loss / d logp of packed tokens [start, end): each token as a one-token row."""
    column = lambda x: None if x is None else x.reshape(-1, 1)  # noqa: E731
    grad = torch.ops.medgrpo.policy_loss_backward(
        torch.ones((), dtype=logp.dtype, device=logp.device),
        column(logp),
        column(tokens.take(advantages, start, end)),
        column(tokens.take(mask, start, end)),
        column(tokens.take(old_logp, start, end)),
        column(tokens.take(ref_logp, start, end)),
        tokens.take(row_weight, start, end).to(logp.dtype).contiguous(),
        hparams,
        modes,
    )
    return grad.reshape(-1)


def _single_pass(
    hidden,
    weight,
    targets,
    bias,
    temperature,
    chunk_rows,
    tokens,
    mask,
    advantages,
    old_logp,
    ref_logp,
    row_weight,
    hparams,
    modes,
    grads,
    with_entropy,
):
    """Token-level IS: per chunk, logits -> log-probs -> policy gradient -> logits gradient -> GEMMs."""
    kernels = chunk_kernels_for(hidden)
    dtype = accumulation_dtype(hidden.dtype)
    logp = torch.empty(tokens.count, dtype=dtype, device=hidden.device)
    entropy = torch.empty(tokens.count if with_entropy else 0, dtype=dtype, device=hidden.device)
    for start in range(0, tokens.count, chunk_rows):
        end = min(start + chunk_rows, tokens.count)
        hidden_chunk, target_chunk = tokens.take(hidden, start, end), tokens.take(targets, start, end)
        logits = chunk_logits(hidden_chunk, weight, bias)
        logp[start:end], lse, chunk_entropy = kernels.stats(logits, target_chunk, temperature, with_entropy)
        if with_entropy:
            entropy[start:end] = chunk_entropy
        grad_logp = _token_policy_gradient(
            tokens, start, end, logp[start:end], advantages, mask, old_logp, ref_logp, row_weight, hparams, modes
        )
        kernels.grad_(logits, target_chunk, lse, chunk_entropy, grad_logp, None, temperature)
        grads.add_chunk(start, logits, hidden_chunk, weight)
    return logp, entropy


def _two_pass(
    hidden,
    weight,
    targets,
    bias,
    temperature,
    chunk_rows,
    tokens,
    mask,
    advantages,
    old_logp,
    ref_logp,
    num_items,
    hparams,
    modes,
    grads,
    with_entropy,
):
    """Sequence-level IS: all log-probs first, the (B, T) policy loss and gradient, then the head's gradient.

    Returns (loss, metrics, entropy): its one policy-loss forward gives the row weights and the op's loss.
    """
    kernels = chunk_kernels_for(hidden)
    packed_hidden, packed_targets = tokens.take(hidden), tokens.take(targets)
    logp, lse, entropy = head_forward(
        packed_hidden, weight, packed_targets, bias, temperature, chunk_rows, kernels, with_entropy
    )
    full_logp = tokens.scatter(logp, tuple(mask.shape))
    loss, metrics, row_weight = torch.ops.medgrpo.policy_loss_forward(
        full_logp, advantages, mask, old_logp, ref_logp, num_items, hparams, modes
    )
    grad_full = torch.ops.medgrpo.policy_loss_backward(
        torch.ones((), dtype=logp.dtype, device=logp.device),
        full_logp,
        advantages,
        mask,
        old_logp,
        ref_logp,
        row_weight,
        hparams,
        modes,
    )
    head_backward(
        tokens.take(grad_full),
        None,
        packed_hidden,
        weight,
        packed_targets,
        bias,
        lse,
        entropy,
        temperature,
        chunk_rows,
        kernels,
        grads,
    )
    return loss, metrics, entropy


def _fused_impl(
    hidden,
    weight,
    targets,
    mask,
    advantages,
    bias,
    old_logp,
    ref_logp,
    num_items,
    temperature,
    hparams,
    modes,
    chunk_rows,
    needs,
    with_entropy,
):
    config = PolicyLossConfig.unpack(hparams, modes)
    tokens = PackedTokens(mask)
    grad_hidden = torch.zeros_like(hidden) if needs[0] else hidden.new_empty(0)

    def place_hidden(start: int, end: int, rows: Tensor) -> None:
        grad_hidden[tokens.rows[start:end], tokens.cols[start:end]] = rows

    grads = HeadGradients(hidden, weight, bias, tuple(needs), place_hidden)
    common = (hidden, weight, targets, bias, temperature, chunk_rows, tokens, mask, advantages, old_logp, ref_logp)
    if config.importance_sampling == "token":
        items = resolve_num_items(num_items, hparams)
        row_weight = reference.loss_row_weights(
            mask,
            loss_type=config.loss_type,
            num_items=items,
            max_completion_length=config.max_completion_length,
            dtype=accumulation_dtype(hidden.dtype),
        )
        logp, entropy = _single_pass(*common, row_weight, hparams, modes, grads, with_entropy)
        loss, metrics, _ = torch.ops.medgrpo.policy_loss_forward(
            tokens.scatter(logp, tuple(mask.shape)), advantages, mask, old_logp, ref_logp, num_items, hparams, modes
        )
    else:
        loss, metrics, entropy = _two_pass(*common, num_items, hparams, modes, grads, with_entropy)
    mean_entropy = loss.new_zeros(1)
    if with_entropy:
        token_weight = tokens.take(mask).to(entropy.dtype)
        mean_entropy = ((entropy * token_weight).sum() / token_weight.sum().clamp(min=1.0)).reshape(1)
    _, grad_weight, grad_bias = grads.result(weight, bias)
    all_metrics = torch.cat([metrics.to(loss.dtype), mean_entropy.to(loss.dtype)])
    return loss, all_metrics, grad_hidden, grad_weight, grad_bias


for _key in ("CPU", "CUDA"):
    _library.LIBRARY.impl("fused_linear_policy_loss", _fused_impl, _key)


@_library.register_fake("fused_linear_policy_loss")
def _fake(
    hidden,
    weight,
    targets,
    mask,
    advantages,
    bias,
    old_logp,
    ref_logp,
    num_items,
    temperature,
    hparams,
    modes,
    chunk_rows,
    needs,
    with_entropy,
):
    dtype = accumulation_dtype(hidden.dtype)
    grad_bias = torch.empty_like(bias) if needs[2] and bias is not None else weight.new_empty(0)
    return (
        hidden.new_empty((), dtype=dtype),
        hidden.new_empty(7, dtype=dtype),
        torch.empty_like(hidden) if needs[0] else hidden.new_empty(0),
        torch.empty_like(weight) if needs[1] else weight.new_empty(0),
        grad_bias,
    )


def _setup_context(ctx, inputs, output) -> None:
    _, _, grad_hidden, grad_weight, grad_bias = output
    ctx.mark_non_differentiable(output[1], grad_hidden, grad_weight, grad_bias)
    # The outputs other than the loss never get a gradient: without this, autograd would hand backward a
    # zero-filled tensor for each, one of them weight-sized.
    ctx.set_materialize_grads(False)
    # Held as plain attributes, not saved tensors: backward hands them over and drops its reference, so
    # autograd can adopt the weight gradient as ``weight.grad`` instead of copying it (a saved tensor
    # would keep a second reference alive and force a weight-sized copy).
    ctx.gradients = (grad_hidden, grad_weight, grad_bias)


NUM_INPUTS = 15  # hidden, weight, targets, mask, advantages, bias, old, ref, num_items, and 6 options


def _backward(ctx, grad_loss, *_unused):
    # The forward computed the gradients for d loss = 1. They are scaled by the incoming
    # gradient in place (a device multiply: no host sync, and no second weight-sized
    # tensor), which uses them up: a second backward through a retained graph is refused.
    gradients, ctx.gradients = ctx.gradients, None
    if grad_loss is None:  # nothing flowed into the loss (grads are not materialized)
        return (None,) * NUM_INPUTS
    if gradients is None:
        raise RuntimeError(
            "fused_linear_policy_loss: backward was already run through this graph; its gradients were "
            "computed in the forward and scaled in place by the first backward, so a second backward "
            "(retain_graph=True) cannot be served. Call fused_linear_policy_loss again for another backward."
        )
    grads = [None] * NUM_INPUTS
    for index, gradient in zip((0, 1, 5), gradients):
        grads[index] = gradient.mul_(grad_loss.to(gradient.dtype)) if gradient.numel() else None
    del gradients
    return tuple(grads)


torch.library.register_autograd(
    "medgrpo::fused_linear_policy_loss", _backward, setup_context=_setup_context, lib=_library.LIBRARY
)


def fused_linear_policy_loss(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    mask: Tensor,
    advantages: Tensor,
    *,
    bias: Optional[Tensor] = None,
    temperature: float = 1.0,
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
    return_entropy: bool = False,
    chunk_rows: Optional[int] = None,
) -> PolicyLossOutput:
    """The lm-head and :func:`medgrpo.policy_loss` fused: hidden states in, loss out.

    Equals ``policy_loss(linear_logprob(hidden, weight, targets, ...), advantages, mask,
    ...)`` in value and gradients (hidden, weight, bias), but never holds the (tokens x V)
    logits and spends vocab GEMMs only on masked-in tokens.

    Args:
        hidden: (B, T, H) final hidden states at the positions that predict ``targets``.
        weight: (V, H) lm-head weight (DTensor shards are gathered; tied embeddings work).
        targets: (B, T) sampled completion token ids.
        mask: (B, T) completion mask; masked-out rows never reach the vocab GEMM.
        advantages: (B,) or (B, T).
        bias, temperature: as in :func:`medgrpo.linear_logprob`.
        old_logp, ref_logp, loss_type, epsilon_low, epsilon_high, beta, kl_estimator,
        importance_sampling, dual_clip, max_completion_length, num_items: as in
        :func:`medgrpo.policy_loss`.
        return_entropy: also compute the masked mean entropy of the policy (one more pass
            over each logits chunk on CPU, one more accumulator in the Triton kernel).
        chunk_rows: tokens per logits chunk (default: :func:`medgrpo.ops.linear_logprob.default_chunk_rows`).

    Returns:
        :class:`PolicyLossOutput`; its ``entropy`` is the masked mean entropy (detached) with
        ``return_entropy``, else None. Backward may run once per call: the gradients are
        computed in the forward and scaled in place by the incoming gradient.

    Costs one host sync, to count the masked-in tokens that size the GEMMs.
    """
    weight = full_weight(weight)
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be (B, T, H), got shape {tuple(hidden.shape)}")
    check_head_inputs(hidden, weight, targets, bias, temperature)
    logp_like = hidden.new_empty(hidden.shape[:2], dtype=torch.float32)  # shape stand-in for the loss checks
    _check_inputs(logp_like, advantages, mask, old_logp, ref_logp, num_items)
    config = PolicyLossConfig(
        loss_type, epsilon_low, epsilon_high, beta, kl_estimator, importance_sampling, dual_clip, max_completion_length
    )
    config.validate(has_ref=ref_logp is not None)
    items_tensor, items_value = split_num_items(num_items)
    packed_rows = hidden.shape[0] * hidden.shape[1]  # an upper bound of the masked-in tokens (no host sync here)
    rows = chunk_rows or default_chunk_rows(packed_rows, weight.shape[1], hidden.dtype, hidden.device)
    grad_mode = torch.is_grad_enabled()
    needs = [grad_mode and t is not None and t.requires_grad for t in (hidden, weight, bias)]
    loss, metrics, *_ = torch.ops.medgrpo.fused_linear_policy_loss(
        hidden,
        weight,
        targets,
        mask,
        advantages,
        bias,
        old_logp,
        ref_logp,
        items_tensor,
        float(temperature),
        config.hparams(items_value),
        config.modes(),
        int(rows),
        needs,
        bool(return_entropy),
    )
    return output_from_metrics(
        loss,
        metrics,
        has_ref=ref_logp is not None,
        has_dual_clip=dual_clip is not None,
        entropy=metrics[6] if return_entropy else None,
    )
