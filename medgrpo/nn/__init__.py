"""Thin nn.Module wrappers of the medgrpo ops."""

from medgrpo.nn.fused_linear_grpo_loss import FusedLinearGRPOLoss
from medgrpo.nn.grpo_loss import GRPOLoss

__all__ = ["FusedLinearGRPOLoss", "GRPOLoss"]
