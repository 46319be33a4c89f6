"""GRPOLoss: medgrpo.policy_loss as a module holding its options."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Optional, Union

from torch import Tensor, nn

from medgrpo.ops.policy_loss import MEDGRPO_LOSS, PolicyLossConfig, _apply, _check_inputs
from medgrpo.ops.reference import PolicyLossOutput


class GRPOLoss(nn.Module):
    """Module form of :func:`medgrpo.policy_loss`; options are fixed at construction.

    ``GRPOLoss(loss_type="grpo", beta=0.04)`` takes :func:`medgrpo.policy_loss`'s options as keywords (the
    fields of :class:`~medgrpo.ops.policy_loss.PolicyLossConfig`), over ``config``: by default MedGRPO's
    (:data:`~medgrpo.ops.policy_loss.MEDGRPO_LOSS`: DAPO normalization, clip range 0.2 / 0.3, no KL).
    """

    def __init__(self, config: PolicyLossConfig = MEDGRPO_LOSS, **options: Any) -> None:
        super().__init__()
        self.config = replace(config, **options)
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
