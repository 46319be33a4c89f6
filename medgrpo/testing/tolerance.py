"""DESIGN.md §7's tolerance rule, the one used by every kernel test.

A kernel's error against an fp64 reference may be at most ``factor`` times (2 for
values, 3 for gradients) the error of the PyTorch reference run in the same dtype,
plus a small ``atol`` relative to the magnitude of the exact values. It adapts to
dtype and shape without magic numbers. NaN must appear exactly where the exact
result has NaN.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def _max_error(actual: Tensor, exact: Tensor) -> float:
    diff = (actual.double() - exact).abs()[torch.isfinite(exact)]
    return float(diff.max()) if diff.numel() else 0.0


def assert_within_reference_error(
    actual: Optional[Tensor],
    same_dtype: Optional[Tensor],
    exact: Optional[Tensor],
    *,
    factor: float = 2.0,
    atol: float = 1e-6,
    name: str = "value",
) -> None:
    """Check ``|actual - exact| <= factor * |same_dtype - exact| + atol * max(1, |exact|)``."""
    if exact is None:
        assert actual is None, f"{name}: expected None, got a tensor"
        return
    assert actual is not None, f"{name}: expected a tensor, got None"
    exact = exact.detach().double()
    actual, same_dtype = actual.detach(), same_dtype.detach()
    assert actual.shape == exact.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(exact.shape)}"
    nan_expected = torch.isnan(exact)
    assert torch.equal(torch.isnan(actual), nan_expected), f"{name}: NaN pattern differs from the reference"
    finite_exact = exact[torch.isfinite(exact)]
    scale = max(1.0, float(finite_exact.abs().max())) if finite_exact.numel() else 1.0
    allowed = factor * _max_error(same_dtype, exact) + atol * scale
    error = _max_error(actual, exact)
    assert error <= allowed, (
        f"{name}: error {error:.3e} > allowed {allowed:.3e} (torch same-dtype error x{factor} + atol)"
    )
