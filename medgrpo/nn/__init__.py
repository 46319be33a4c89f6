"""Thin nn.Module wrappers of the medgrpo ops."""

from medgrpo.nn.grpo_loss import GRPOLoss

__all__ = ["GRPOLoss"]
