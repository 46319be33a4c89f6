"""decord backend: video files through decord's ``VideoReader``, same API and output as decode_cpu.

qwen-vl-utils' default reader is decord, so a user who prefers it gets the reader Qwen2.5-VL
inference most often uses. The frames to read and their size still come from
:mod:`medgrpo.data.decode` (the plan) and the resize is its :func:`~medgrpo.data.decode.resize_frames`,
so this backend and decode_cpu differ only in how FFmpeg's frames are converted to RGB.

* Frame count: ``len(VideoReader)`` (decord's index of the stream), frame rate:
  ``get_avg_fps()``, frame size: the first decoded frame. For a file PyAV reads whole these
  equal :func:`medgrpo.data.decode_cpu.video_info`; a truncated file may count differently.
* Frames: one ``get_batch(indices)`` call; decord seeks to the keyframe before each run of
  wanted frames and decodes forward, so indices may be in any order and may repeat.
* Frame lists (a folder or a list of image paths) have nothing to do with decord: they go to
  :mod:`medgrpo.data.decode`'s PIL path unchanged.

Every failure (missing file, unreadable or corrupt data, an index beyond the video) raises
:class:`~medgrpo.data.decode.VideoDecodeError` naming the path. decord has no ``close()``:
the reader is dropped in a ``finally`` block so its FFmpeg context and file handle are freed
when the call returns, error or not. decord is imported lazily: importing this module never
fails, calling it without decord raises an ImportError naming the extra to install.

decord ships its own FFmpeg libraries and loads them with ``RTLD_GLOBAL``: imported before
PyAV, it breaks PyAV's libvpx (VP9) encoder in the same process. This module therefore imports
PyAV (when installed) before decord.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch

from medgrpo.data.decode import (
    FrameRequest,
    VideoDecodeError,
    VideoSource,
    check_file,
    decode_frame_images,
    is_frame_source,
    load_with,
)
from medgrpo.data.sampling import FramePlan


def _import_decord():
    # decord loads its own FFmpeg build (with libvpx 1.x) with RTLD_GLOBAL; once loaded first, PyAV's
    # libvpx-vp9 encoder binds to its symbols and fails to open. PyAV loaded first keeps its own.
    try:
        import av  # noqa: F401
    except ImportError:
        pass
    try:
        import decord
    except ImportError as error:
        raise ImportError("the decord backend needs decord: pip install 'medgrpo[video]' (or decord)") from error
    return decord


def _decord_errors(decord) -> tuple[type[BaseException], ...]:
    # decord raises DECORDError from its C++ checks and RuntimeError when FFmpeg cannot open a file.
    return (decord.DECORDError, RuntimeError, IndexError, OSError)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _index_problem(wanted: list[int], total: int) -> str | None:
    if not wanted:
        return "no frame indices requested"
    if min(wanted) < 0:
        return f"negative frame index {min(wanted)}"
    if max(wanted) >= total:
        return f"frame index {max(wanted)} is beyond the video ({total} frames)"
    return None


def _read(path: str, indices: Sequence[int] | None) -> tuple[int, float, np.ndarray]:
    """``(len, avg_fps, frames)`` of ``path``: ``indices`` (or frame 0 when None), via one VideoReader.

    The reader lives only in this frame and is deleted before any error is raised: an
    exception's traceback would otherwise keep it (and its file descriptor) alive.
    """
    decord = _import_decord()
    check_file(path)
    wanted = None if indices is None else [int(i) for i in indices]
    problem: str | None = None
    result = (0, 0.0, np.zeros((0, 0, 0, 3), np.uint8))
    reader = None
    try:
        reader = decord.VideoReader(path, ctx=decord.cpu(0))
        total, fps = len(reader), float(reader.get_avg_fps())
        problem = _index_problem([0] if wanted is None else wanted, total)
        if problem is None:
            result = (total, fps, reader.get_batch([0] if wanted is None else wanted).asnumpy())
        elif wanted is None:  # video_info of a video with no frames: report it, do not fail the read
            result, problem = (total, fps, result[2]), None
    except _decord_errors(decord) as error:
        problem = f"cannot {'read' if wanted is None else 'decode'} video: {_first_line(error)}"
    finally:
        del reader
    if problem is not None:
        raise VideoDecodeError(path, problem)
    return result


def video_info(path: str | os.PathLike) -> tuple[int, float, int, int]:
    """``(total_frames, fps, height, width)`` of ``path`` as decord sees it.

    Raises:
        VideoDecodeError: the file is missing, not a video, corrupt, or has no frames.
    """
    path = os.fspath(path)
    total, fps, first = _read(path, None)
    if total <= 0 or not len(first):
        raise VideoDecodeError(path, "video has no frames")
    if not fps > 0:
        raise VideoDecodeError(path, "video has no frame rate")
    return int(total), fps, int(first.shape[1]), int(first.shape[2])


def _decode_video(path: str, indices: Sequence[int]) -> torch.Tensor:
    _, _, frames = _read(path, indices)
    return torch.from_numpy(np.ascontiguousarray(frames))


def decode_frames(source: VideoSource, indices: Sequence[int]) -> torch.Tensor:
    """The frames at ``indices`` of ``source``, uint8 RGB, shape ``(len(indices), H, W, 3)``.

    Args:
        source: a video file path (read with decord), or a frame folder / list of frame image
            paths (read with PIL).
        indices: frame numbers (positions in the list for frame images), any order, repeats allowed.

    Raises:
        VideoDecodeError: unreadable input, no indices, or an index beyond the video.
    """
    if is_frame_source(source):
        return decode_frame_images(source, indices)
    return _decode_video(os.fspath(source), indices)


def load_video_sample(request: FrameRequest) -> tuple[torch.Tensor, FramePlan]:
    """A request's clip sampled and resized as qwen-vl-utils' ``fetch_video`` would, read with decord.

    Same result and errors as :func:`medgrpo.data.decode_cpu.load_video_sample` (the plan from
    decord's own frame count and rate; frame lists through PIL).

    Returns:
        ``(frames, plan)``: uint8 ``(plan.num_frames, plan.height, plan.width, 3)`` and the plan.

    Raises:
        VideoDecodeError: unreadable input. ValueError: an impossible sampling request.
    """
    return load_with(request, _decode_video, info=video_info)


__all__ = ["decode_frames", "load_video_sample", "video_info"]
