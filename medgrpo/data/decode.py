"""What every video decoder shares: the request, its plan from headers, the checks, the resize, the error.

The decoders (:mod:`~medgrpo.data.decode_cpu` PyAV, :mod:`~medgrpo.data.decode_decord` decord,
:mod:`~medgrpo.data.decode_dali` DALI) are siblings built on this module: each reads pixels its
own way; which frames, at what size, is decided here from headers only (PyAV for video files,
PIL for frame images) with :mod:`medgrpo.data.sampling`, so every backend returns the same
frame indices for the same :class:`FrameRequest`. Frame lists are read with PIL here too
(:func:`load_frame_list`), as qwen-vl-utils' ``fetch_image`` reads them; the CPU decoders use
that path unchanged. Every failure to read raises :class:`VideoDecodeError` naming the path.
Design notes: docs/design-data.md.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from medgrpo.data import sampling
from medgrpo.data.records import RegionCaptionInfo
from medgrpo.data.region_box import box_frame_position, draw_region_box_
from medgrpo.data.sampling import FramePlan

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")

VideoSource = str | os.PathLike | Sequence[str | os.PathLike]
VideoInfo = Callable[[str], tuple[int, float, int, int]]
ReadVideo = Callable[[str, Sequence[int]], torch.Tensor]


class VideoDecodeError(ValueError):
    """A video or frame list could not be read: ``path`` says which, ``reason`` why."""

    def __init__(self, path: object, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


@dataclass(frozen=True)
class FrameRequest:
    """Which clip of a record's video to load, and at what pixel budget: every decoder's input.

    Attributes:
        video: a video file path, or a list of frame image paths / a frame folder.
        fps: sampling rate for a video file; for a frame list, the list's frame rate
            (``sample_fps``, e.g. the record's ``metadata.fps``).
        nframes, start_frame, end_frame: frame count and clip (inclusive frame numbers) of a
            video file; a frame list is already the clip, so these must be None for one.
        min_pixels, max_pixels, total_pixels: pixel budget (``min_pixels`` defaults to
            ``VIDEO_MIN_PIXELS`` for video files).
        region_box: a region-caption record's box, drawn as :mod:`medgrpo.data.region_box`
            says (frame lists: on the frame after its first resize; video files: on the
            nearest sampled frame before the resize).
    """

    video: VideoSource
    fps: float = sampling.FPS
    nframes: int | None = None
    start_frame: int | None = None
    end_frame: int | None = None
    min_pixels: float | None = None
    max_pixels: float | None = None
    total_pixels: float = sampling.VIDEO_TOTAL_PIXELS
    region_box: RegionCaptionInfo | None = None


# --- files and indices ---------------------------------------------------------------------


def check_file(path: str) -> None:
    """Raise :class:`VideoDecodeError` unless ``path`` is an existing regular file."""
    if not os.path.exists(path):
        raise VideoDecodeError(path, "no such file")
    if not os.path.isfile(path):
        raise VideoDecodeError(path, "not a regular file")


def check_indices(indices: Sequence[int], label: object, length: int | None = None) -> list[int]:
    """``indices`` as ints; :class:`VideoDecodeError` when empty, negative, or (given ``length``) past the end."""
    wanted = [int(i) for i in indices]
    if not wanted:
        raise VideoDecodeError(label, "no frame indices requested")
    if min(wanted) < 0:
        raise VideoDecodeError(label, f"negative frame index {min(wanted)}")
    if length is not None and max(wanted) >= length:
        raise VideoDecodeError(label, f"frame index {max(wanted)} is beyond the frame list ({length} frames)")
    return wanted


def list_frame_files(directory: str | os.PathLike) -> list[str]:
    """Image files of a frame folder (by extension), sorted by name."""
    folder = Path(directory)
    names = sorted(p.name for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    return [str(folder / name) for name in names]


def frame_paths(source: VideoSource) -> list[str]:
    """The image paths of a frame folder (sorted) or frame list; :class:`VideoDecodeError` when there are none."""
    if isinstance(source, (str, os.PathLike)):
        paths = list_frame_files(source)
        if not paths:
            raise VideoDecodeError(source, "frame folder holds no images")
        return paths
    paths = [os.fspath(p) for p in source]
    if not paths:
        raise VideoDecodeError("<frame list>", "empty frame list")
    return paths


def is_frame_source(source: VideoSource) -> bool:
    """Whether ``source`` is a frame list or folder (not a video file)."""
    return not isinstance(source, (str, os.PathLike)) or os.path.isdir(source)


def source_label(source: VideoSource) -> str:
    """The path an error about ``source`` names: the file or folder, else the list's first frame."""
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    return os.fspath(source[0]) if len(source) else "<frame list>"


# --- headers ---------------------------------------------------------------------------------


def import_av():
    """PyAV, or an ImportError saying how to install it."""
    try:
        import av
    except ImportError as error:  # pragma: no cover - av is a dependency of the package
        raise ImportError("decoding video files on the CPU needs PyAV (pip install av)") from error
    return av


def open_video_stream(container, path: str):
    """The first video stream of an open PyAV ``container``, decoded with FFmpeg's threads."""
    if not container.streams.video:
        raise VideoDecodeError(path, "no video stream")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    return stream


def _stream_fps(stream) -> float:
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate is not None and rate > 0:
            return float(rate)
    if stream.time_base and stream.duration and stream.frames:
        seconds = float(stream.duration * stream.time_base)
        if seconds > 0:
            return stream.frames / seconds
    return 0.0


def video_info(path: str | os.PathLike) -> tuple[int, float, int, int]:
    """``(total_frames, fps, height, width)`` of the first video stream of ``path`` (PyAV).

    The frame count is the container's when it states one (MP4's sample table, AVI's header);
    WebM and Matroska state none, and the frames are then counted by decoding the stream.

    Raises:
        VideoDecodeError: the file is missing, not a video, corrupt, or has no frames.
    """
    av = import_av()
    path = os.fspath(path)
    check_file(path)
    try:
        with av.open(path) as container:
            stream = open_video_stream(container, path)
            fps = _stream_fps(stream)
            height, width = stream.codec_context.height, stream.codec_context.width
            total = stream.frames
            if total <= 0 or height <= 0 or width <= 0:
                total = 0
                for frame in container.decode(stream):
                    if total == 0:
                        height, width = frame.height, frame.width
                    total += 1
    except VideoDecodeError:
        raise
    except (av.FFmpegError, OSError, UnicodeDecodeError) as error:
        raise VideoDecodeError(path, f"cannot read video: {error}") from error
    if total <= 0:
        raise VideoDecodeError(path, "video has no frames")
    if fps <= 0:
        raise VideoDecodeError(path, "video has no frame rate")
    return int(total), fps, int(height), int(width)


def image_size(path: str) -> tuple[int, int]:
    """``(width, height)`` of an image file from its header (nothing decoded)."""
    from PIL import Image, UnidentifiedImageError

    check_file(path)
    try:
        with Image.open(path) as image:
            return image.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise VideoDecodeError(path, f"cannot read image: {error}") from error


def plan_source(request: FrameRequest, *, info: VideoInfo = video_info) -> tuple[list[str] | str, FramePlan]:
    """What a backend decodes and its plan, from headers only: every decoder's one planning step.

    Frame lists / folders: ``(frame paths, plan_frame_list(...))`` at ``request.fps`` as the
    list's frame rate, sized from the first image's header. Video files: ``(path,
    plan_frames(...))`` from ``info(path)`` = ``(total_frames, fps, height, width)`` (default:
    :func:`video_info`, PyAV; a backend may pass its own reader's).

    Raises:
        VideoDecodeError: unreadable input. ValueError: an impossible sampling request.
    """
    r = request
    if is_frame_source(r.video):
        if r.nframes is not None or r.start_frame is not None or r.end_frame is not None:
            raise ValueError("nframes/start_frame/end_frame apply to video files, not to frame lists")
        paths = frame_paths(r.video)
        width, height = image_size(paths[0])
        budget = {"min_pixels": r.min_pixels, "max_pixels": r.max_pixels, "total_pixels": r.total_pixels}
        return paths, sampling.plan_frame_list(len(paths), height, width, sample_fps=r.fps, **budget)
    path = os.fspath(r.video)
    total, video_fps, height, width = info(path)
    plan = sampling.plan_frames(
        total,
        video_fps,
        height,
        width,
        fps=r.fps,
        nframes=r.nframes,
        min_pixels=sampling.VIDEO_MIN_PIXELS if r.min_pixels is None else r.min_pixels,
        max_pixels=r.max_pixels,
        total_pixels=r.total_pixels,
        start_frame=r.start_frame,
        end_frame=r.end_frame,
    )
    return path, plan


# --- pixels ----------------------------------------------------------------------------------


def resize_frames(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """uint8 ``(T, H, W, 3)`` frames resized to ``(T, height, width, 3)``: bicubic, antialiased.

    ``torch.nn.functional.interpolate(mode="bicubic", antialias=True)`` on float32, rounded and
    clamped to uint8: torchvision's uint8 resize (qwen-vl-utils') up to rounding.
    """
    if frames.shape[1] == height and frames.shape[2] == width:
        return frames.clone()
    chw = frames.permute(0, 3, 1, 2).to(torch.float32)
    out = F.interpolate(chw, size=(height, width), mode="bicubic", antialias=True, align_corners=False)
    return out.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def _read_image(path: str):
    """One image file as an RGB PIL image (grayscale, CMYK, palette, alpha converted)."""
    from PIL import Image, UnidentifiedImageError

    check_file(path)
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode == "RGB":
                return image.copy()
            if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
                # Composite onto white, as qwen-vl-utils' to_rgb does for transparent images.
                rgba = image.convert("RGBA")
                background = Image.new("RGB", rgba.size, (255, 255, 255))
                background.paste(rgba, mask=rgba.getchannel("A"))
                return background
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise VideoDecodeError(path, f"cannot read image: {error}") from error


def check_same_size(
    sizes: Sequence[tuple[int, int]], frames: Sequence[str], *, source: str | None = None
) -> tuple[int, int]:
    """The one ``(width, height)`` of a clip's frames; :class:`VideoDecodeError` naming the odd frame if not.

    ``sizes[k]`` is the size of frame ``frames[k]``: its image path for a frame list (the
    error then names that file), or a name such as ``"frame 12"`` inside the video file
    ``source`` (the error names the video and the frame). The clip's size is the most common
    one (the first frame's on a tie), so the error names the frame that differs from the
    others, not the clip's first frame.
    """
    counts = Counter(sizes)
    if len(counts) <= 1:
        return sizes[0]
    (width, height), _ = counts.most_common(1)[0]  # ties: the size seen first
    odd = next(k for k, size in enumerate(sizes) if size != (width, height))
    others = len(sizes) - counts[(width, height)] - 1
    more = f" ({others} more frames differ too)" if others else ""
    odd_width, odd_height = sizes[odd]
    which = "frame" if source is None else frames[odd]
    reason = f"{which} is {odd_width}x{odd_height}, the other frames are {width}x{height}{more}"
    raise VideoDecodeError(frames[odd] if source is None else source, reason)


def _read_images(paths: Sequence[str], indices: Sequence[int], label: object) -> list:
    wanted = check_indices(indices, label, len(paths))
    cache = {i: _read_image(paths[i]) for i in dict.fromkeys(wanted)}
    check_same_size([image.size for image in cache.values()], [paths[i] for i in cache])
    return [cache[i] for i in wanted]


def decode_frame_images(source: VideoSource, indices: Sequence[int]) -> torch.Tensor:
    """The frames at ``indices`` of a frame folder or list (PIL), uint8 RGB ``(len(indices), H, W, 3)``."""
    paths = frame_paths(source)
    images = _read_images(paths, indices, source_label(source))
    return torch.from_numpy(np.stack([np.asarray(image) for image in images]))


def load_frame_list(paths: Sequence[str], plan: FramePlan, request: FrameRequest) -> torch.Tensor:
    """A frame list's planned frames as qwen-vl-utils reads them: PIL bicubic to
    :func:`~medgrpo.data.sampling.frame_list_presize` image by image, the region box, then
    :func:`resize_frames` to the plan's size."""
    from PIL import Image

    images = _read_images(paths, plan.indices, source_label(request.video))
    width, height = images[0].size
    pre_height, pre_width = sampling.frame_list_presize(
        height, width, min_pixels=request.min_pixels, max_pixels=request.max_pixels
    )
    presized: dict[int, torch.Tensor] = {}
    for index, image in zip(plan.indices, images):
        if index not in presized:
            presized[index] = torch.from_numpy(np.array(image.resize((pre_width, pre_height), Image.BICUBIC)))
    if request.region_box is not None:
        draw_region_box_(presized[request.region_box.frame_index], request.region_box.bbox)
    frames = torch.stack([presized[i] for i in plan.indices])
    return resize_frames(frames, plan.height, plan.width)


def load_with(
    request: FrameRequest, read_video: ReadVideo, info: VideoInfo = video_info
) -> tuple[torch.Tensor, FramePlan]:
    """A request's clip sampled and resized as qwen-vl-utils' ``fetch_video`` would.

    Frame lists go through :func:`load_frame_list`; a video file is planned with ``info``,
    its planned frames read with ``read_video(path, indices)`` (uint8 ``(N, H, W, 3)``), the
    region box drawn on the nearest sampled frame, then resized to the plan's size.
    """
    source, plan = plan_source(request, info=info)
    if isinstance(source, list):
        return load_frame_list(source, plan, request), plan
    frames = read_video(source, plan.indices)
    box = request.region_box
    if box is not None:
        draw_region_box_(frames[box_frame_position(plan.indices, box.frame_index)], box.bbox)
    return resize_frames(frames, plan.height, plan.width), plan


__all__ = [
    "FrameRequest",
    "IMAGE_EXTENSIONS",
    "VideoDecodeError",
    "VideoSource",
    "check_file",
    "check_indices",
    "check_same_size",
    "decode_frame_images",
    "frame_paths",
    "image_size",
    "is_frame_source",
    "list_frame_files",
    "load_frame_list",
    "load_with",
    "plan_source",
    "resize_frames",
    "source_label",
    "video_info",
]
