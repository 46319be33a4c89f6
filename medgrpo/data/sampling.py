"""Which frames of a video the model sees, and at what size: qwen-vl-utils' rules, reproduced.

Qwen2.5-VL inference reads video through qwen-vl-utils (``fetch_video``); a model trained
on other frames or other sizes sees a different input distribution than at inference. This
module is the one place medgrpo decides frame indices, frame sizes and the sampling rate,
and it reproduces qwen-vl-utils 0.0.14 (the version the MedGRPO authors' inference code
vendors) number for number; tests compare it with qwen-vl-utils' own functions.

Two inputs, as in ``fetch_video``:

* a video file: :func:`plan_frames` (the decord/torchcodec readers: an optional clip, then
  ``linspace(start, end, n).round()`` over it);
* a list of frame images: :func:`plan_frame_list` (every frame, the list padded to an
  even length by repeating the last frame).

Everything here is arithmetic on sizes and counts: no decoder, no pixels. Decoders take a
:class:`FramePlan` and return ``plan.indices`` resized to ``(plan.height, plan.width)``
(bicubic, antialiased).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch

# qwen-vl-utils' constants: same names, same values (0.0.14; VIDEO_*_PIXELS and
# VIDEO_TOTAL_PIXELS are the names earlier releases gave the same numbers).
MAX_RATIO = 200
SPATIAL_MERGE_SIZE = 2
IMAGE_PATCH_SIZE = 14
IMAGE_FACTOR = IMAGE_PATCH_SIZE * SPATIAL_MERGE_SIZE  # 28: side of one merged 2x2 patch token
IMAGE_MIN_TOKEN_NUM = 4
IMAGE_MAX_TOKEN_NUM = 16384
VIDEO_MIN_TOKEN_NUM = 128
VIDEO_MAX_TOKEN_NUM = 768
VIDEO_MIN_PIXELS = VIDEO_MIN_TOKEN_NUM * IMAGE_FACTOR**2
VIDEO_MAX_PIXELS = VIDEO_MAX_TOKEN_NUM * IMAGE_FACTOR**2
# qwen-vl-utils reads MODEL_SEQ_LEN from the environment at import time; here it is fixed
# and a different budget is passed explicitly (``total_pixels=``).
MODEL_SEQ_LEN = 128000
VIDEO_TOTAL_PIXELS = MODEL_SEQ_LEN * IMAGE_FACTOR**2 * 0.9
FPS = 2.0
FRAME_FACTOR = 2
FPS_MIN_FRAMES = 4
FPS_MAX_FRAMES = 768
TEMPORAL_PATCH_SIZE = 2  # Qwen2.5-VL's vision tower merges 2 frames into one temporal patch

T = TypeVar("T")


@dataclass(frozen=True)
class FramePlan:
    """Frames to decode and the size to resize them to.

    Attributes:
        indices: frame numbers to read, in order (for a video file, frame numbers of the
            file; for a frame list, positions in the list, the last one repeated to pad).
        height, width: size of every frame after resizing, multiples of 28.
        sample_fps: frames per second of the sampled sequence (Qwen2.5-VL's ``fps``).
    """

    indices: tuple[int, ...]
    height: int
    width: int
    sample_fps: float

    @property
    def num_frames(self) -> int:
        return len(self.indices)

    @property
    def second_per_grid_ts(self) -> float:
        """Seconds covered by one temporal patch (Qwen2.5-VL's ``second_per_grid_ts``)."""
        return second_per_grid_ts(self.sample_fps)


def round_by_factor(number: float, factor: int) -> int:
    """Closest multiple of ``factor`` (Python's round: ties go to the even multiple)."""
    return round(number / factor) * factor


def ceil_by_factor(number: float, factor: int) -> int:
    """Smallest multiple of ``factor`` >= ``number``."""
    return math.ceil(number / factor) * factor


def floor_by_factor(number: float, factor: int) -> int:
    """Largest multiple of ``factor`` <= ``number``."""
    return math.floor(number / factor) * factor


def smart_resize(
    height: int,
    width: int,
    factor: int = IMAGE_FACTOR,
    min_pixels: float | None = None,
    max_pixels: float | None = None,
) -> tuple[int, int]:
    """Size (height, width) closest to the input with both sides multiples of ``factor``.

    The aspect ratio is kept as far as rounding allows and the area is brought into
    ``[min_pixels, max_pixels]`` (defaults: 4 and 16384 tokens of ``factor**2`` pixels,
    qwen-vl-utils' image budget). Sides round half to even (``round(70 / 28) == 2``).

    Raises:
        ValueError: a side is not positive, ``max_pixels < min_pixels`` (qwen-vl-utils
            asserts this), or the aspect ratio exceeds ``MAX_RATIO`` (200).
    """
    max_pixels = max_pixels if max_pixels is not None else IMAGE_MAX_TOKEN_NUM * factor**2
    min_pixels = min_pixels if min_pixels is not None else IMAGE_MIN_TOKEN_NUM * factor**2
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got height={height}, width={width}")
    if max_pixels < min_pixels:
        raise ValueError(f"max_pixels ({max_pixels}) must be >= min_pixels ({min_pixels})")
    if max(height, width) / min(height, width) > MAX_RATIO:
        raise ValueError(
            f"absolute aspect ratio must be smaller than {MAX_RATIO}, got {max(height, width) / min(height, width)}"
        )
    h_bar = max(factor, round_by_factor(height, factor))
    w_bar = max(factor, round_by_factor(width, factor))
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = floor_by_factor(height / beta, factor)
        w_bar = floor_by_factor(width / beta, factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = ceil_by_factor(height * beta, factor)
        w_bar = ceil_by_factor(width * beta, factor)
    return h_bar, w_bar


def smart_nframes(
    total_frames: int,
    video_fps: float,
    *,
    nframes: int | None = None,
    fps: float = FPS,
    min_frames: int = FPS_MIN_FRAMES,
    max_frames: int = FPS_MAX_FRAMES,
) -> int:
    """Number of frames to sample from a clip of ``total_frames`` frames at ``video_fps``.

    With ``nframes``, that count rounded to an even number (half to even: 5 -> 4, 7 -> 8);
    ``fps``, ``min_frames`` and ``max_frames`` are then ignored. Otherwise ``fps`` frames
    per second of video, clamped to ``[min_frames, max_frames]`` (rounded up and down to
    even) and to ``total_frames``, then rounded down to even.

    Raises:
        ValueError: the result is outside ``[FRAME_FACTOR, total_frames]`` (e.g. a
            one-frame clip, or ``nframes`` larger than the clip), or ``video_fps <= 0``.
    """
    if nframes is not None:
        count = round_by_factor(nframes, FRAME_FACTOR)
    else:
        if video_fps <= 0:
            raise ValueError(f"video_fps must be a positive number, got {video_fps}")
        low = ceil_by_factor(min_frames, FRAME_FACTOR)
        # qwen-vl-utils' default is min(FPS_MAX_FRAMES, total_frames); the clamp to
        # total_frames below makes the two forms give the same count.
        high = floor_by_factor(max_frames, FRAME_FACTOR)
        wanted = total_frames / video_fps * fps
        count = floor_by_factor(min(min(max(wanted, low), high), total_frames), FRAME_FACTOR)
    if not FRAME_FACTOR <= count <= total_frames:
        raise ValueError(f"nframes should in interval [{FRAME_FACTOR}, {total_frames}], but got {count}.")
    return count


def frame_range(
    total_frames: int,
    video_fps: float,
    *,
    start_frame: int | None = None,
    end_frame: int | None = None,
    video_start: float | None = None,
    video_end: float | None = None,
) -> tuple[int, int]:
    """First and last (inclusive) frame of the clip to sample from.

    Either frame numbers (``start_frame``/``end_frame``, e.g. a record's
    ``input_video_start_frame``/``input_video_end_frame``) or seconds
    (``video_start``/``video_end``, qwen-vl-utils' keys) or nothing (the whole video).
    Seconds are clamped to the video, the start rounded up and the end down to a frame
    (qwen-vl-utils' ``calculate_video_frame_range``); an end frame past the video is
    clamped to its last frame the same way.

    Raises:
        ValueError: ``total_frames`` or ``video_fps`` not positive, frames and seconds
            both given, a negative start frame, or a start not before the end.
    """
    if video_fps <= 0:
        raise ValueError("video_fps must be a positive number")
    if total_frames <= 0:
        raise ValueError("total_frames must be a positive integer")
    by_frames = start_frame is not None or end_frame is not None
    if by_frames and (video_start is not None or video_end is not None):
        raise ValueError("give the clip as start_frame/end_frame or as video_start/video_end, not both")
    if by_frames:
        start, end = _range_from_frames(total_frames, start_frame, end_frame)
    elif video_start is not None or video_end is not None:
        start, end = _range_from_seconds(total_frames, video_fps, video_start, video_end)
    else:
        return 0, total_frames - 1
    if start >= end:
        raise ValueError(
            f"Invalid clip: start frame {start} is not before end frame {end} "
            f"(video of {total_frames} frames at {video_fps} fps)"
        )
    return start, end


def _range_from_frames(total_frames: int, start_frame: int | None, end_frame: int | None) -> tuple[int, int]:
    start = 0 if start_frame is None else start_frame
    if start < 0:
        raise ValueError(f"start_frame must be >= 0, got {start}")
    end = total_frames - 1 if end_frame is None else min(end_frame, total_frames - 1)
    return start, end


def _range_from_seconds(
    total_frames: int, video_fps: float, video_start: float | None, video_end: float | None
) -> tuple[int, int]:
    max_duration = total_frames / video_fps
    start = 0 if video_start is None else math.ceil(max(0.0, min(video_start, max_duration)) * video_fps)
    if video_end is None:
        return start, total_frames - 1
    end = math.floor(max(0.0, min(video_end, max_duration)) * video_fps)
    return start, min(end, total_frames - 1)


def sample_indices(start: int, end: int, nframes: int) -> tuple[int, ...]:
    """``nframes`` frame numbers evenly spread over ``[start, end]``.

    ``torch.linspace(start, end, nframes).round()`` in float32 on the CPU, which is what
    qwen-vl-utils computes (float32 spacing and half-to-even rounding decide ties, so the
    float32 arithmetic is part of the contract).
    """
    grid = torch.linspace(start, end, nframes, dtype=torch.float32, device="cpu")
    return tuple(grid.round().long().tolist())


def video_max_pixels(
    nframes: int,
    *,
    min_pixels: float = VIDEO_MIN_PIXELS,
    max_pixels: float | None = None,
    total_pixels: float = VIDEO_TOTAL_PIXELS,
) -> float:
    """Per-frame pixel cap of a video of ``nframes`` frames.

    The video's ``total_pixels`` shared among its temporal patches of ``FRAME_FACTOR``
    frames, at most ``VIDEO_MAX_PIXELS`` and at least ``int(1.05 * min_pixels)``; a given
    ``max_pixels`` can only lower it.
    """
    dynamic = max(min(VIDEO_MAX_PIXELS, total_pixels / nframes * FRAME_FACTOR), int(min_pixels * 1.05))
    return dynamic if max_pixels is None else min(max_pixels, dynamic)


def pad_to_even(items: Sequence[T]) -> list[T]:
    """``items`` with its last element repeated once if its length is odd."""
    padded = list(items)
    if len(padded) % FRAME_FACTOR:
        padded.extend([padded[-1]] * (ceil_by_factor(len(padded), FRAME_FACTOR) - len(padded)))
    return padded


def second_per_grid_ts(sample_fps: float, temporal_patch_size: int = TEMPORAL_PATCH_SIZE) -> float:
    """Seconds of video covered by one temporal patch of ``temporal_patch_size`` frames."""
    if sample_fps <= 0:
        raise ValueError(f"sample_fps must be positive, got {sample_fps}")
    return temporal_patch_size / sample_fps


def plan_frames(
    total_frames: int,
    video_fps: float,
    height: int,
    width: int,
    *,
    fps: float = FPS,
    nframes: int | None = None,
    min_frames: int = FPS_MIN_FRAMES,
    max_frames: int = FPS_MAX_FRAMES,
    min_pixels: float = VIDEO_MIN_PIXELS,
    max_pixels: float | None = None,
    total_pixels: float = VIDEO_TOTAL_PIXELS,
    start_frame: int | None = None,
    end_frame: int | None = None,
    video_start: float | None = None,
    video_end: float | None = None,
) -> FramePlan:
    """Frames and frame size for a video file, as qwen-vl-utils' ``fetch_video`` picks them.

    Follows its decord/torchcodec readers: the clip (see :func:`frame_range`), the frame
    count (:func:`smart_nframes` on the clip's length), indices ``linspace(start, end, n)``
    rounded, ``sample_fps = n / clip_frames * video_fps``, and the size from
    :func:`smart_resize` under the per-frame cap of :func:`video_max_pixels`. (Its
    torchvision reader cuts a clip by timestamps instead; without a clip all agree.)

    Args:
        total_frames, video_fps: the file's frame count and average frame rate.
        height, width: the decoded frame size.
        fps, nframes, min_frames, max_frames: frame count options (:func:`smart_nframes`).
        min_pixels, max_pixels, total_pixels: pixel budget per frame and per video.
        start_frame, end_frame / video_start, video_end: an optional clip, in frames
            (inclusive) or in seconds.

    Returns:
        A :class:`FramePlan`; its indices are frame numbers of the file.

    Raises:
        ValueError: an impossible request (too few frames, a bad clip, a too extreme aspect
            ratio, ``max_pixels < min_pixels``...), with qwen-vl-utils' conditions.
    """
    start, end = frame_range(
        total_frames,
        video_fps,
        start_frame=start_frame,
        end_frame=end_frame,
        video_start=video_start,
        video_end=video_end,
    )
    clip_frames = end - start + 1
    count = smart_nframes(
        clip_frames, video_fps, nframes=nframes, fps=fps, min_frames=min_frames, max_frames=max_frames
    )
    cap = video_max_pixels(count, min_pixels=min_pixels, max_pixels=max_pixels, total_pixels=total_pixels)
    resized_height, resized_width = smart_resize(height, width, IMAGE_FACTOR, min_pixels=min_pixels, max_pixels=cap)
    sample_fps = count / max(clip_frames, 1e-6) * video_fps
    return FramePlan(sample_indices(start, end, count), resized_height, resized_width, sample_fps)


def plan_frame_list(
    num_frames: int,
    height: int,
    width: int,
    *,
    sample_fps: float = FPS,
    min_pixels: float | None = None,
    max_pixels: float | None = None,
    total_pixels: float = VIDEO_TOTAL_PIXELS,
) -> FramePlan:
    """Frames and frame size for a list of frame images, as qwen-vl-utils' ``fetch_video`` does.

    Every frame is used, in order; an odd-length list is padded with its last frame.
    qwen-vl-utils 0.0.14 resizes such frames twice, and the final size depends on both
    steps, so this reproduces both:

    1. each image on its own (``fetch_image``), to multiples of 56, not 28 (``fetch_video``
       passes its factor 28 where ``fetch_image`` expects the patch size 14), under
       ``min_pixels``/``max_pixels`` if given, else the image budget of 4 to 16384 tokens
       of 56x56 pixels: see :func:`frame_list_presize`;
    2. the stacked frames as a video (the size of :func:`plan_frames`) from that size.

    A decoder that wants qwen-vl-utils' pixels, not only its sizes, must resize each image
    to :func:`frame_list_presize` first (PIL's default bicubic), then to the plan's size.

    Args:
        num_frames: length of the frame list (at least 1).
        height, width: size of the frame images.
        sample_fps: frame rate of the list (the MedGRPO authors pass the record's
            ``metadata.fps``); qwen-vl-utils' default is 2.
        min_pixels, max_pixels, total_pixels: pixel budget, as for :func:`plan_frames`;
            ``min_pixels`` defaults to ``VIDEO_MIN_PIXELS`` for the video step.

    Returns:
        A :class:`FramePlan` whose indices are positions in the list.
    """
    if num_frames < 1:
        raise ValueError(f"a frame list needs at least one frame, got {num_frames}")
    indices = tuple(pad_to_even(range(num_frames)))
    pre_height, pre_width = frame_list_presize(height, width, min_pixels=min_pixels, max_pixels=max_pixels)
    video_min = VIDEO_MIN_PIXELS if min_pixels is None else min_pixels
    cap = video_max_pixels(len(indices), min_pixels=video_min, max_pixels=max_pixels, total_pixels=total_pixels)
    resized_height, resized_width = smart_resize(
        pre_height, pre_width, IMAGE_FACTOR, min_pixels=video_min, max_pixels=cap
    )
    return FramePlan(indices, resized_height, resized_width, float(sample_fps))


def frame_list_presize(
    height: int, width: int, *, min_pixels: float | None = None, max_pixels: float | None = None
) -> tuple[int, int]:
    """Size qwen-vl-utils 0.0.14 gives each image of a frame list before the video resize.

    ``smart_resize`` with factor 56 and the image budget of 56x56-pixel tokens (4 to 16384),
    unless ``min_pixels``/``max_pixels`` are given (they apply to both resize steps).
    """
    factor = 2 * IMAGE_FACTOR
    return smart_resize(height, width, factor, min_pixels=min_pixels, max_pixels=max_pixels)
