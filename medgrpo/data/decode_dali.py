"""NVIDIA DALI backend: decode and resize on the GPU (or with DALI's CPU operators), same frames as decode_cpu.

Which frames and what size are decided on the host (:func:`medgrpo.data.decode.plan_source`, a
:class:`~medgrpo.data.sampling.FramePlan` per source); DALI only reads pixels and resizes them, so
this backend returns the indices every other backend returns. Two small graphs (video, image) fed
from Python, one pipeline set per rank, outputs written into torch tensors on the device; bad
input is checked on the host, and a failed DALI run is retried sample by sample to skip (count,
log) or raise the bad source. Design and measured pixel differences: docs/design-data.md.

DALI is imported lazily: importing this module works without it, and using it raises an
ImportError that names the extra to install.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import torch

from medgrpo.data import sampling
from medgrpo.data.decode import (
    FrameRequest,
    VideoDecodeError,
    VideoSource,
    check_file,
    check_indices,
    check_same_size,
    frame_paths,
    is_frame_source,
    plan_source,
    resize_frames,
    source_label,
)
from medgrpo.data.records import RegionCaptionInfo
from medgrpo.data.region_box import box_frame_position, draw_region_box_
from medgrpo.data.sampling import FramePlan

logger = logging.getLogger(__name__)

INSTALL_HINT = "the DALI backend needs NVIDIA DALI: pip install 'medgrpo[video]' (or nvidia-dali-cuda120)"
CPU_VIDEO_CODECS = ("vp8", "vp9", "mjpeg")
_DALI_ERRORS = (RuntimeError, IndexError, ValueError)
_JPEG_START, _JPEG_END = b"\xff\xd8", b"\xff\xd9"
_JPEG_TAIL = 4096  # an end-of-image marker must lie this close to the end (allows trailing padding)

Batch = list[tuple[torch.Tensor, FramePlan, int]]
Item = tuple[VideoSource, FramePlan, RegionCaptionInfo | None]  # what to decode: source, plan, region box


def _import_dali() -> SimpleNamespace:
    try:
        from nvidia.dali import fn, types
        from nvidia.dali.pipeline import Pipeline
        from nvidia.dali.plugin.pytorch import feed_ndarray
    except ImportError as error:
        raise ImportError(INSTALL_HINT) from error
    return SimpleNamespace(fn=fn, types=types, Pipeline=Pipeline, feed_ndarray=feed_ndarray)


def dali_available() -> bool:
    """Whether NVIDIA DALI can be imported here."""
    try:
        _import_dali()
    except ImportError:
        return False
    return True


# ---------------------------------------------------------------------------------------------
# Host side: read bytes, check what can be checked before DALI sees the data.


def _read_bytes(path: str) -> np.ndarray:
    check_file(path)
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as error:
        raise VideoDecodeError(path, f"cannot read file: {error}") from None
    if data.size == 0:
        raise VideoDecodeError(path, "empty file")
    return data


def _read_image_bytes(path: str) -> tuple[np.ndarray, tuple[int, int]]:
    """An image file's bytes and its ``(width, height)`` from the header; truncated JPEGs rejected."""
    from PIL import Image, UnidentifiedImageError

    data = _read_bytes(path)
    raw = data.tobytes()
    end_marker = raw.rfind(_JPEG_END)
    if raw.startswith(_JPEG_START) and (end_marker < 0 or end_marker < len(raw) - _JPEG_TAIL):
        raise VideoDecodeError(path, "cannot read image: truncated JPEG (no end-of-image marker)")
    try:
        with Image.open(io.BytesIO(raw)) as image:
            size = image.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise VideoDecodeError(path, f"cannot read image: {error}") from None
    return data, size


def _size_input(height: int, width: int) -> np.ndarray:
    return np.array([height, width], dtype=np.float32)


@dataclass
class _Job:
    """One source prepared for DALI: its samples (one per video, one per distinct frame image)."""

    index: int
    label: str
    kind: str  # "video" or "image"
    plan: FramePlan
    samples: list[dict[str, np.ndarray]]
    inverse: list[int] | None = None  # image jobs: plan position -> decoded distinct frame
    shape: tuple[int, ...] = field(default=())
    box: RegionCaptionInfo | None = None  # drawn between the decoder's output and the final resize


