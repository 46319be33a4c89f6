"""Qwen2.5-VL for training: loaded from a local directory, checkpointed, compiled, sharded with FSDP2.

Design choices:

- **Local only.** ``from_pretrained(path, local_files_only=True)``: nothing is fetched from a hub.
- **Attention.** ``"auto"`` asks transformers which flash attention it can run here (its own
  availability checks, which tell flash-attn 2 from the flash-attn 4 wheel that also installs a
  ``flash_attn`` package) and picks ``flash_attention_3`` on a Hopper GPU where it is usable, else
  ``flash_attention_2``, else PyTorch ``sdpa``; fp32 compute always takes ``sdpa`` (flash attention
  has no fp32 kernels). The choice and its reason are logged, and applied to the vision tower and
  the language model alike.
- **Order of wrapping** (torchtitan's): activation checkpointing → ``torch.compile`` per decoder
  block → ``fully_shard`` per decoder block, the vision tower as one unit, then the root.
  Activation checkpointing is transformers' own (non-reentrant ``torch.utils.checkpoint`` inside
  each ``GradientCheckpointingLayer``), and compile is in place (``nn.Module.compile``), so no
  module is wrapped or renamed: parameter names, checkpoints and the Hugging Face export keep
  the names of the original model.
- **Layouts.** :func:`decoder_layers` and :func:`vision_tower` find the submodules through
  transformers' accessors (``get_decoder``) with the attribute paths of the 4.x and 5.x layouts as
  fallbacks. Nothing in transformers is patched.
- **Hidden states under FSDP2.** The fused head needs the final (normed) hidden states and the
  lm-head weight, never the logits. :func:`final_hidden_states` runs the *root* forward (so FSDP2's
  root hooks run: its parameters, the lm-head among them, are gathered, and stay gathered until
  backward, as FSDP2 never reshards the root after forward), asks it for logits at no position
  (``logits_to_keep`` = an empty index tensor), and reads the language model's output with a
  forward hook. :func:`medgrpo.train.qwen.lm_head_weight` right after it is the gathered weight, so
  its gradient is reduce-scattered across ranks with all the others.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from medgrpo.train import compat

logger = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
ATTENTIONS = ("auto", "flash_attention_3", "flash_attention_2", "sdpa", "eager")


@dataclass
class ModelConfig:
    """How to load the policy.

    Attributes:
        path: a local Hugging Face directory of a Qwen2.5-VL model.
        dtype: the dtype the weights are loaded and kept in: ``"bfloat16"``, or ``"float32"``
            (fp32 master weights; with FSDP2 mixed precision the compute is then ``compute_dtype``).
        compute_dtype: the dtype of forward and backward when it differs from ``dtype``
            (``shard_model(param_dtype=...)`` casts to it); None means ``dtype``.
        attention: ``"auto"``, ``"flash_attention_3"``, ``"flash_attention_2"``, ``"sdpa"`` or ``"eager"``.
        activation_checkpointing: recompute each decoder and vision block in backward.
        freeze_vision: no gradients for the vision tower (patch embedding, blocks, merger).
        compile: ``torch.compile`` each decoder block (in place).
    """

    path: str
    dtype: str = "bfloat16"
    compute_dtype: str | None = None
    attention: str = "auto"
    activation_checkpointing: bool = False
    freeze_vision: bool = False
    compile: bool = False

    def __post_init__(self) -> None:
        for name in ("dtype", "compute_dtype"):
            value = getattr(self, name)
            if value is not None and value not in DTYPES:
                raise ValueError(f"{name} must be one of {sorted(DTYPES)}, got {value!r}")
        if self.attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {self.attention!r}")


def usable_flash_attention(device: torch.device | str) -> tuple[str, ...]:
    """The flash-attention implementations transformers can run on ``device``, best first.

    transformers' own availability checks decide (``compat.flash_attention_implementations``), not
    whether some ``flash_attn`` module imports; ``flash_attention_3`` counts on Hopper (sm_90) only.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return ()
    found = compat.flash_attention_implementations()
    if "flash_attention_3" in found and torch.cuda.get_device_capability(device)[0] != 9:
        found = tuple(name for name in found if name != "flash_attention_3")
    return found


