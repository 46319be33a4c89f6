"""The green box of region-caption questions, drawn as the MedGRPO authors' inference code draws it.

A ``region_caption`` record (``is_RC``) asks about the region inside ``RC_info.start_frame_bbox``
on the frame ``RC_info.start_frame``. The authors' ``process_vision_info_medical`` draws it with
PIL on that frame of the list, after the frame's first (per-image) resize and before the video
resize: ``ImageDraw.rectangle(bbox, outline=(0, 255, 0), width=8)``, with ``bbox`` in the stored
pixel coordinates as given. The model was trained and evaluated on those pixels, so every
decoder backend draws the same box at the same point of the pipeline.

:func:`draw_region_box_` is that rectangle as tensor arithmetic (it runs where the frames are,
CPU or GPU, without a round trip through PIL), pixel for pixel equal to PIL's: coordinates
truncated toward zero (PIL casts them with C ``(int)``), ``x1``/``y1`` inclusive, the outline
``width`` nested outlines drawn as PIL draws them (see :func:`region_box_mask`), everything
clipped to the frame.

Portrait frames: the authors rotate a portrait start frame by 270 degrees (``expand=True``)
before drawing, so the box coordinates of portrait sources are in the landscape frame; they
then keep the rotated frame, which no longer matches the size of the other frames (their
stacking of such a clip fails). Here the box is drawn at the same place on the rotated frame
and the frame is rotated back, so the clip keeps one size and the box lands where the
annotation put it.

Video-file records name the start frame by frame number; the authors' code draws nothing for
them. Here the box is drawn, in the file's pixel coordinates before the resize, on the sampled
frame nearest to that frame number (:func:`box_frame_position`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

BOX_COLOR = (0, 255, 0)
BOX_WIDTH = 8


def _truncate(value: float) -> int:
    return int(value)  # C-style cast, as PIL does: toward zero


def _vertical_rows(start: int, end: int) -> tuple[int, int]:
    """Rows PIL's ``line`` paints from ``start`` to ``end`` on one column: every row but the end one."""
    if start < end:
        return start, end - 1
    if start > end:
        return end + 1, start
    return 0, -1  # a zero-length line paints nothing


def region_box_mask(
    height: int,
    width: int,
    bbox: Sequence[float],
    *,
    line_width: int = BOX_WIDTH,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Boolean ``(height, width)`` mask of the pixels PIL's ``rectangle(bbox, width=line_width)`` paints.

    PIL draws ``line_width`` nested outlines: rows ``y0 + i`` and ``y1 - i`` across ``[x0, x1]``,
    and columns ``x0 + i`` and ``x1 - i`` over the rows between ``y0 + width`` and
    ``y1 - width + 1`` (its line leaves out its end point), for ``i < line_width``. A box
    thinner than twice the width therefore spills past ``x0``/``x1``, exactly as in PIL.
    """
    x0, y0, x1, y1 = (_truncate(v) for v in bbox)
    y0, y1 = min(y0, y1), max(y0, y1)
    steps = torch.arange(line_width, device=device)
    ys = torch.arange(height, device=device)
    xs = torch.arange(width, device=device)
    edge_rows = torch.isin(ys, torch.cat([y0 + steps, y1 - steps]))
    edge_cols = torch.isin(xs, torch.cat([x0 + steps, x1 - steps]))
    row_lo, row_hi = _vertical_rows(y0 + line_width, y1 - line_width + 1)
    horizontal = edge_rows.view(-1, 1) & ((xs >= x0) & (xs <= x1)).view(1, -1)
    vertical = ((ys >= row_lo) & (ys <= row_hi)).view(-1, 1) & edge_cols.view(1, -1)
    return horizontal | vertical


def draw_region_box_(frame: torch.Tensor, bbox: Sequence[float], *, line_width: int = BOX_WIDTH) -> torch.Tensor:
    """Draw the region-caption box on one uint8 ``(H, W, 3)`` RGB frame, in place; returns the frame.

    Portrait frames (``H > W``) take the box in the coordinates of the frame rotated by 270
    degrees, as the authors' code does (see the module docstring).
    """
    if frame.dim() != 3 or frame.shape[-1] != 3 or frame.dtype != torch.uint8:
        raise ValueError(f"expected a uint8 (H, W, 3) frame, got {tuple(frame.shape)} {frame.dtype}")
    height, width = frame.shape[0], frame.shape[1]
    color = torch.tensor(BOX_COLOR, dtype=torch.uint8, device=frame.device)
    if height > width:
        # PIL's rotate(270, expand=True) is a clockwise quarter turn: landscape pixel (x, y)
        # is portrait pixel (row = height - 1 - x, col = y).
        mask = region_box_mask(width, height, bbox, line_width=line_width, device=frame.device)
        mask = torch.rot90(mask, k=1)
    else:
        mask = region_box_mask(height, width, bbox, line_width=line_width, device=frame.device)
    frame[mask] = color
    return frame


def box_frame_position(indices: Sequence[int], frame_index: int) -> int:
    """Position in ``indices`` of the sampled frame the box goes on: ``frame_index`` itself, else the nearest."""
    if not indices:
        raise ValueError("no sampled frames to draw the region box on")
    return min(range(len(indices)), key=lambda i: (abs(indices[i] - frame_index), i))


__all__ = ["BOX_COLOR", "BOX_WIDTH", "box_frame_position", "draw_region_box_", "region_box_mask"]