def _video_size(path: str) -> tuple[int, int]:
    """``(height, width)`` of a video file's frames, from its header (PyAV; nothing decoded)."""
    import av

    try:
        with av.open(path) as container:
            context = container.streams.video[0].codec_context
            return context.height, context.width
    except (av.FFmpegError, IndexError) as error:
        raise VideoDecodeError(path, f"cannot read the video header: {error}") from error


def _video_job(index: int, path: str, plan: FramePlan, box: RegionCaptionInfo | None = None) -> _Job:
    data = _read_bytes(path)
    wanted = check_indices(plan.indices, path)
    # With a region box, DALI returns the frames at their own size: the box goes on before the resize.
    height, width = _video_size(path) if box is not None else (plan.height, plan.width)
    sample = {"encoded": data, "frames": np.asarray(wanted, np.int32), "size": _size_input(height, width)}
    return _Job(index, path, "video", plan, [sample], shape=(len(wanted), height, width, 3), box=box)


def _image_job(
    index: int,
    source: VideoSource,
    plan: FramePlan,
    min_pixels: float | None,
    max_pixels: float | None,
    box: RegionCaptionInfo | None = None,
) -> _Job:
    paths = frame_paths(source)
    label = source_label(source)
    wanted = check_indices(plan.indices, label, len(paths))
    distinct = list(dict.fromkeys(wanted))
    images = [_read_image_bytes(paths[i]) for i in distinct]
    width, height = check_same_size([size for _, size in images], [paths[i] for i in distinct])
    pre_height, pre_width = sampling.frame_list_presize(height, width, min_pixels=min_pixels, max_pixels=max_pixels)
    # With a region box, DALI stops at the first (per-image) resize: the box goes on, then the video resize.
    out_height, out_width = (pre_height, pre_width) if box is not None else (plan.height, plan.width)
    presize, size = _size_input(pre_height, pre_width), _size_input(out_height, out_width)
    samples = [{"encoded": data, "presize": presize, "size": size} for data, _ in images]
    position = {frame: k for k, frame in enumerate(distinct)}
    inverse = [position[i] for i in wanted]
    shape = (len(distinct), out_height, out_width, 3)
    return _Job(index, label, "image", plan, samples, inverse, shape, box)


# ---------------------------------------------------------------------------------------------
# DALI side: the two graphs and a pipeline runner.


def _resize(dali: SimpleNamespace, images, size):
    return dali.fn.resize(images, size=size, interp_type=dali.types.INTERP_CUBIC, antialias=True)


def _video_graph(dali: SimpleNamespace, device: str):
    fn, types = dali.fn, dali.types
    encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
    frames = fn.external_source(name="frames", dtype=types.INT32, ndim=1)
    size = fn.external_source(name="size", dtype=types.FLOAT, ndim=1)
    decoder_device = "mixed" if device == "gpu" else "cpu"
    video = fn.decoders.video(encoded, frames=frames, pad_mode="none", device=decoder_device)
    return _resize(dali, video, size)


def _image_graph(dali: SimpleNamespace, device: str):
    fn, types = dali.fn, dali.types
    encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
    presize = fn.external_source(name="presize", dtype=types.FLOAT, ndim=1)
    size = fn.external_source(name="size", dtype=types.FLOAT, ndim=1)
    decoder_device = "mixed" if device == "gpu" else "cpu"
    image = fn.decoders.image(encoded, device=decoder_device, output_type=types.RGB, adjust_orientation=False)
    return _resize(dali, _resize(dali, image, presize), size)


_GRAPHS = {
    "video": (_video_graph, ("encoded", "frames", "size")),
    "image": (_image_graph, ("encoded", "presize", "size")),
}


class _DaliRunError(Exception):
    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(reason)


def _dali_reason(error: BaseException) -> str:
    """The operator's own message out of DALI's error text (which also holds a graph traceback)."""
    text = str(error)
    if "encountered:" in text:
        text = text.split("encountered:", 1)[1]
    for marker in ("C++ context:", "Current pipeline object is no longer valid"):
        text = text.split(marker, 1)[0]
    return " ".join(text.split()) or type(error).__name__


