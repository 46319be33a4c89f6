"""The package imports with and without its native extension, and exposes the contract's API."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import medgrpo

SCRIPT = """
import sys, warnings, torch
sys.modules["medgrpo._C"] = None  # as if the extension had not been built: importing it fails
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    import medgrpo
    import medgrpo.ops, medgrpo.nn
lp = torch.randn(2, 5, requires_grad=True)
out = medgrpo.policy_loss(lp, torch.randn(2), torch.ones(2, 5, dtype=torch.bool))
out.loss.backward()
adv = medgrpo.group_advantages(torch.randn(8), group_size=4)
messages = [str(w.message) for w in caught if "medgrpo._C" in str(w.message)]
print(len(messages), medgrpo.has_native_cpu_kernels(), bool(torch.isfinite(lp.grad).all()), adv.shape[0])
"""


@pytest.mark.slow
def test_import_without_extension_warns_once_and_falls_back():
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["1", "False", "True", "8"], result.stdout + result.stderr


def test_public_api_of_the_contract():
    for name in ("normalize_rewards", "group_advantages", "policy_loss", "PolicyLossOutput"):
        assert name in medgrpo.__all__ and callable(getattr(medgrpo, name))
    for name in ("normalize_rewards", "group_advantages", "policy_loss_forward", "policy_loss_backward"):
        assert hasattr(torch.ops.medgrpo, name)


@pytest.mark.skipif(
    os.environ.get("MEDGRPO_REQUIRE_EXTENSION") != "1", reason="MEDGRPO_REQUIRE_EXTENSION=1 is not set (CI sets it)"
)
def test_extension_is_loaded_when_required():
    """CI builds csrc/ and sets MEDGRPO_REQUIRE_EXTENSION=1 so a broken build cannot hide as skips."""
    assert medgrpo.has_native_cpu_kernels()
