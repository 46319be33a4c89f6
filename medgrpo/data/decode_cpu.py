"""CPU decoder: video files through PyAV, frame lists through PIL.

* :func:`decode_frames` - the frames at given indices, uint8 ``(N, H, W, 3)`` RGB. Video files
  are decoded sequentially from the start (no seeking, so no keyframe/seek inaccuracy) up to
  the largest requested index, keeping only requested frames; indices may be in any order
  and may repeat.
* :func:`load_video_sample` - a :class:`~medgrpo.data.decode.FrameRequest` sampled and resized
  as qwen-vl-utils' ``fetch_video`` would (plan, frame lists and resize from
  :mod:`medgrpo.data.decode`).

Every failure to read raises :class:`~medgrpo.data.decode.VideoDecodeError` naming the path
and the reason. Containers and image files are always closed.
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
    check_indices,
    check_same_size,
    decode_frame_images,
    import_av,
    is_frame_source,
    load_with,
    open_video_stream,
    video_info,
)
from medgrpo.data.sampling import FramePlan


def _decode_video(path: str, indices: Sequence[int]) -> torch.Tensor:
    av = import_av()
    check_file(path)
    wanted = check_indices(indices, path)
    needed = set(wanted)
    last = max(wanted)
    kept: dict[int, np.ndarray] = {}
    position = -1
    try:
        with av.open(path) as container:
            stream = open_video_stream(container, path)
            for position, frame in enumerate(container.decode(stream)):
                if position in needed:
                    kept[position] = frame.to_ndarray(format="rgb24")
                if position >= last:
                    break
    except VideoDecodeError:
        raise
    except (av.FFmpegError, OSError, UnicodeDecodeError) as error:
        raise VideoDecodeError(path, f"cannot decode video: {error}") from error
    if last not in kept:
        raise VideoDecodeError(path, f"frame index {last} is beyond the video ({position + 1} frames decoded)")
    positions = sorted(kept)
    check_same_size([kept[i].shape[1::-1] for i in positions], [f"frame {i}" for i in positions], source=path)
    return torch.from_numpy(np.stack([kept[i] for i in wanted]))


def decode_frames(source: VideoSource, indices: Sequence[int]) -> torch.Tensor:
    """The frames at ``indices`` of ``source``, uint8 RGB, shape ``(len(indices), H, W, 3)``.

    Args:
        source: a video file path, a folder of frame images (sorted by file name), or a list
            of frame image paths.
        indices: frame numbers (positions in the list for frame images), any order, repeats allowed.

    Raises:
        VideoDecodeError: unreadable input, no indices, or an index beyond the video.
    """
    if is_frame_source(source):
        return decode_frame_images(source, indices)
    return _decode_video(os.fspath(source), indices)


def load_video_sample(request: FrameRequest) -> tuple[torch.Tensor, FramePlan]:
    """A request's clip sampled and resized as qwen-vl-utils' ``fetch_video`` would (PyAV, PIL).

    Returns:
        ``(frames, plan)``: uint8 ``(plan.num_frames, plan.height, plan.width, 3)`` and the plan.

    Raises:
        VideoDecodeError: unreadable input. ValueError: an impossible sampling request.
    """
    return load_with(request, _decode_video)


__all__ = ["decode_frames", "load_video_sample", "video_info"]