def resolve_attention(attention: str, device: torch.device | str, dtype: torch.dtype) -> str:
    """The attention implementation to load; ``"auto"`` takes the best one transformers can run here.

    ``"auto"``: the first of :func:`usable_flash_attention` in half precision, else ``"sdpa"``; the
    choice is logged with its reason. An explicit flash implementation must be usable.

    Raises:
        ValueError: an unknown name, or a flash implementation transformers cannot run on ``device``.
    """
    if attention not in ATTENTIONS:
        raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
    device = torch.device(device)
    usable = usable_flash_attention(device)
    if attention == "auto":
        if device.type != "cuda":
            choice, reason = "sdpa", f"{device.type} device"
        elif dtype == torch.float32:
            choice, reason = "sdpa", "fp32 compute (flash attention has no fp32 kernels)"
        elif usable:
            choice, reason = usable[0], f"transformers reports {', '.join(usable)} usable"
        else:
            choice, reason = "sdpa", "transformers reports no usable flash attention (flash-attn 2 or 3)"
        logger.info("attention: %s (auto: %s)", choice, reason)
        return choice
    if attention.startswith("flash_attention") and attention not in usable:
        raise ValueError(
            f"attention {attention!r} needs a CUDA device where transformers reports it usable; on {device} it "
            f"reports {', '.join(usable) or 'none'}. Use attention: auto (or sdpa)."
        )
    return attention


def _from_pretrained(cfg: ModelConfig, device: torch.device | str, dtype: torch.dtype) -> nn.Module:
    """The model at ``cfg.path`` (local files only) in ``dtype`` on ``device``, with the attention for its compute."""
    from transformers import AutoModelForImageTextToText

    attention = resolve_attention(cfg.attention, device, DTYPES[cfg.compute_dtype or cfg.dtype])
    directory = Path(cfg.path)
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(
            f"no Hugging Face model at {cfg.path!r} (config.json missing); models load from disk only"
        )
    model = AutoModelForImageTextToText.from_pretrained(
        str(directory), local_files_only=True, dtype=dtype, attn_implementation=attention
    )
    return model.to(device)


def load_model(cfg: ModelConfig, device: torch.device | str = "cpu") -> nn.Module:
    """Load the policy from ``cfg.path`` (local files only) onto ``device``, ready to train.

    Applies, in this order: the attention implementation and dtype, vision freezing,
    activation checkpointing, per-block ``torch.compile``. For FSDP2, load on ``"cpu"`` and
    pass the model to :func:`shard_model`, which moves each rank's shards to its GPU.

    Returns:
        A ``Qwen2_5_VLForConditionalGeneration`` in train mode.
    """
    model = _from_pretrained(cfg, device, DTYPES[cfg.dtype])
    if cfg.freeze_vision:
        freeze_vision_tower(model)
    if cfg.activation_checkpointing:
        enable_activation_checkpointing(model)
    if cfg.compile:
        compile_decoder_layers(model)
    return model.train()


def load_reference_model(cfg: ModelConfig, device: torch.device | str = "cpu") -> nn.Module:
    """A frozen copy of the policy at ``cfg.path`` for the KL term (beta > 0): eval mode, no gradients."""
    model = _from_pretrained(cfg, device, DTYPES[cfg.compute_dtype or cfg.dtype])
    return model.requires_grad_(False).eval()


