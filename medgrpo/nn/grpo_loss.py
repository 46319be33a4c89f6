"""GRPOLoss: medgrpo.policy_loss as a module holding its options."""

from __future__ import annotations

from typing import Optional, Union

from torch import Tensor, nn

from medgrpo.ops.policy_loss import PolicyLossConfig, _apply, _check_inputs
from medgrpo.ops.reference import PolicyLossOutput


class GRPOLoss(nn.Module):
    """Module form of :func:`medgrpo.policy_loss`; options are fixed at construction.

    Defaults are MedGRPO's: DAPO normalization, clip range 0.2 / 0.3, no KL.
    """

    def __init__(
        self,
        *,
        loss_type: str = "dapo",
        epsilon_low: float = 0.2,
        epsilon_high: float = 0.3,
        beta: float = 0.0,
        kl_estimator: str = "k3",
        importance_sampling: str = "token",
        dual_clip: Optional[float] = None,
        max_completion_length: Optional[int] = None,
    ) -> None:
        super().__init__()
        self.config = PolicyLossConfig(
            loss_type=loss_type,
            epsilon_low=epsilon_low,
            epsilon_high=epsilon_high,
            beta=beta,
            kl_estimator=kl_estimator,
            importance_sampling=importance_sampling,
            dual_clip=dual_clip,
            max_completion_length=max_completion_length,
        )
        self.config.validate(has_ref=True)

    def forward(
        self,
        logp: Tensor,
        advantages: Tensor,
        mask: Tensor,
        *,
        old_logp: Optional[Tensor] = None,
        ref_logp: Optional[Tensor] = None,
        num_items: Union[Tensor, float, None] = None,
    ) -> PolicyLossOutput:
        _check_inputs(logp, advantages, mask, old_logp, ref_logp, num_items)
        self.config.validate(has_ref=ref_logp is not None)
        return _apply(logp, advantages, mask, old_logp, ref_logp, num_items, self.config)

    def extra_repr(self) -> str:
        return ", ".join(f"{key}={value!r}" for key, value in self.config.options().items())
