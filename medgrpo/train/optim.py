"""AdamW, its learning-rate schedule, and the guarded optimizer step (non-finite steps are skipped)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from medgrpo.train import compat


@dataclass
class OptimConfig:
    """AdamW and the learning-rate schedule.

    Attributes:
        lr: the peak learning rate.
        weight_decay: AdamW's decoupled weight decay.
        beta1: AdamW's first-moment decay.
        beta2: AdamW's second-moment decay.
        warmup_steps: steps of linear warmup from lr / warmup_steps to lr.
        schedule: after warmup, "constant" or "cosine" (decay to 0 at the last step).
        max_grad_norm: clip the gradient norm to it; 0 or less: no clipping (the norm is still logged).
    """

    lr: float = 1e-6
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    warmup_steps: int = 0
    schedule: str = "constant"
    max_grad_norm: float = 1.0

    def __post_init__(self) -> None:
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"schedule must be 'constant' or 'cosine', got {self.schedule!r}")


def build_optimizer(
    model: nn.Module, config: OptimConfig, steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over the trainable parameters, with linear warmup then constant or cosine decay over ``steps``."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=config.lr, betas=(config.beta1, config.beta2), weight_decay=config.weight_decay
    )
    steps, warmup = max(steps, 1), config.warmup_steps

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if config.schedule == "cosine":
            progress = (step - warmup) / max(steps - warmup, 1)
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        return 1.0

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def optimizer_step(
    parameters: Sequence[nn.Parameter],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    *,
    loss: torch.Tensor,
    max_grad_norm: float,
) -> tuple[bool, torch.Tensor]:
    """Clip, then step unless the loss or the gradient norm is not finite (then drop the gradients).

    Returns ``(stepped, grad_norm)``; the one host sync of the update reads the finiteness flag.
    """
    grad_norm = torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm if max_grad_norm > 0 else float("inf"))
    grad_norm = compat.full_tensor(grad_norm)  # FSDP2: a DTensor norm over the shards
    finite = bool((torch.isfinite(grad_norm) & torch.isfinite(loss)).item())
    if finite:
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return finite, grad_norm.detach()


__all__ = ["OptimConfig", "build_optimizer", "optimizer_step"]