class _Runner:
    """One DALI pipeline of one graph, built on first use and discarded after a failed run."""

    def __init__(self, kind: str, device: str, batch_size: int, num_threads: int, device_id: int | None):
        self.kind, self.device, self.batch_size = kind, device, batch_size
        self.num_threads, self.device_id = num_threads, device_id
        self.graph, self.inputs = _GRAPHS[kind]
        self.dali = _import_dali()
        self._pipe = None

    def _pipeline(self):
        if self._pipe is None:
            pipe = self.dali.Pipeline(
                batch_size=self.batch_size,
                num_threads=self.num_threads,
                device_id=self.device_id if self.device == "gpu" else None,
                prefetch_queue_depth=1,
                exec_dynamic=True,
            )
            with pipe:
                pipe.set_outputs(self.graph(self.dali, self.device))
            pipe.build()
            self._pipe = pipe
        return self._pipe

    def close(self) -> None:
        self._pipe = None

    def run(self, samples: Sequence[dict[str, np.ndarray]], targets: Sequence[torch.Tensor]) -> None:
        """Decode ``samples`` (at most ``batch_size``) into ``targets``, preallocated to the expected shapes."""
        stream = torch.cuda.current_stream(self.device_id) if self.device == "gpu" else None
        try:
            pipe = self._pipeline()
            for name in self.inputs:
                pipe.feed_input(name, [sample[name] for sample in samples])
            (outputs,) = pipe.run(stream) if stream is not None else pipe.run()
            for k, target in enumerate(targets):
                self._copy(outputs[k], target, stream)
        except _DaliRunError:
            self.close()
            raise
        except _DALI_ERRORS as error:
            self.close()
            raise _DaliRunError(_dali_reason(error)) from None

    def _copy(self, tensor, target: torch.Tensor, stream) -> None:
        shape = tuple(tensor.shape())
        if shape != tuple(target.shape):
            raise _DaliRunError(f"decoded shape {shape}, expected {tuple(target.shape)}")
        self.dali.feed_ndarray(tensor, target, cuda_stream=stream)


def _pack(jobs: Sequence[_Job], capacity: int) -> list[list[_Job]]:
    """Consecutive jobs grouped so each group's samples fit one run (a job larger than one run stays alone)."""
    groups: list[list[_Job]] = []
    used = capacity
    for job in jobs:
        if used + len(job.samples) > capacity:
            groups.append([])
            used = 0
        groups[-1].append(job)
        used += len(job.samples)
    return groups


# ---------------------------------------------------------------------------------------------
# The loader.


