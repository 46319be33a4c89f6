"""policy_loss: the clipped GRPO-family policy loss as a differentiable torch custom op."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Optional, Union

import torch
from torch import Tensor

from medgrpo.ops import _checks, _library, reference
from medgrpo.ops.reference import PolicyLossOutput

LOSS_TYPE_CODES = {"grpo": 0, "bnpo": 1, "dr_grpo": 2, "dapo": 3}
KL_CODES = {"k1": 1, "k2": 2, "k3": 3}
NO_NUM_ITEMS = -1.0


@dataclass(frozen=True)
class PolicyLossConfig:
    """Every option of the policy loss (see :func:`policy_loss`); packed into the op's ``hparams`` / ``modes``.

    Attributes:
        loss_type: the reduction: "grpo", "bnpo", "dr_grpo" or "dapo" (TRL's meanings).
        epsilon_low: lower clip range: the ratio is clipped below at 1 - epsilon_low.
        epsilon_high: upper clip range: the ratio is clipped above at 1 + epsilon_high.
        beta: KL coefficient against the reference policy (0: no KL term, no reference model).
        kl_estimator: "k1", "k2" or "k3" (TRL's, unclamped).
        importance_sampling: "token", or "sequence" (GSPO: one ratio per sequence).
        dual_clip: c > 1 bounds the loss of negative-advantage tokens by -c * A (verl); None: off.
        max_completion_length: the denominator of "dr_grpo" (required for it).
    """

    loss_type: str = "dapo"
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    beta: float = 0.0
    kl_estimator: str = "k3"
    importance_sampling: str = "token"
    dual_clip: Optional[float] = None
    max_completion_length: Optional[int] = None

    def validate(self, has_ref: bool) -> None:
        _checks.check_choice("loss_type", self.loss_type, reference.LOSS_TYPES)
        _checks.check_choice("kl_estimator", self.kl_estimator, reference.KL_ESTIMATORS)
        _checks.check_choice("importance_sampling", self.importance_sampling, reference.IMPORTANCE_SAMPLING_LEVELS)
        if not 0.0 <= self.epsilon_low < 1.0:
            raise ValueError(f"epsilon_low must lie in [0, 1), got {self.epsilon_low}")
        if not self.epsilon_high >= 0.0:
            raise ValueError(f"epsilon_high must be >= 0, got {self.epsilon_high}")
        if self.dual_clip is not None and not self.dual_clip > 1.0:
            raise ValueError(f"dual_clip (verl's clip_ratio_c) must be > 1, got {self.dual_clip}")
        if self.beta != 0.0 and not has_ref:
            raise ValueError(f"beta={self.beta} needs ref_logp (the reference model's log-probs)")
        if self.loss_type == "dr_grpo" and not (
            isinstance(self.max_completion_length, int) and self.max_completion_length > 0
        ):
            raise ValueError("loss_type='dr_grpo' needs max_completion_length, a positive int")

    def hparams(self, num_items_value: float = NO_NUM_ITEMS) -> list[float]:
        """[epsilon_low, epsilon_high, beta, dual_clip (0 = off), num_items (-1 = none), max_len]."""
        return [
            float(self.epsilon_low),
            float(self.epsilon_high),
            float(self.beta),
            float(self.dual_clip or 0.0),
            float(num_items_value),
            float(self.max_completion_length or 0),
        ]

    def modes(self) -> list[int]:
        """[loss_type code, kl_estimator code, 1 for sequence-level importance sampling]."""
        return [
            LOSS_TYPE_CODES[self.loss_type],
            KL_CODES[self.kl_estimator],
            int(self.importance_sampling == "sequence"),
        ]

    @classmethod
    def unpack(cls, hparams: Sequence[float], modes: Sequence[int]) -> PolicyLossConfig:
        loss_types = {code: name for name, code in LOSS_TYPE_CODES.items()}
        estimators = {code: name for name, code in KL_CODES.items()}
        return cls(
            loss_type=loss_types[modes[0]],
            epsilon_low=hparams[0],
            epsilon_high=hparams[1],
            beta=hparams[2],
            kl_estimator=estimators[modes[1]],
            importance_sampling="sequence" if modes[2] else "token",
            dual_clip=hparams[3] if hparams[3] > 0 else None,
            max_completion_length=int(hparams[5]) or None,
        )

    def options(self) -> dict:
        """The options as the keyword arguments of :func:`policy_loss` and :func:`fused_linear_policy_loss`."""
        return asdict(self)

    def per_token_options(self) -> dict:
        return dict(
            epsilon_low=self.epsilon_low,
            epsilon_high=self.epsilon_high,
            beta=self.beta,
            kl_estimator=self.kl_estimator,
            importance_sampling=self.importance_sampling,
            dual_clip=self.dual_clip,
        )


# MedGRPO's policy loss (the paper): DAPO token-level normalization, clip range 0.2 / 0.3, no KL.
MEDGRPO_LOSS = PolicyLossConfig(epsilon_high=0.3)


def split_num_items(num_items: Union[Tensor, float, None]) -> tuple[Optional[Tensor], float]:
    """The op's (num_items tensor, num_items value) pair: a device tensor is never read on the host."""
    items_tensor = num_items.reshape(()) if isinstance(num_items, Tensor) else None
    items_value = float(num_items) if isinstance(num_items, (int, float)) else NO_NUM_ITEMS
    return items_tensor, items_value


def resolve_num_items(num_items: Optional[Tensor], hparams: Sequence[float]) -> Union[Tensor, float, None]:
    """Inverse of split_num_items inside a kernel: the tensor, else the value, else None."""
    if num_items is not None:
        return num_items
    return hparams[4] if hparams[4] >= 0 else None


def output_from_metrics(
    loss: Tensor, metrics: Tensor, *, has_ref: bool, has_dual_clip: bool, entropy: Optional[Tensor] = None
) -> PolicyLossOutput:
    """PolicyLossOutput from the op's metrics vector [kl, clip low, clip high, clip region, dual, tokens]."""
    return PolicyLossOutput(
        loss=loss,
        kl=metrics[0] if has_ref else None,
        clip_fraction=metrics[3],
        clip_fraction_low=metrics[1],
        clip_fraction_high=metrics[2],
        clip_fraction_dual=metrics[4] if has_dual_clip else None,
        entropy=entropy,
    )


# ------------------------------------------------------------------------------ kernels
@_library.register_fake("policy_loss_forward")
def _fake_forward(logp, advantages, mask, old_logp, ref_logp, num_items, hparams, modes):
    dtype = reference.accumulation_dtype(logp.dtype)
    return (logp.new_empty((), dtype=dtype), logp.new_empty(6, dtype=dtype), logp.new_empty(logp.shape[0], dtype=dtype))


@_library.register_fake("policy_loss_backward")
def _fake_backward(grad_loss, logp, advantages, mask, old_logp, ref_logp, row_weight, hparams, modes):
    return torch.empty_like(logp)


def _reference_forward(logp, advantages, mask, old_logp, ref_logp, num_items, hparams, modes):
    config = PolicyLossConfig.unpack(hparams, modes)
    items = resolve_num_items(num_items, hparams)
    out = reference.policy_loss(
        logp,
        advantages,
        mask,
        old_logp=old_logp,
        ref_logp=ref_logp,
        loss_type=config.loss_type,
        max_completion_length=config.max_completion_length,
        num_items=items,
        **config.per_token_options(),
    )
    zero = out.loss.new_zeros(())
    tokens = mask.to(out.loss.dtype).sum()
    metrics = torch.stack(
        [
            zero if out.kl is None else out.kl,
            out.clip_fraction_low,
            out.clip_fraction_high,
            out.clip_fraction,
            zero if out.clip_fraction_dual is None else out.clip_fraction_dual,
            tokens,
        ]
    )
    row_weight = reference.loss_row_weights(
        mask,
        loss_type=config.loss_type,
        num_items=items,
        max_completion_length=config.max_completion_length,
        dtype=out.loss.dtype,
    )
    return out.loss.detach(), metrics.detach(), row_weight.contiguous()


def _reference_backward(grad_loss, logp, advantages, mask, old_logp, ref_logp, row_weight, hparams, modes):
    config = PolicyLossConfig.unpack(hparams, modes)
    with torch.enable_grad():
        leaf = logp.detach().requires_grad_(True)
        per_token = reference.per_token_policy_loss(
            leaf, advantages, mask, old_logp=old_logp, ref_logp=ref_logp, **config.per_token_options()
        )
        loss = (per_token.loss.sum(-1) * row_weight.to(per_token.loss.dtype)).sum()
        (grad,) = torch.autograd.grad(loss, leaf, grad_loss.to(loss.dtype))
    return grad


def _cuda_forward(logp, advantages, mask, old_logp, ref_logp, num_items, hparams, modes):
    if logp.dtype == torch.float64:
        return _reference_forward(logp, advantages, mask, old_logp, ref_logp, num_items, hparams, modes)
    from medgrpo.kernels.policy_loss import policy_loss_forward as launch

    return launch(logp, advantages, mask, old_logp, ref_logp, num_items, hparams, modes)


def _cuda_backward(grad_loss, logp, advantages, mask, old_logp, ref_logp, row_weight, hparams, modes):
    if logp.dtype == torch.float64:
        return _reference_backward(grad_loss, logp, advantages, mask, old_logp, ref_logp, row_weight, hparams, modes)
    from medgrpo.kernels.policy_loss import policy_loss_backward as launch

    return launch(grad_loss, logp, advantages, mask, old_logp, ref_logp, row_weight, hparams, modes)


_library.register_cpu_fallback("policy_loss_forward", _reference_forward)
_library.register_cpu_fallback("policy_loss_backward", _reference_backward)
_library.register_cuda("policy_loss_forward", _cuda_forward)
_library.register_cuda("policy_loss_backward", _cuda_backward)


def _setup_context(ctx, inputs, output) -> None:
    logp, advantages, mask, old_logp, ref_logp, _num_items, hparams, modes = inputs
    ctx.save_for_backward(logp, advantages, mask, old_logp, ref_logp, output[2])
    ctx.mark_non_differentiable(output[1], output[2])  # metrics and row weights are detached
    ctx.hparams, ctx.modes = hparams, modes


def _backward(ctx, grad_loss, _grad_metrics, _grad_row_weight):
    logp, advantages, mask, old_logp, ref_logp, row_weight = ctx.saved_tensors
    grad = torch.ops.medgrpo.policy_loss_backward(
        grad_loss, logp, advantages, mask, old_logp, ref_logp, row_weight, ctx.hparams, ctx.modes
    )
    # Only logp is differentiated: advantages, old and ref log-probs are data (TRL, Liger).
    return grad, None, None, None, None, None, None, None


torch.library.register_autograd(
    "medgrpo::policy_loss_forward", _backward, setup_context=_setup_context, lib=_library.LIBRARY
)


# ------------------------------------------------------------------------------ public API
def _check_inputs(logp, advantages, mask, old_logp, ref_logp, num_items) -> None:
    _checks.check_floating("logp", logp)
    if logp.dim() != 2:
        raise ValueError(f"logp must be (B, T) per-token log-probs, got shape {tuple(logp.shape)}")
    _checks.check_tensor("mask", mask)
    _checks.check_shape("mask", mask, logp.shape, "same as logp")
    _checks.check_floating("advantages", advantages)
    if tuple(advantages.shape) not in ((logp.shape[0],), tuple(logp.shape)):
        raise ValueError(
            f"advantages must be (B,) = ({logp.shape[0]},) or (B, T) = {tuple(logp.shape)}, "
            f"got {tuple(advantages.shape)}"
        )
    for name, t in (("old_logp", old_logp), ("ref_logp", ref_logp)):
        if t is not None:
            _checks.check_floating(name, t)
            _checks.check_shape(name, t, logp.shape, "same as logp")
    if isinstance(num_items, Tensor):
        if num_items.numel() != 1:
            raise ValueError(f"num_items must be a number or a one-element tensor, got shape {tuple(num_items.shape)}")
    elif num_items is not None and not (isinstance(num_items, (int, float)) and num_items >= 0):
        raise ValueError(f"num_items must be a non-negative number or a tensor, got {num_items!r}")
    _checks.check_same_device(
        "logp",
        logp,
        mask=mask,
        advantages=advantages,
        old_logp=old_logp,
        ref_logp=ref_logp,
        num_items=num_items if isinstance(num_items, Tensor) else None,
    )


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
    """Clipped policy-gradient loss of GRPO and its variants, fused forward and backward.

    Per token: ``-min(ratio * A, clip(ratio, 1 - epsilon_low, 1 + epsilon_high) * A)``
    (+ ``beta * KL`` against the reference policy), reduced per ``loss_type``. Values
    and gradients equal TRL's GRPOTrainer and Liger-Kernel's LigerFusedLinearGRPOLoss
    for the same options, so switching from either changes no number.

    Args:
        logp: (B, T) log-probs of the sampled completion tokens under the current policy
            (fp32/bf16/fp16); the only input that receives a gradient.
        advantages: (B,) per sequence or (B, T) per token.
        mask: (B, T) completion mask (bool, int or float weights). Masked-out tokens
            contribute exactly 0, even if their log-probs are NaN padding.
        old_logp: (B, T) log-probs of the policy that sampled; None = on-policy, the
            ratio is exp(logp - logp.detach()) (value 1, gradient of logp).
        ref_logp: (B, T) reference-policy log-probs for the KL penalty / metric.
        loss_type: "grpo" (mean over sequences of each sequence's token mean), "bnpo"
            (token mean over the batch), "dr_grpo" (sum / (B * max_completion_length)),
            "dapo" (sum / num_items; the MedGRPO default).
        epsilon_low, epsilon_high: asymmetric clip range (MedGRPO: 0.2 / 0.3).
        beta: KL coefficient (MedGRPO: 0, no KL). Needs ``ref_logp`` when non-zero.
        kl_estimator: "k1" logp - ref, "k2" (logp - ref)^2 / 2, "k3"
            exp(ref - logp) - (ref - logp) - 1 (TRL's, unclamped).
        importance_sampling: "token", or "sequence" (GSPO): one ratio per sequence, the
            exp of its masked mean log-ratio.
        dual_clip: c > 1 bounds the loss of negative-advantage tokens by -c * A (verl's
            clip_ratio_c); None disables it.
        max_completion_length: denominator of "dr_grpo" (required for it).
        num_items: denominator of "dapo": a number or a 0-d device tensor (no host
            sync). Default: this batch's masked token count. Under data parallelism
            pass TRL's ``num_items_in_batch / world_size`` (the global count divided by
            the ranks, since gradients are averaged across them).

    Returns:
        :class:`PolicyLossOutput`: fp32 scalar ``loss`` (fp64 for fp64 logp) and
        detached device-side metrics: ``kl`` (masked mean, when ref_logp is given),
        ``clip_fraction`` (low or high), ``clip_fraction_low`` (ratio < 1 - eps_low,
        A < 0), ``clip_fraction_high`` (ratio > 1 + eps_high, A > 0),
        ``clip_fraction_dual`` (when dual_clip is set); token-weighted fractions.

    Dispatch: CUDA tensors run Triton kernels, CPU tensors the C++ kernels of csrc/
    (the PyTorch reference when the extension is absent). Works under torch.compile.
    """
    _check_inputs(logp, advantages, mask, old_logp, ref_logp, num_items)
    config = PolicyLossConfig(
        loss_type, epsilon_low, epsilon_high, beta, kl_estimator, importance_sampling, dual_clip, max_completion_length
    )
    config.validate(has_ref=ref_logp is not None)
    return _apply(logp, advantages, mask, old_logp, ref_logp, num_items, config)


def _apply(logp, advantages, mask, old_logp, ref_logp, num_items, config: PolicyLossConfig) -> PolicyLossOutput:
    items_tensor, items_value = split_num_items(num_items)
    loss, metrics, _ = torch.ops.medgrpo.policy_loss_forward(
        logp, advantages, mask, old_logp, ref_logp, items_tensor, config.hparams(items_value), config.modes()
    )
    return output_from_metrics(loss, metrics, has_ref=ref_logp is not None, has_dual_clip=config.dual_clip is not None)