def language_model(model: nn.Module) -> nn.Module:
    """The text decoder (embeddings, decoder layers, final norm) of a Qwen2.5-VL model."""
    get_decoder = getattr(model, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else None
    if decoder is not None and isinstance(getattr(decoder, "layers", None), nn.ModuleList):
        return decoder
    for path in compat.LANGUAGE_MODEL_PATHS:
        module = _submodule(model, path)
        if module is not None and isinstance(getattr(module, "layers", None), nn.ModuleList):
            return module
    raise ValueError(f"{type(model).__name__} has no language model with decoder layers")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The language model's decoder blocks (``model.model.language_model.layers`` in transformers 5)."""
    return language_model(model).layers


def vision_tower(model: nn.Module) -> nn.Module:
    """The vision encoder (patch embedding, blocks, merger): ``model.model.visual`` or ``model.visual``."""
    for path in compat.VISION_TOWER_PATHS:
        module = _submodule(model, path)
        if module is not None:
            return module
    raise ValueError(f"{type(model).__name__} has no vision tower (model.visual)")


def _submodule(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def freeze_vision_tower(model: nn.Module) -> None:
    """Stop gradients to the vision tower; its weights stay as loaded."""
    vision_tower(model).requires_grad_(False)


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute every decoder and vision block in backward (non-reentrant, so FSDP2- and compile-safe)."""
    compat.enable_activation_checkpointing(model, use_reentrant=False)


def compile_decoder_layers(model: nn.Module, *, backend: str = "inductor") -> None:
    """``torch.compile`` each decoder block in place (names and state-dict keys unchanged)."""
    for layer in decoder_layers(model):
        layer.compile(backend=backend)


@contextlib.contextmanager
def _capture_output(module: nn.Module) -> Iterator[list]:
    outputs: list = []
    handle = module.register_forward_hook(lambda _module, _args, output: outputs.append(output))
    try:
        yield outputs
    finally:
        handle.remove()


def final_hidden_states(model: nn.Module, **inputs) -> torch.Tensor:
    """The language model's final normed hidden states ``(B, L, H)``, through the root forward, without logits.

    ``inputs`` are the model's keyword arguments (``VideoBatch.model_inputs()``). Running the root
    forward keeps FSDP2's root hooks in the path; ``logits_to_keep`` (an empty index tensor)
    makes the lm-head run on no position. Feed the result and :func:`medgrpo.train.qwen.lm_head_weight` to
    ``medgrpo.linear_logprob`` / ``fused_linear_policy_loss``.
    """
    device = inputs["input_ids"].device
    with _capture_output(language_model(model)) as outputs:
        model(**inputs, use_cache=False, logits_to_keep=torch.empty(0, dtype=torch.long, device=device))
    if len(outputs) != 1:
        raise RuntimeError(f"expected one language-model call in the forward, saw {len(outputs)}")
    return compat.last_hidden_state(outputs[0])


def shard_model(
    model: nn.Module,
    mesh=None,
    *,
    param_dtype: torch.dtype | str | None = torch.bfloat16,
    reduce_dtype: torch.dtype | str | None = torch.float32,
    reshard_after_forward: bool = True,
    gradient_divide_factor: float | None = None,
) -> nn.Module:
    """Shard ``model`` with FSDP2: each decoder block, the vision tower as one unit, then the root.

    Parameters move to ``mesh``'s device (load on CPU, shard onto the GPUs). Works with NCCL and
    with gloo on CPU.

    Args:
        model: a model from :func:`load_model` (checkpointing/compile already applied).
        mesh: a 1-D ``DeviceMesh`` over the data-parallel ranks; None = all ranks of the default group.
        param_dtype: dtype of the gathered parameters in forward/backward (mixed precision);
            None keeps the stored dtype.
        reduce_dtype: dtype of the gradient reduce-scatter; None = ``param_dtype``.
        reshard_after_forward: free each block's (and the vision tower's) gathered weights after
            its forward (ZeRO-3); False keeps them to backward (ZeRO-2: more memory, fewer
            all-gathers). The root is never resharded after forward (FSDP2's default).
        gradient_divide_factor: what the reduced gradients are divided by; None = FSDP's default
            (the world size: an average). Use 1.0 when the loss is already divided by the global
            token count, so the gradients are summed over ranks.

    Returns:
        ``model``, now an ``FSDPModule``.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=_dtype(param_dtype), reduce_dtype=_dtype(reduce_dtype))
    options = {"mesh": mesh, "mp_policy": policy}
    for layer in decoder_layers(model):
        fully_shard(layer, reshard_after_forward=reshard_after_forward, **options)
    fully_shard(vision_tower(model), reshard_after_forward=reshard_after_forward, **options)
    # The root keeps FSDP2's default: not resharded after forward (its weights, the lm-head among
    # them, would be gathered again at once for backward), which final_hidden_states relies on.
    fully_shard(model, **options)
    if gradient_divide_factor is not None:
        for module in model.modules():
            if hasattr(module, "set_gradient_divide_factor"):
                module.set_gradient_divide_factor(gradient_divide_factor)
                # A plain SUM and a local division, rather than NCCL's PREMUL_SUM (gloo has none).
                module.set_force_sum_reduction_for_comms(True)
    return model


def _dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


__all__ = [
    "ModelConfig",
    "compile_decoder_layers",
    "decoder_layers",
    "enable_activation_checkpointing",
    "final_hidden_states",
    "freeze_vision_tower",
    "language_model",
    "load_model",
    "load_reference_model",
    "resolve_attention",
    "shard_model",
    "usable_flash_attention",
    "vision_tower",
]
