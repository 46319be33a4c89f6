"""patchify: uint8 video frames -> Qwen2.5-VL's ``pixel_values_videos`` rows, as a torch custom op."""

from __future__ import annotations

import torch
from torch import Tensor

from medgrpo.ops import _library, reference
from medgrpo.ops.reference import (
    CHANNELS,
    CLIP_MEAN,
    CLIP_STD,
    MERGE_SIZE,
    PATCH_SIZE,
    RESCALE_FACTOR,
    ROW_LEN,
    TEMPORAL_PATCH_SIZE,
)


@_library.register_fake("patchify")
def _fake(frames: Tensor, dtype: torch.dtype) -> Tensor:
    t, h, w, _ = frames.shape
    rows = (t // TEMPORAL_PATCH_SIZE) * (h // PATCH_SIZE) * (w // PATCH_SIZE)
    return frames.new_empty((rows, ROW_LEN), dtype=dtype)


def _reference_kernel(frames: Tensor, dtype: torch.dtype) -> Tensor:
    return reference.patchify(frames, dtype=dtype)[0]


def _cuda_kernel(frames: Tensor, dtype: torch.dtype) -> Tensor:
    if dtype == torch.float64:
        return _reference_kernel(frames, dtype)
    from medgrpo.kernels.patchify import patchify as launch

    return launch(frames, dtype, CLIP_MEAN, CLIP_STD, RESCALE_FACTOR, PATCH_SIZE, MERGE_SIZE, TEMPORAL_PATCH_SIZE)


# No C++ kernel: a reshape / permute is what the CPU does best, so the reference is the CPU kernel.
_library.register_cpu("patchify", _reference_kernel)
_library.register_cuda("patchify", _cuda_kernel)


def patchify(frames: Tensor, *, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """Cut a ``(T, H, W, 3)`` uint8 clip into Qwen2.5-VL's normalized patch rows.

    What the Hugging Face Qwen2-VL video processor does after resizing (``do_resize=False``):
    rescale by 1/255, normalize with the CLIP mean/std (in float32), then lay the clip out as
    flat 2x14x14 spatio-temporal patch rows, the rows of each 2x2 merge window consecutive
    (:func:`medgrpo.ops.reference.patchify` spells the layout out). On CUDA one Triton launch
    per clip, any input strides.

    Args:
        frames: uint8 ``(T, H, W, 3)``, ``T`` even (pad by repeating the last frame), ``H`` and
            ``W`` multiples of 28.
        dtype: floating-point dtype of the rows (float32, bfloat16 or float16 on the GPU).

    Returns:
        ``pixel_values_videos`` ``(T/2 * H/14 * W/14, 1176)`` in ``dtype`` and ``video_grid_thw``,
        int64 ``[[T/2, H/14, W/14]]``, both on the device of ``frames``.

    Raises:
        TypeError: ``frames`` is not a tensor. ValueError: any other layout, or a non-float ``dtype``.
    """
    grid = reference.patchify_grid(frames)
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating-point dtype, got {dtype}")
    pixel_values = torch.ops.medgrpo.patchify(frames, dtype)
    return pixel_values, torch.tensor([grid], dtype=torch.int64, device=frames.device)


__all__ = [
    "CHANNELS",
    "CLIP_MEAN",
    "CLIP_STD",
    "MERGE_SIZE",
    "PATCH_SIZE",
    "RESCALE_FACTOR",
    "ROW_LEN",
    "TEMPORAL_PATCH_SIZE",
    "patchify",
]
