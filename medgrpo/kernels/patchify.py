"""Triton kernel of Qwen2.5-VL's video patchify: uint8 (T, H, W, C) frames -> normalized (N, C*tp*p*p) rows.

One launch per clip. Each program writes ``BLOCK_R`` output rows, ``BLOCK_C`` columns at a time: for every
output element it derives the source ``(t, y, x, c)``, gathers the uint8 value, normalizes it in float32 as
``(v * rescale - mean[c]) / std[c]`` and stores it in the output dtype. Row order is
``(grid_t, grid_h/merge, grid_w/merge, merge_h, merge_w)``, column order ``(C, temporal_patch, patch_h, patch_w)``
(see ``medgrpo.ops.reference.patchify``). The op (``medgrpo/ops/patchify.py``) checks the clip and passes
the processor's constants (mean, std, rescale factor, patch sizes) in.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_R = 16
BLOCK_C = 128


@triton.jit(
    do_not_specialize=[
        "n_rows",
        "row_len",
        "channels",
        "patch",
        "merge",
        "temporal",
        "merged_w",
        "merged_h",
        "stride_t",
        "stride_h",
        "stride_w",
        "stride_c",
    ]
)
def _patchify_kernel(
    frames_ptr,
    mean_ptr,
    std_ptr,
    out_ptr,
    n_rows,
    row_len,
    channels,
    patch,
    merge,
    temporal,
    merged_w,
    merged_h,
    stride_t,
    stride_h,
    stride_w,
    stride_c,
    rescale,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    row_ok = rows < n_rows
    # Row -> (t_blk, by, bx, my, mx): the output row order is (grid_t, gh/merge, gw/merge, merge, merge).
    mx = rows % merge
    r = rows // merge
    my = r % merge
    r = r // merge
    bx = r % merged_w
    r = r // merged_w
    by = r % merged_h
    t_blk = r // merged_h
    y0 = (by * merge + my) * patch
    x0 = (bx * merge + mx) * patch
    t0 = t_blk * temporal
    row_base = t0 * stride_t + y0 * stride_h + x0 * stride_w  # (BLOCK_R,)
    out_rows = rows * row_len
    for c0 in range(0, row_len, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        col_ok = cols < row_len
        # Column -> (c, tp, py, px): the column order is (channel, temporal_patch, patch, patch).
        px = cols % patch
        q = cols // patch
        py = q % patch
        q = q // patch
        tp = q % temporal
        ch = tl.where(col_ok, q // temporal, 0)
        col_off = tp.to(tl.int64) * stride_t + py * stride_h + px * stride_w + ch * stride_c  # (BLOCK_C,)
        mask = row_ok[:, None] & col_ok[None, :]
        v = tl.load(frames_ptr + (row_base[:, None] + col_off[None, :]), mask=mask, other=0).to(tl.float32)
        mean = tl.load(mean_ptr + ch, mask=col_ok, other=0.0)
        std = tl.load(std_ptr + ch, mask=col_ok, other=1.0)
        y = (v * rescale - mean[None, :]) / std[None, :]
        tl.store(out_ptr + (out_rows[:, None] + cols[None, :]), y.to(out_ptr.dtype.element_ty), mask=mask)


def patchify(
    frames: torch.Tensor,
    dtype: torch.dtype,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    rescale: float,
    patch: int,
    merge: int,
    temporal: int,
) -> torch.Tensor:
    """Launch: a checked ``(T, H, W, C)`` uint8 clip (any strides) -> ``(N, C * temporal * patch**2)`` rows.

    ``dtype`` is float32, bfloat16 or float16; normalization is always computed in float32.
    """
    t, h, w, channels = frames.shape
    grid_t, grid_h, grid_w = t // temporal, h // patch, w // patch
    device = frames.device
    n_rows = grid_t * grid_h * grid_w
    row_len = channels * temporal * patch * patch
    out = torch.empty((n_rows, row_len), dtype=dtype, device=device)
    mean_t = torch.tensor(mean, dtype=torch.float32, device=device)
    std_t = torch.tensor(std, dtype=torch.float32, device=device)
    st, sh, sw, sc = frames.stride()
    grid = (triton.cdiv(n_rows, BLOCK_R),)
    _patchify_kernel[grid](
        frames,
        mean_t,
        std_t,
        out,
        n_rows,
        row_len,
        channels,
        patch,
        merge,
        temporal,
        grid_w // merge,
        grid_h // merge,
        st,
        sh,
        sw,
        sc,
        rescale,
        BLOCK_R=BLOCK_R,
        BLOCK_C=BLOCK_C,
    )
    return out
