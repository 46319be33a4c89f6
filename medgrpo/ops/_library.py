"""The ``medgrpo`` torch library: one place that defines the op schemas and loads csrc/.

Schemas are defined here, once, in Python. The native extension ``medgrpo._C`` only
registers CPU implementations (``TORCH_LIBRARY_IMPL(medgrpo, CPU, m)``); the CUDA
implementations are the Triton launchers, registered by each op module. When the
extension is missing, the op modules register the PyTorch reference for CPU instead
(an op without a C++ kernel, patchify, always does).
"""

from __future__ import annotations

import os
import warnings

import torch

LIBRARY = torch.library.Library("medgrpo", "DEF")

SCHEMAS = {
    "normalize_rewards": "normalize_rewards(Tensor rewards, Tensor keys, Tensor stats, float k) -> Tensor",
    # group_size > 0: contiguous groups; group_size == 0: group_ids gives each member's group.
    # scale: 0 group, 1 batch, 2 none. Returns (advantages, rewards used, group_mean,
    # group_std, group_count, summary[zero_std_fraction, nan_fraction]).
    "group_advantages": (
        "group_advantages(Tensor rewards, Tensor? group_ids, int group_size, Tensor? keys, "
        "Tensor? stats, float k, int scale, float eps) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
    ),
    # hparams and modes are PolicyLossConfig.hparams() / .modes() (medgrpo/ops/policy_loss.py).
    # Returns (loss, metrics[kl, clip_low, clip_high, clip_region, clip_dual, tokens], row_weight).
    "policy_loss_forward": (
        "policy_loss_forward(Tensor logp, Tensor advantages, Tensor mask, Tensor? old_logp, "
        "Tensor? ref_logp, Tensor? num_items, float[] hparams, int[] modes) -> (Tensor, Tensor, Tensor)"
    ),
    "policy_loss_backward": (
        "policy_loss_backward(Tensor grad_loss, Tensor logp, Tensor advantages, Tensor mask, "
        "Tensor? old_logp, Tensor? ref_logp, Tensor row_weight, float[] hparams, int[] modes) -> Tensor"
    ),
    # The lm-head over row chunks (medgrpo/ops/linear_logprob.py); returns (logp, lse, entropy);
    # without with_entropy the entropy is not computed (zeros) and gets no gradient.
    "linear_logprob_forward": (
        "linear_logprob_forward(Tensor hidden, Tensor weight, Tensor targets, Tensor? bias, float temperature, "
        "int chunk_rows, bool with_entropy) -> (Tensor, Tensor, Tensor)"
    ),
    # needs = which of (hidden, weight, bias) want a gradient; returns those gradients.
    "linear_logprob_backward": (
        "linear_logprob_backward(Tensor grad_logp, Tensor? grad_entropy, Tensor hidden, Tensor weight, "
        "Tensor targets, Tensor? bias, Tensor lse, Tensor entropy, float temperature, int chunk_rows, "
        "bool[] needs) -> (Tensor, Tensor, Tensor)"
    ),
    # lm-head + policy loss (medgrpo/ops/fused_linear_policy_loss.py): (loss, metrics[6 + entropy],
    # grad_hidden, grad_weight, grad_bias), the gradients computed for d loss = 1 during the forward;
    # the entropy metric is 0 unless with_entropy.
    "fused_linear_policy_loss": (
        "fused_linear_policy_loss(Tensor hidden, Tensor weight, Tensor targets, Tensor mask, Tensor advantages, "
        "Tensor? bias, Tensor? old_logp, Tensor? ref_logp, Tensor? num_items, float temperature, float[] hparams, "
        "int[] modes, int chunk_rows, bool[] needs, bool with_entropy) -> (Tensor, Tensor, Tensor, Tensor, Tensor)"
    ),
    # uint8 (T, H, W, 3) frames -> (T/2 * H/14 * W/14, 1176) normalized patch rows (medgrpo/ops/patchify.py).
    "patchify": "patchify(Tensor frames, ScalarType dtype) -> Tensor",
}


def _load_extension() -> bool:
    """Import medgrpo._C (registers the C++ CPU kernels); warn once if it is unavailable."""
    if os.environ.get("MEDGRPO_DISABLE_EXTENSION", "0") == "1":
        return False
    try:
        from medgrpo import _C  # noqa: F401  (import registers the kernels)
    except ImportError as error:
        warnings.warn(
            f"medgrpo: the native extension medgrpo._C is not available ({error}); CPU ops run "
            "the PyTorch reference. Build it with `pip install --no-build-isolation -e .`.",
            RuntimeWarning,
            stacklevel=3,
        )
        return False
    return True


for _schema in SCHEMAS.values():
    LIBRARY.define(_schema)

EXTENSION_LOADED: bool = _load_extension()


def has_native_cpu_kernels() -> bool:
    """True when the C++ CPU kernels of csrc/ are registered for the medgrpo ops."""
    return EXTENSION_LOADED


def register_cpu_fallback(name: str, fn) -> None:
    """Register ``fn`` (built on the reference) as the CPU kernel when csrc/ is not loaded."""
    if not EXTENSION_LOADED:
        LIBRARY.impl(name, fn, "CPU")


def register_cpu(name: str, fn) -> None:
    """Register ``fn`` as the CPU kernel of an op that has no C++ kernel in csrc/."""
    LIBRARY.impl(name, fn, "CPU")


def register_cuda(name: str, fn) -> None:
    """Register the Triton launcher ``fn`` as the CUDA kernel of op ``name``."""
    LIBRARY.impl(name, fn, "CUDA")


def register_fake(name: str):
    """Decorator registering a shape-only kernel so torch.compile can trace the op."""
    return torch.library.register_fake(f"medgrpo::{name}", lib=LIBRARY)