class DaliVideoLoader:
    """Batches of decoded, resized videos for one rank, decoded by DALI.

    Args:
        sources: every source of the dataset (all ranks): video file paths, frame folders or
            lists of frame image paths.
        plans: one :class:`~medgrpo.data.sampling.FramePlan` per source (from
            :func:`~medgrpo.data.sampling.plan_frames` / :func:`~medgrpo.data.sampling.plan_frame_list`).
        rank, world_size: this rank keeps ``sources[rank::world_size]`` (every source belongs to
            exactly one rank; shards differ in length by at most one).
        batch_size: sources per batch (and videos per DALI run).
        device: ``"gpu"`` (NVDEC/nvJPEG, output on ``cuda:device_id``) or ``"cpu"``; default:
            ``"gpu"`` when CUDA is available.
        num_threads: DALI worker threads per pipeline.
        device_id: CUDA device of this rank (default: torch's current device).
        min_pixels, max_pixels: the pixel budget the frame-list plans were made with (it
            decides the first, per-image resize of frame lists, as in qwen-vl-utils).
        frames_per_run: frame images per DALI run of the image pipeline.
        on_error: ``"skip"`` (count, log, leave the source out of its batch) or ``"raise"``.
        region_boxes: per source, a region-caption box to draw (or None), as
            :mod:`medgrpo.data.region_box` says; those sources skip DALI's final resize and are
            resized with :func:`~medgrpo.data.decode.resize_frames` on the device after the box.

    Iterating yields one list per ``batch_size`` sources of the shard, in order, of
    ``(frames, plan, source_index)``: ``frames`` uint8 ``(plan.num_frames, plan.height,
    plan.width, 3)`` on the loader's device. Skipped sources are missing from their list (a list
    may be empty). Iterate as many epochs as wanted; call :meth:`close` (or use ``with``) to free
    the pipelines.
    """

    def __init__(
        self,
        sources: Sequence[VideoSource],
        plans: Sequence[FramePlan],
        *,
        rank: int = 0,
        world_size: int = 1,
        batch_size: int = 1,
        device: str | None = None,
        num_threads: int = 2,
        device_id: int | None = None,
        min_pixels: float | None = None,
        max_pixels: float | None = None,
        frames_per_run: int = 64,
        on_error: str = "skip",
        region_boxes: Sequence[RegionCaptionInfo | None] | None = None,
    ):
        device = device or ("gpu" if torch.cuda.is_available() else "cpu")
        _check_loader_args(sources, plans, rank, world_size, batch_size, device, on_error)
        if region_boxes is not None and len(region_boxes) != len(sources):
            raise ValueError(f"got {len(sources)} sources but {len(region_boxes)} region boxes")
        self.region_boxes = list(region_boxes) if region_boxes is not None else [None] * len(sources)
        _import_dali()  # fail now, with the install hint, rather than at the first batch
        self.sources, self.plans = list(sources), list(plans)
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        self.device, self.on_error = device, on_error
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        if device == "gpu":
            device_id = torch.cuda.current_device() if device_id is None else device_id
        self.torch_device = torch.device("cuda", device_id) if device == "gpu" else torch.device("cpu")
        self.shard = list(range(rank, len(self.sources), world_size))
        self.skipped_sources: list[tuple[int, str, str]] = []
        self._runners = {
            "video": _Runner("video", device, batch_size, num_threads, device_id),
            "image": _Runner("image", device, frames_per_run, num_threads, device_id),
        }

    @property
    def skipped(self) -> int:
        """Sources skipped so far (over all epochs); :attr:`skipped_sources` holds ``(index, path, reason)``."""
        return len(self.skipped_sources)

    def __len__(self) -> int:
        return -(-len(self.shard) // self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        for start in range(0, len(self.shard), self.batch_size):
            yield self._load_batch(self.shard[start : start + self.batch_size])

    def close(self) -> None:
        """Release the DALI pipelines (their threads and buffers); a later epoch rebuilds them."""
        for runner in self._runners.values():
            runner.close()

    def __enter__(self) -> DaliVideoLoader:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def decode_items(self, items: Sequence[Item]) -> list[torch.Tensor | VideoDecodeError]:
        """Decode any ``(source, plan, region box)`` items with this loader's pipelines (not its shard).

        For a loader that gets its work from elsewhere (e.g. a record sampler): returns, per item,
        its uint8 frames on the loader's device, or the :class:`VideoDecodeError` that made DALI
        (or the host checks) refuse it. Failures are also counted in :attr:`skipped_sources`.
        """
        before = len(self.skipped_sources)
        frames = self._load({i: item for i, item in enumerate(items)})
        errors = {index: VideoDecodeError(path, reason) for index, path, reason in self.skipped_sources[before:]}
        return [frames[i] if i in frames else errors[i] for i in range(len(items))]

    def _prepare(self, index: int, source: VideoSource, plan: FramePlan, box: RegionCaptionInfo | None) -> _Job:
        if is_frame_source(source):
            return _image_job(index, source, plan, self.min_pixels, self.max_pixels, box)
        return _video_job(index, os.fspath(source), plan, box)

    def _load_batch(self, positions: Sequence[int]) -> Batch:
        items = {i: (self.sources[i], self.plans[i], self.region_boxes[i]) for i in positions}
        frames = self._load(items)
        return [(frames[i], self.plans[i], i) for i in positions if i in frames]

    def _load(self, items: dict[int, Item]) -> dict[int, torch.Tensor]:
        jobs = []
        for index, (source, plan, box) in items.items():
            try:
                jobs.append(self._prepare(index, source, plan, box))
            except VideoDecodeError as error:
                self._fail(index, error)
        frames: dict[int, torch.Tensor] = {}
        for kind in ("video", "image"):
            group = [job for job in jobs if job.kind == kind]
            for packed in _pack(group, self._runners[kind].batch_size):
                frames.update(self._decode(packed))
        return frames

    def _decode(self, jobs: list[_Job]) -> dict[int, torch.Tensor]:
        """Decode ``jobs`` in one run; after a failure, each job alone, skipping the bad ones."""
        try:
            return self._run(jobs)
        except _DaliRunError as failure:
            if len(jobs) > 1:
                decoded: dict[int, torch.Tensor] = {}
                for job in jobs:
                    decoded.update(self._decode([job]))
                return decoded
            self._fail(jobs[0].index, VideoDecodeError(jobs[0].label, self._explain(jobs[0], failure.reason)))
            return {}

    def _run(self, jobs: list[_Job]) -> dict[int, torch.Tensor]:
        runner = self._runners[jobs[0].kind]
        outputs = {job.index: torch.empty(job.shape, dtype=torch.uint8, device=self.torch_device) for job in jobs}
        samples, targets = [], []
        for job in jobs:
            samples.extend(job.samples)
            out = outputs[job.index]
            targets.extend([out] if job.kind == "video" else list(out.unbind(0)))
        for start in range(0, len(samples), runner.batch_size):
            stop = start + runner.batch_size
            runner.run(samples[start:stop], targets[start:stop])
        return {job.index: _finish(job, outputs[job.index]) for job in jobs}

    def _explain(self, job: _Job, reason: str) -> str:
        if job.kind == "video" and self.device == "cpu":
            codec = _video_codec(job.label)
            if codec is not None and codec not in CPU_VIDEO_CODECS:
                return (
                    f"DALI's CPU video decoder cannot read {codec} (only {', '.join(CPU_VIDEO_CODECS)}): "
                    f"decode it with device='gpu' or medgrpo.data.decode_cpu ({reason})"
                )
        return f"cannot decode {'video' if job.kind == 'video' else 'image'}: {reason}"

    def _fail(self, index: int, error: VideoDecodeError) -> None:
        if self.on_error == "raise":
            raise error
        self.skipped_sources.append((index, error.path, error.reason))
        logger.warning("DALI loader (rank %d) skips source %d: %s", self.rank, index, error)


def _finish(job: _Job, frames: torch.Tensor) -> torch.Tensor:
    if job.box is not None:
        _draw_box(job, frames)
    if job.inverse is not None and job.inverse != list(range(frames.shape[0])):
        frames = frames[torch.tensor(job.inverse, device=frames.device)]
    if job.box is not None:
        frames = resize_frames(frames, job.plan.height, job.plan.width)
    return frames


def _draw_box(job: _Job, frames: torch.Tensor) -> None:
    """The region box on the decoded frame (a frame list's distinct frame, so its padded copy has it too)."""
    if job.kind == "image":
        position = job.inverse[job.box.frame_index]
    else:
        position = box_frame_position(job.plan.indices, job.box.frame_index)
    draw_region_box_(frames[position], job.box.bbox)


def _video_codec(path: str) -> str | None:
    """The codec name of ``path``'s first video stream (via PyAV), or None when it cannot tell."""
    try:
        import av

        with av.open(path) as container:
            return container.streams.video[0].codec_context.name if container.streams.video else None
    except Exception:  # noqa: BLE001 - only used to word an error message better
        return None


def _check_loader_args(
    sources: Sequence, plans: Sequence, rank: int, world_size: int, batch_size: int, device: str, on_error: str
) -> None:
    if len(sources) != len(plans):
        raise ValueError(f"got {len(sources)} sources but {len(plans)} plans")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if device not in ("gpu", "cpu"):
        raise ValueError(f"device must be 'gpu' or 'cpu', got {device!r}")
    if on_error not in ("skip", "raise"):
        raise ValueError(f"on_error must be 'skip' or 'raise', got {on_error!r}")


# ---------------------------------------------------------------------------------------------
# One-off use.


def load_video_sample(
    request: FrameRequest, *, device: str | None = None, num_threads: int = 2
) -> tuple[torch.Tensor, FramePlan]:
    """A request's clip sampled and resized as qwen-vl-utils' ``fetch_video`` would, decoded by DALI.

    Same plan and errors as :func:`medgrpo.data.decode_cpu.load_video_sample` (a video file's
    frame count and rate are read with PyAV, so the plan is the same), on ``device`` (``"gpu"``
    when CUDA is available, else ``"cpu"``) with DALI's ``num_threads``. Builds a one-source
    :class:`DaliVideoLoader` and frees it before returning; for many samples use the loader.

    Returns:
        ``(frames, plan)``: uint8 ``(plan.num_frames, plan.height, plan.width, 3)`` on ``device``.

    Raises:
        VideoDecodeError: unreadable input. ValueError: an impossible sampling request.
        ImportError: DALI is not installed.
    """
    device = device or ("gpu" if torch.cuda.is_available() else "cpu")
    _import_dali()
    source, plan = plan_source(request)
    with DaliVideoLoader(
        [source],
        [plan],
        device=device,
        num_threads=num_threads,
        min_pixels=request.min_pixels,
        max_pixels=request.max_pixels,
        on_error="raise",
        region_boxes=[request.region_box],
    ) as loader:
        ((frames, plan, _),) = next(iter(loader))
    return frames, plan


__all__ = ["CPU_VIDEO_CODECS", "DaliVideoLoader", "INSTALL_HINT", "dali_available", "load_video_sample"]
