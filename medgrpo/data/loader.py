"""Records → decoded, sampled clips, in worker processes, with bad samples counted and skipped.

:class:`VideoDataset` turns a record (a :class:`~medgrpo.data.records.VideoRecord`, or a raw
entry of a lazily loaded :class:`~medgrpo.data.records.RecordDataset`) into a
:class:`VideoSample`: uint8 frames sampled and sized by :mod:`medgrpo.data.sampling`, the
region-caption box drawn. A record that cannot be used (a malformed record, a missing,
corrupt or truncated file, an empty frame list, a clip too short for the request) becomes a
:class:`SkippedSample` saying which and why, instead of an exception that would kill a
worker and the epoch with it. Programming errors still raise.

:class:`VideoLoader` runs the dataset in ``torch.utils.data.DataLoader`` workers (sharded by
rank with a ``DistributedSampler``), collates with a
:class:`~medgrpo.data.collate.VideoCollator`, and counts every skip by kind in
:attr:`VideoLoader.skipped`, logging each one. Workers are not persistent by default, so
nothing (processes, threads, file handles) outlives an epoch or an abandoned iterator.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from medgrpo.data import sampling
from medgrpo.data.decode import FrameRequest, VideoDecodeError, plan_source
from medgrpo.data.records import RecordDataset, RecordError, VideoRecord
from medgrpo.data.sampling import FramePlan

logger = logging.getLogger(__name__)

BACKENDS = ("pyav", "decord")


@dataclass(frozen=True)
class DecodeOptions:
    """How clips are sampled and which CPU decoder reads them.

    Attributes:
        backend: ``"pyav"`` (any codec; frame images through PIL) or ``"decord"`` (video
            files; frame lists still go through PIL).
        fps: sampling rate for video files (qwen-vl-utils' default 2). Frame lists are
            sampled at the record's ``metadata.fps``, as the MedGRPO authors' code does.
        nframes: a fixed frame count for video files instead of ``fps``.
        min_pixels, max_pixels, total_pixels: the pixel budget (see :mod:`medgrpo.data.sampling`).
        clip_from_metadata: cut video files to the record's ``input_video_start_frame`` /
            ``input_video_end_frame``; off by default, as the authors pass the file as the clip.
        draw_region_box: draw the green box on region-caption records.
    """

    backend: str = "pyav"
    fps: float = sampling.FPS
    nframes: int | None = None
    min_pixels: float | None = None
    max_pixels: float | None = None
    total_pixels: float = sampling.VIDEO_TOTAL_PIXELS
    clip_from_metadata: bool = False
    draw_region_box: bool = True

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")


@dataclass
class VideoSample:
    """One decoded record: ``frames`` uint8 ``(T, H, W, 3)`` as ``plan`` says."""

    record: VideoRecord
    frames: torch.Tensor
    plan: FramePlan


class SkippedSample(NamedTuple):
    """A record that could not be used: its dataset ``index``, ``record_id``, the ``kind`` of failure and why."""

    index: int
    record_id: str | None
    kind: str
    reason: str


def _decoder(backend: str) -> Callable[[FrameRequest], tuple[torch.Tensor, FramePlan]]:
    if backend == "decord":
        from medgrpo.data.decode_decord import load_video_sample
    else:
        from medgrpo.data.decode_cpu import load_video_sample
    return load_video_sample


def frame_request(record: VideoRecord, options: DecodeOptions) -> FrameRequest:
    """The :class:`~medgrpo.data.decode.FrameRequest` of a record: its frame list at ``metadata.fps``,
    or its video file sampled as ``options`` say (clipped to the record's frames when asked)."""
    box = record.rc_info if (options.draw_region_box and record.is_rc) else None
    budget = {"min_pixels": options.min_pixels, "max_pixels": options.max_pixels, "total_pixels": options.total_pixels}
    if record.is_frame_list:
        return FrameRequest(list(record.video), fps=record.fps, region_box=box, **budget)
    clip = {}
    if options.clip_from_metadata:
        clip = {"start_frame": record.start_frame, "end_frame": record.end_frame}
    return FrameRequest(record.video, fps=options.fps, nframes=options.nframes, region_box=box, **clip, **budget)


def load_record(record: VideoRecord, options: DecodeOptions) -> VideoSample:
    """Decode one record's clip (no error handling: see :meth:`VideoDataset.__getitem__`).

    Frame lists are read with PIL whatever the backend (decord reads video files only).
    """
    load = _decoder("pyav" if record.is_frame_list else options.backend)
    frames, plan = load(frame_request(record, options))
    return VideoSample(record=record, frames=frames, plan=plan)


def plan_record(record: VideoRecord, options: DecodeOptions) -> tuple[list[str] | str, FramePlan]:
    """``(source, plan)`` of a record from headers only: the plan :func:`load_record` decodes with.

    Decoders that take plans (DALI) use this; see :func:`medgrpo.data.decode.plan_source`.
    """
    return plan_source(frame_request(record, options))


def _skip_kind(error: Exception) -> str:
    if isinstance(error, RecordError):
        return "bad_record"
    if isinstance(error, VideoDecodeError):
        return "unreadable_video"
    return "impossible_sampling"


def skipped_sample(index: int, record_id: str | None, error: Exception) -> SkippedSample:
    """The :class:`SkippedSample` of a record that raised ``error`` (its kind read from the error)."""
    return SkippedSample(index, record_id or getattr(error, "record_id", None), _skip_kind(error), str(error))


def log_skip(skip: SkippedSample) -> None:
    """Log a skipped record (a warning with its index, id, kind and reason)."""
    logger.warning("skipped record %d (id %s, %s): %s", skip.index, skip.record_id, skip.kind, skip.reason)


# What makes a record unusable rather than a bug: a bad record, an unreadable video, an impossible plan.
SKIPPABLE_ERRORS = (RecordError, VideoDecodeError, ValueError)


class VideoDataset(Dataset):
    """Map-style dataset of decoded clips; an unusable record yields a :class:`SkippedSample`.

    Args:
        records: a :class:`~medgrpo.data.records.RecordDataset` (parsed lazily, per item)
            or a sequence of :class:`~medgrpo.data.records.VideoRecord`.
        options: sampling and decoder options.
    """

    def __init__(self, records: RecordDataset | Sequence[VideoRecord], options: DecodeOptions | None = None):
        self.records = records
        self.options = options or DecodeOptions()

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> VideoSample | SkippedSample:
        record_id = None
        try:
            record = self.records[index]
            record_id = record.id
            return load_record(record, self.options)
        except SKIPPABLE_ERRORS as error:
            return skipped_sample(index, record_id, error)


class SkipCounter:
    """The skip bookkeeping both loaders share: ``skipped`` counts skipped records by kind (over all
    epochs), each one logged; ``skipped_total`` is their number."""

    def __init__(self) -> None:
        self.skipped: Counter[str] = Counter()

    def count_skips(self, skipped: Sequence[SkippedSample]) -> None:
        """Count ``skipped`` by kind and log each one."""
        for skip in skipped:
            self.skipped[skip.kind] += 1
            log_skip(skip)

    @property
    def skipped_total(self) -> int:
        """Records skipped so far, over all epochs."""
        return sum(self.skipped.values())


class VideoLoader(SkipCounter):
    """Batches of collated clips from worker processes, sharded by rank, skips counted.

    Args:
        dataset: a :class:`VideoDataset`.
        collate: turns a list of :class:`VideoSample`/:class:`SkippedSample` into a batch
            that has a ``skipped`` list (e.g. :class:`~medgrpo.data.collate.VideoCollator`).
        batch_size: records per batch on this rank (skipped records make a batch smaller).
        num_workers: decoder processes (0 decodes in this process).
        rank, world_size: this process's shard; every rank sees ``len(dataset) / world_size`` records.
        shuffle, seed: order of the records; call :meth:`set_epoch` before each epoch.
        sampler: a custom sampler instead of the rank sharding.
        pin_memory: pin batches for asynchronous host-to-device copies.
        persistent_workers: keep worker processes across epochs; they stop when the loader
            is garbage collected.
    """

    def __init__(
        self,
        dataset: VideoDataset,
        collate: Callable[[list[Any]], Any],
        *,
        batch_size: int,
        num_workers: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = False,
        seed: int = 0,
        sampler: Sampler | None = None,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        prefetch_factor: int | None = None,
        drop_last: bool = False,
    ):
        super().__init__()
        if sampler is None:
            sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed)
        self.sampler = sampler
        self._loader = DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            num_workers=num_workers,
            collate_fn=collate,
            pin_memory=pin_memory,
            persistent_workers=persistent_workers and num_workers > 0,
            prefetch_factor=prefetch_factor if num_workers > 0 else None,
            drop_last=drop_last,
        )

    def __len__(self) -> int:
        return len(self._loader)

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle for ``epoch`` (same order on every rank for the same seed and epoch)."""
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[Any]:
        for batch in self._loader:
            self.count_skips(batch.skipped)
            yield batch


class DaliRecordLoader(SkipCounter):
    """:class:`VideoLoader`'s batches with the frames decoded by DALI (nvJPEG / NVDEC on the GPU).

    Indices come from ``sampler`` (e.g. the trainer's balanced, rank-sharded sampler); records are
    parsed and planned on the host from headers (:func:`plan_record`), decoded and resized by one
    :class:`~medgrpo.data.decode_dali.DaliVideoLoader` per rank (its pipelines persist across
    batches), and collated; frames stay on the device, so ``batch.to(device)`` moves only tokens.
    Unusable records become counted, logged :class:`SkippedSample` s, as in :class:`VideoLoader`.

    Args:
        dataset: a :class:`VideoDataset` (its records and options are used; its decoder is not).
        collate: e.g. :class:`~medgrpo.data.collate.VideoCollator`.
        batch_size: records per batch. sampler: the indices to load, in order.
        device: ``"gpu"`` or ``"cpu"`` (DALI's CPU operators); default: GPU when CUDA is available.
        num_threads, device_id: DALI threads and the CUDA device of this rank.
    """

    def __init__(
        self,
        dataset: VideoDataset,
        collate: Callable[[list[Any]], Any],
        *,
        batch_size: int,
        sampler: Sampler,
        device: str | None = None,
        num_threads: int = 4,
        device_id: int | None = None,
    ):
        from medgrpo.data.decode_dali import DaliVideoLoader

        super().__init__()
        self.dataset, self.collate, self.batch_size, self.sampler = dataset, collate, batch_size, sampler
        options = dataset.options
        self.decoder = DaliVideoLoader(
            [],
            [],
            batch_size=batch_size,
            device=device,
            num_threads=num_threads,
            device_id=device_id,
            min_pixels=options.min_pixels,
            max_pixels=options.max_pixels,
            on_error="skip",
        )

    def __len__(self) -> int:
        return -(-len(self.sampler) // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[Any]:
        indices = list(iter(self.sampler))
        for start in range(0, len(indices), self.batch_size):
            batch = self.collate(self._items(indices[start : start + self.batch_size]))
            self.count_skips(batch.skipped)
            yield batch

    def _items(self, indices: Sequence[int]) -> list[VideoSample | SkippedSample]:
        """One item per index, in the order of ``indices``."""
        planned, items = [], [None] * len(indices)
        for slot, index in enumerate(indices):
            record_id = None
            try:
                record = self.dataset.records[index]
                record_id = record.id
                request = frame_request(record, self.dataset.options)
                source, plan = plan_source(request)
            except SKIPPABLE_ERRORS as error:
                items[slot] = skipped_sample(index, record_id, error)
                continue
            planned.append((slot, record, source, plan, request.region_box))
        decoded = self.decoder.decode_items([(source, plan, box) for _, _, source, plan, box in planned])
        for (slot, record, _, plan, _), frames in zip(planned, decoded):
            if isinstance(frames, VideoDecodeError):
                items[slot] = skipped_sample(record.index, record.id, frames)
            else:
                items[slot] = VideoSample(record=record, frames=frames, plan=plan)
        return items

    def close(self) -> None:
        """Free the DALI pipelines."""
        self.decoder.close()


def open_file_count() -> int:
    """Open file descriptors of this process (Linux), for leak checks."""
    return len(os.listdir("/proc/self/fd"))


__all__ = [
    "BACKENDS",
    "DaliRecordLoader",
    "DecodeOptions",
    "SkipCounter",
    "SkippedSample",
    "VideoDataset",
    "VideoLoader",
    "VideoSample",
    "frame_request",
    "load_record",
    "log_skip",
    "open_file_count",
    "plan_record",
]
