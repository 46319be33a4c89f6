"""CPU fallback decoder: video files through PyAV, frame lists through PIL.

Frame selection and frame sizes come from :mod:`medgrpo.data.sampling` (qwen-vl-utils'
rules); this module only reads pixels and resizes them.

* :func:`video_info` - ``(total_frames, fps, height, width)`` of a video file. The frame
  count is the container's when it states one (MP4's sample table, AVI's header); WebM and
  Matroska state none (``stream.frames == 0``), and the frames are then counted by decoding
  the whole stream, which costs a full decode.
* :func:`decode_frames` - the frames at given indices, uint8 ``(N, H, W, 3)`` RGB. Video files
  are decoded sequentially from the start (no seeking, so no keyframe/seek inaccuracy) up to
  the largest requested index, keeping only requested frames; indices may be in any order
  and may repeat.
* :func:`load_video_sample` - a record's ``video`` (a file path, or a list of frame image
  paths) sampled and resized as :func:`~medgrpo.data.sampling.plan_frames` /
  :func:`~medgrpo.data.sampling.plan_frame_list` say.

Resize: ``torch.nn.functional.interpolate(mode="bicubic", antialias=True,
align_corners=False)`` on float32, then rounded and clamped to uint8. qwen-vl-utils uses
torchvision's ``resize(..., BICUBIC, antialias=True)`` on the uint8 tensor; the same kernel
in float differs from it by rounding only (at most a few levels on sharp edges). Frame lists
are first resized image by image to :func:`~medgrpo.data.sampling.frame_list_presize` with
PIL's bicubic, as qwen-vl-utils' ``fetch_image`` does, then to the plan's size.

Every failure to read (missing file, corrupt or truncated data, an index past the end, an
empty frame list) raises :class:`VideoDecodeError` naming the path and the reason.
Containers and image files are always closed.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
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


class VideoDecodeError(ValueError):
    """A video or frame list could not be read: ``path`` says which, ``reason`` why."""

    def __init__(self, path: object, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def _import_av():
    try:
        import av
    except ImportError as error:  # pragma: no cover - av is a dependency of this module
        raise ImportError("decoding video files on the CPU needs PyAV (pip install av)") from error
    return av


def check_file(path: str) -> None:
    """Raise :class:`VideoDecodeError` unless ``path`` is an existing regular file."""
    if not os.path.exists(path):
        raise VideoDecodeError(path, "no such file")
    if not os.path.isfile(path):
        raise VideoDecodeError(path, "not a regular file")


def _stream_fps(stream) -> float:
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate is not None and rate > 0:
            return float(rate)
    if stream.time_base and stream.duration and stream.frames:
        seconds = float(stream.duration * stream.time_base)
        if seconds > 0:
            return stream.frames / seconds
    return 0.0


def _open_video_stream(container, path: str):
    if not container.streams.video:
        raise VideoDecodeError(path, "no video stream")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    return stream


def video_info(path: str | os.PathLike) -> tuple[int, float, int, int]:
    """``(total_frames, fps, height, width)`` of the first video stream of ``path``.

    Raises:
        VideoDecodeError: the file is missing, not a video, corrupt, or has no frames.
    """
    av = _import_av()
    path = os.fspath(path)
    check_file(path)
    try:
        with av.open(path) as container:
            stream = _open_video_stream(container, path)
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


def _decode_video(path: str, indices: Sequence[int]) -> torch.Tensor:
    av = _import_av()
    check_file(path)
    wanted = check_indices(indices, path)
    needed = set(wanted)
    last = max(wanted)
    kept: dict[int, np.ndarray] = {}
    position = -1
    try:
        with av.open(path) as container:
            stream = _open_video_stream(container, path)
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
    shapes = {array.shape for array in kept.values()}
    if len(shapes) != 1:
        raise VideoDecodeError(path, f"frame size changes inside the video: {sorted(shapes)}")
    return torch.from_numpy(np.stack([kept[i] for i in wanted]))


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


def _decode_images(paths: Sequence[str], indices: Sequence[int], label: object) -> list:
    wanted = check_indices(indices, label, len(paths))
    cache = {i: _read_image(paths[i]) for i in dict.fromkeys(wanted)}
    sizes = {image.size for image in cache.values()}
    if len(sizes) != 1:
        raise VideoDecodeError(label, f"frames differ in size: {sorted(sizes)}")
    return [cache[i] for i in wanted]


def is_frame_source(source: VideoSource) -> bool:
    """Whether ``source`` is a frame list or folder (not a video file)."""
    return not isinstance(source, (str, os.PathLike)) or os.path.isdir(source)


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
        paths = frame_paths(source)
        label = source if isinstance(source, (str, os.PathLike)) else paths[0]
        images = _decode_images(paths, indices, label)
        return torch.from_numpy(np.stack([np.asarray(image) for image in images]))
    return _decode_video(os.fspath(source), indices)


def resize_frames(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """uint8 ``(T, H, W, 3)`` frames resized to ``(T, height, width, 3)``: bicubic, antialiased."""
    if frames.shape[1] == height and frames.shape[2] == width:
        return frames.clone()
    chw = frames.permute(0, 3, 1, 2).to(torch.float32)
    out = F.interpolate(chw, size=(height, width), mode="bicubic", antialias=True, align_corners=False)
    return out.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def _image_size(path: str) -> tuple[int, int]:
    """``(width, height)`` of an image file from its header (nothing decoded)."""
    from PIL import Image, UnidentifiedImageError

    check_file(path)
    try:
        with Image.open(path) as image:
            return image.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise VideoDecodeError(path, f"cannot read image: {error}") from error


def plan_source(
    video: VideoSource,
    *,
    fps: float = sampling.FPS,
    nframes: int | None = None,
    start_frame: int | None = None,
    end_frame: int | None = None,
    min_pixels: float | None = None,
    max_pixels: float | None = None,
    total_pixels: float = sampling.VIDEO_TOTAL_PIXELS,
    info: Callable[[str], tuple[int, float, int, int]] | None = None,
) -> tuple[list[str] | str, FramePlan]:
    """What a backend decodes and its plan, from headers only: every decoder's one planning step.

    Frame lists / folders: ``(frame paths, plan_frame_list(...))`` at ``fps`` as the list's
    frame rate, sized from the first image's header. Video files: ``(path, plan_frames(...))``
    from ``info(path)`` = ``(total_frames, fps, height, width)`` (default: :func:`video_info`,
    PyAV; a backend may pass its own reader's). Arguments as :func:`load_video_sample`.

    Raises:
        VideoDecodeError: unreadable input. ValueError: an impossible sampling request.
    """
    if is_frame_source(video):
        if nframes is not None or start_frame is not None or end_frame is not None:
            raise ValueError("nframes/start_frame/end_frame apply to video files, not to frame lists")
        paths = frame_paths(video)
        width, height = _image_size(paths[0])
        plan = sampling.plan_frame_list(
            len(paths),
            height,
            width,
            sample_fps=fps,
            min_pixels=min_pixels,
            max_pixels=max_pixels,
            total_pixels=total_pixels,
        )
        return paths, plan
    path = os.fspath(video)
    total, video_fps, height, width = (info or video_info)(path)
    plan = sampling.plan_frames(
        total,
        video_fps,
        height,
        width,
        fps=fps,
        nframes=nframes,
        min_pixels=sampling.VIDEO_MIN_PIXELS if min_pixels is None else min_pixels,
        max_pixels=max_pixels,
        total_pixels=total_pixels,
        start_frame=start_frame,
        end_frame=end_frame,
    )
    return path, plan


def load_video_sample(
    video: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    fps: float = sampling.FPS,
    nframes: int | None = None,
    start_frame: int | None = None,
    end_frame: int | None = None,
    min_pixels: float | None = None,
    max_pixels: float | None = None,
    total_pixels: float = sampling.VIDEO_TOTAL_PIXELS,
    region_box: RegionCaptionInfo | None = None,
) -> tuple[torch.Tensor, FramePlan]:
    """A record's video sampled and resized as qwen-vl-utils' ``fetch_video`` would.

    Args:
        video: a video file path (sampled with :func:`~medgrpo.data.sampling.plan_frames`),
            or a list of frame image paths / a frame folder (every frame, padded to an even
            count by repeating the last, :func:`~medgrpo.data.sampling.plan_frame_list`).
        fps: sampling rate for a video file; for a frame list, the list's frame rate
            (``sample_fps``, e.g. the record's ``metadata.fps``).
        nframes, start_frame, end_frame: frame count and clip (inclusive frame numbers) of a
            video file; a frame list is already the clip, so these must be None for one.
        min_pixels, max_pixels, total_pixels: pixel budget (``min_pixels`` defaults to
            ``VIDEO_MIN_PIXELS``).
        region_box: a region-caption record's box, drawn as :mod:`medgrpo.data.region_box`
            says (frame lists: on the frame after its first resize; video files: on the
            nearest sampled frame before the resize).

    Returns:
        ``(frames, plan)``: uint8 ``(plan.num_frames, plan.height, plan.width, 3)`` and the plan.

    Raises:
        VideoDecodeError: unreadable input. ValueError: an impossible sampling request.
    """
    source, plan = plan_source(
        video,
        fps=fps,
        nframes=nframes,
        start_frame=start_frame,
        end_frame=end_frame,
        min_pixels=min_pixels,
        max_pixels=max_pixels,
        total_pixels=total_pixels,
    )
    if isinstance(source, list):
        label = video if isinstance(video, (str, os.PathLike)) else source[0]
        images = _decode_images(source, plan.indices, label)
        width, height = images[0].size
        pre_height, pre_width = sampling.frame_list_presize(height, width, min_pixels=min_pixels, max_pixels=max_pixels)
        from PIL import Image

        presized: dict[int, torch.Tensor] = {}
        for index, image in zip(plan.indices, images):
            if index not in presized:
                presized[index] = torch.from_numpy(np.array(image.resize((pre_width, pre_height), Image.BICUBIC)))
        if region_box is not None:
            draw_region_box_(presized[region_box.frame_index], region_box.bbox)
        frames = torch.stack([presized[i] for i in plan.indices])
        return resize_frames(frames, plan.height, plan.width), plan

    path = source
    frames = _decode_video(path, plan.indices)
    if region_box is not None:
        draw_region_box_(frames[box_frame_position(plan.indices, region_box.frame_index)], region_box.bbox)
    return resize_frames(frames, plan.height, plan.width), plan


__all__ = [
    "VideoDecodeError",
    "check_file",
    "check_indices",
    "frame_paths",
    "is_frame_source",
    "plan_source",
    "decode_frames",
    "list_frame_files",
    "load_video_sample",
    "resize_frames",
    "video_info",
]
