"""Qwen2.5-VL video input layout: uint8 frames -> ``pixel_values_videos`` and ``video_grid_thw``.

Reproduces what the Hugging Face Qwen2-VL video processor does after resizing (``do_resize=False``):
rescale by 1/255, normalize with the CLIP mean/std, then cut the clip into flat patch rows.

Layout. With ``T`` frames of ``H x W`` (T even, H and W multiples of ``patch_size * merge_size = 28``)
the grid is ``(grid_t, grid_h, grid_w) = (T / 2, H / 14, W / 14)``. The normalized ``(T, C, H, W)``
clip is viewed as ``(grid_t, temporal_patch, C, grid_h / merge, merge, patch, grid_w / merge, merge, patch)``
and permuted to ``(grid_t, grid_h / merge, grid_w / merge, merge, merge, C, temporal_patch, patch, patch)``,
so each output row (``C * 2 * 14 * 14 = 1176`` values) is one 2x14x14 spatio-temporal patch, and the rows
of each 2x2 merge window are consecutive.
"""

from __future__ import annotations

import torch

PATCH_SIZE = 14
MERGE_SIZE = 2
TEMPORAL_PATCH_SIZE = 2
CHANNELS = 3
ROW_LEN = CHANNELS * TEMPORAL_PATCH_SIZE * PATCH_SIZE * PATCH_SIZE  # 1176
RESCALE_FACTOR = 1.0 / 255.0
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def check_frames(frames: torch.Tensor) -> tuple[int, int, int]:
    """Validate a ``(T, H, W, 3)`` uint8 clip and return its grid ``(grid_t, grid_h, grid_w)``.

    Raises:
        TypeError: ``frames`` is not a tensor.
        ValueError: wrong dtype, rank or channel count, ``T`` not a positive even number, or ``H`` / ``W``
            not a positive multiple of ``patch_size * merge_size`` (28).
    """
    if not isinstance(frames, torch.Tensor):
        raise TypeError(f"frames must be a torch.Tensor, got {type(frames).__name__}")
    if frames.dtype != torch.uint8:
        raise ValueError(f"frames must be uint8, got {frames.dtype}")
    if frames.dim() != 4:
        raise ValueError(f"frames must have shape (T, H, W, 3), got {tuple(frames.shape)}")
    t, h, w, c = frames.shape
    if c != CHANNELS:
        raise ValueError(f"frames must have {CHANNELS} channels in the last dim, got shape {tuple(frames.shape)}")
    if t <= 0 or t % TEMPORAL_PATCH_SIZE:
        raise ValueError(
            f"number of frames must be a positive multiple of {TEMPORAL_PATCH_SIZE} "
            f"(pad by repeating the last frame), got T={t}"
        )
    factor = PATCH_SIZE * MERGE_SIZE
    if h <= 0 or w <= 0 or h % factor or w % factor:
        raise ValueError(f"H and W must be positive multiples of {factor}, got H={h}, W={w}")
    return t // TEMPORAL_PATCH_SIZE, h // PATCH_SIZE, w // PATCH_SIZE


def _grid_tensor(grid: tuple[int, int, int], device: torch.device) -> torch.Tensor:
    return torch.tensor([list(grid)], dtype=torch.int64, device=device)


def patchify_reference(
    frames_uint8: torch.Tensor, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-PyTorch patchify (reshape / permute) of a ``(T, H, W, 3)`` uint8 clip.

    Normalization is computed in float32 as ``(x * (1 / 255) - mean) / std``.

    Returns:
        ``pixel_values`` of shape ``(grid_t * grid_h * grid_w, 1176)`` in ``dtype`` (float32 by default),
        and ``grid_thw``, int64 ``[[grid_t, grid_h, grid_w]]``, both on the device of ``frames_uint8``.
    """
    grid_t, grid_h, grid_w = check_frames(frames_uint8)
    device = frames_uint8.device
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32, device=device).view(1, CHANNELS, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=torch.float32, device=device).view(1, CHANNELS, 1, 1)
    x = frames_uint8.permute(0, 3, 1, 2).to(torch.float32)  # (T, C, H, W)
    x = (x * RESCALE_FACTOR - mean) / std
    m, p, tp = MERGE_SIZE, PATCH_SIZE, TEMPORAL_PATCH_SIZE
    x = x.reshape(grid_t, tp, CHANNELS, grid_h // m, m, p, grid_w // m, m, p)
    # -> (grid_t, grid_h/m, grid_w/m, m_h, m_w, C, tp, p_h, p_w)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    pixel_values = x.reshape(grid_t * grid_h * grid_w, ROW_LEN).to(dtype)
    return pixel_values, _grid_tensor((grid_t, grid_h, grid_w), device)


def patchify(frames: torch.Tensor, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Patchify a ``(T, H, W, 3)`` uint8 clip: the Triton kernel on CUDA, :func:`patchify_reference` elsewhere.

    Returns ``(pixel_values (N, 1176) in dtype, grid_thw (1, 3) int64)``; see the module docstring for the layout.
    """
    check_frames(frames)
    if frames.is_cuda:
        from medgrpo.kernels.patchify import patchify_triton

        return patchify_triton(frames, dtype=dtype)
    return patchify_reference(frames, dtype=dtype)
