"""FusedLinearGRPOLoss: a drop-in for Liger-Kernel's LigerFusedLinearGRPOLoss on medgrpo's fused head."""

from __future__ import annotations

from dataclasses import replace
from typing import Optional, Union

import torch
from torch import Tensor, nn

from medgrpo.ops.fused_linear_policy_loss import fused_linear_policy_loss
from medgrpo.ops.linear_logprob import linear_logprob
from medgrpo.ops.policy_loss import PolicyLossConfig
from medgrpo.train.distributed import world_size


class FusedLinearGRPOLoss(nn.Module):
    """Same constructor and forward arguments as ``LigerFusedLinearGRPOLoss``, same numbers.

    Switching from Liger (or TRL's ``use_liger_kernel`` path) is one line: construct this
    class instead. ``forward`` returns Liger's ``(loss, metrics)``: ``metrics`` is
    ``[mean_kl, clip_ratio]`` when beta != 0, else ``[clip_ratio]``. For every metric
    (clip fractions low/high; entropy with ``return_entropy=True``) call
    :func:`medgrpo.fused_linear_policy_loss`.

    ``compiled`` and ``chunk_size`` are accepted for compatibility and ignored (the
    kernels need no torch.compile; chunks are sized from the vocabulary). Extra options:
    ``dual_clip`` (verl's clip_ratio_c) and ``kl_estimator``.
    """

    def __init__(
        self,
        beta: float = 0.04,
        compiled: bool = True,
        use_ref_model: bool = True,
        chunk_size: int = 1,
        epsilon_low: float = 0.2,
        epsilon_high: float = 0.2,
        loss_type: str = "dapo",
        max_completion_length: Optional[int] = None,
        importance_sampling_level: str = "token",
        temperature: float = 1.0,
        *,
        dual_clip: Optional[float] = None,
        kl_estimator: str = "k3",
    ) -> None:
        super().__init__()
        del compiled, chunk_size  # compatibility only
        self.use_ref_model = use_ref_model
        self.config = PolicyLossConfig(
            loss_type=loss_type,
            epsilon_low=epsilon_low,
            epsilon_high=epsilon_high,
            beta=beta,
            kl_estimator=kl_estimator,
            importance_sampling=importance_sampling_level,
            dual_clip=dual_clip,
            max_completion_length=max_completion_length,
        )
        self.temperature = temperature

    def forward(
        self,
        _input: Tensor,
        lin_weight: Tensor,
        selected_token_ids: Tensor,
        attention_mask: Tensor,
        advantages: Tensor,
        bias: Optional[Tensor] = None,
        ref_per_token_logps: Optional[Tensor] = None,
        old_per_token_logps: Optional[Tensor] = None,
        ref_input: Optional[Tensor] = None,
        ref_weight: Optional[Tensor] = None,
        ref_bias: Optional[Tensor] = None,
        vllm_is_ratio: Optional[Tensor] = None,
        num_items_in_batch: Union[Tensor, float, None] = None,
    ) -> tuple[Tensor, list[Tensor]]:
        if vllm_is_ratio is not None:
            raise NotImplementedError("vllm_is_ratio (vLLM importance-sampling correction) is not supported")
        ref_logp = self._ref_logp(ref_per_token_logps, ref_input, ref_weight, ref_bias, selected_token_ids)
        # Liger without a reference uses logp.detach() as the reference: KL value and gradient are 0.
        config = self.config if ref_logp is not None else replace(self.config, beta=0.0)
        out = fused_linear_policy_loss(
            _input,
            lin_weight,
            selected_token_ids,
            attention_mask,
            advantages,
            bias=bias,
            temperature=self.temperature,
            old_logp=old_per_token_logps,
            ref_logp=ref_logp,
            num_items=_per_rank(num_items_in_batch),
            **config.options(),
        )
        metrics = [out.clip_fraction]
        if self.config.beta != 0.0:
            metrics.insert(0, out.kl if out.kl is not None else out.loss.new_zeros(()))
        return out.loss, metrics

    def _ref_logp(self, ref_per_token_logps, ref_input, ref_weight, ref_bias, targets) -> Optional[Tensor]:
        if self.config.beta == 0.0 or not self.use_ref_model:
            return None
        if ref_per_token_logps is not None:
            return ref_per_token_logps
        if ref_input is None or ref_weight is None:
            raise ValueError("use_ref_model with beta != 0 needs ref_per_token_logps or ref_input and ref_weight")
        with torch.no_grad():
            return linear_logprob(ref_input, ref_weight, targets, bias=ref_bias, temperature=self.temperature)[0]


def _per_rank(num_items_in_batch: Union[Tensor, float, None]) -> Union[Tensor, float, None]:
    """TRL / Liger divide the global token count by the number of ranks (gradients are averaged)."""
    if num_items_in_batch is None:
        return None
    return num_items_in_batch / world_size()
