"""Test videos whose frames carry their own frame number, for checking decoders frame by frame.

Frame ``i`` is an RGB image of ``BARS`` (16) vertical bars across the full height: bar ``k``
(left to right) is white if bit ``k`` of ``i`` is set, black otherwise. Wide flat bars
survive JPEG/H.264/VP9 compression, chroma subsampling and moderate resizing;
:func:`read_barcode` reads the number back by averaging the middle of each bar and
thresholding at 128. Bars are ``width // 16`` pixels wide (the rightmost bar takes the
remainder), so sizes of at least 16 pixels per bar (e.g. 160x96 or more) are safest.

Writers: :func:`write_jpeg_folder` (PIL), :func:`write_video` (PyAV: ``libx264`` in
MP4 as yuv420p, ``libvpx-vp9`` in WebM, ``mjpeg`` in AVI/MKV), constant frame rate, and
:func:`write_clip_sources` (the clip every decoder test reads, in each of those forms).
"""

from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path

import numpy as np

BARS = 16
MAX_FRAMES = 1 << BARS
# Flat bars at video-range black/white levels (16/239 survive limited-range YUV round trips unclipped).
_LOW = 16
_HIGH = 239


def _bar_edges(width: int) -> list[tuple[int, int]]:
    bar = width // BARS
    if bar < 1:
        raise ValueError(f"frame width must be at least {BARS} pixels, got {width}")
    edges = [(k * bar, (k + 1) * bar) for k in range(BARS)]
    edges[-1] = (edges[-1][0], width)
    return edges


def barcode_frame(index: int, size: tuple[int, int]) -> np.ndarray:
    """Frame ``index`` as a uint8 array of shape (height, width, 3); ``size`` is (width, height)."""
    if not 0 <= index < MAX_FRAMES:
        raise ValueError(f"index must be in [0, {MAX_FRAMES}), got {index}")
    width, height = size
    frame = np.full((height, width, 3), _LOW, dtype=np.uint8)
    for k, (left, right) in enumerate(_bar_edges(width)):
        if (index >> k) & 1:
            frame[:, left:right] = _HIGH
    return frame


def read_barcode(frame: np.ndarray) -> int:
    """The frame number encoded in ``frame`` (uint8, (H, W, 3), any size the bars survive)."""
    array = np.asarray(frame)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) frame, got shape {array.shape}")
    grey = array.astype(np.float64).mean(axis=2)
    value = 0
    for k, (left, right) in enumerate(_bar_edges(array.shape[1])):
        margin = (right - left) // 4  # read the middle half of the bar, away from edge ringing
        inner = grey[:, left + margin : right - margin] if right - left - 2 * margin > 0 else grey[:, left:right]
        if inner.mean() >= 128:
            value |= 1 << k
    return value


def write_jpeg_folder(directory: str | os.PathLike, n: int, size: tuple[int, int], *, quality: int = 90) -> list[str]:
    """Write frames 0..n-1 as ``frame_00000.jpg``...; returns their paths in order. ``size`` is (width, height)."""
    from PIL import Image

    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"frame_{i:05d}.jpg"
        Image.fromarray(barcode_frame(i, size)).save(path, quality=quality)
        paths.append(str(path))
    return paths


_CODEC_OPTIONS = {
    "libx264": ({"preset": "ultrafast", "crf": "18"}, "yuv420p"),
    "libvpx-vp9": ({"deadline": "realtime", "cpu-used": "8", "crf": "20", "b": "0"}, "yuv420p"),
    "mjpeg": ({"q:v": "3"}, "yuvj420p"),
}


def write_video(
    path: str | os.PathLike, n: int, fps: int | Fraction, size: tuple[int, int], codec: str = "libx264"
) -> str:
    """Encode frames 0..n-1 at a constant ``fps`` into ``path`` with PyAV; ``size`` is (width, height).

    ``codec``: ``"libx264"`` (use .mp4/.mkv), ``"libvpx-vp9"`` (.webm/.mkv) or ``"mjpeg"`` (.avi/.mkv).
    Even sizes are required by the 4:2:0 pixel formats.
    """
    import av

    if codec not in _CODEC_OPTIONS:
        raise ValueError(f"unsupported codec {codec!r}; choose from {sorted(_CODEC_OPTIONS)}")
    width, height = size
    if width % 2 or height % 2:
        raise ValueError(f"width and height must be even for 4:2:0 video, got {size}")
    options, pix_fmt = _CODEC_OPTIONS[codec]
    rate = Fraction(fps)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width = width
        stream.height = height
        stream.pix_fmt = pix_fmt
        stream.options = dict(options)
        if codec == "libx264":
            stream.options["bf"] = "2"  # B-frames: decode order differs from display order
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(barcode_frame(i, size), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return str(path)


# The clip the decoder tests share: CLIP_FRAMES barcode frames at CLIP_FPS, CLIP_SIZE (width, height).
CLIP_FRAMES = 40
CLIP_FPS = 10
CLIP_SIZE = (160, 96)
CLIP_CODECS = {"mp4": "libx264", "webm": "libvpx-vp9", "avi": "mjpeg", "mkv": "mjpeg"}


def write_clip_sources(root: str | os.PathLike) -> dict[str, str]:
    """The shared clip as a JPEG folder (key ``"jpeg"``) and one video per :data:`CLIP_CODECS` entry."""
    root = Path(root)
    out = {"jpeg": str(root / "frames")}
    write_jpeg_folder(out["jpeg"], CLIP_FRAMES, CLIP_SIZE)
    for ext, codec in CLIP_CODECS.items():
        out[ext] = write_video(root / f"clip_{codec}.{ext}", CLIP_FRAMES, CLIP_FPS, CLIP_SIZE, codec)
    return out
