"""The run's data: records → balanced sampler → decoder workers or DALI → collated batches, forever."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from medgrpo.data.collate import VideoBatch, VideoCollator
from medgrpo.data.loader import DaliRecordLoader, DecodeOptions, VideoDataset, VideoLoader
from medgrpo.data.records import RecordDataset, RecordError, task_key
from medgrpo.data.task_key import format_task_key
from medgrpo.train.distributed import Runtime
from medgrpo.train.sampler import BalancedSampler

LOADERS = ("cpu", "dali")


@dataclass
class DataConfig:
    """Records, the loader and frame sampling (see :mod:`medgrpo.data`).

    Attributes:
        train_file: the training records (JSONL or JSON, MedVidBench format).
        eval_file: held-out records scored every eval_every steps (empty: no evaluation).
        root: the dataset root that record paths resolve against (empty: the records file's directory).
        loader: "cpu" (decode.backend in worker processes) or "dali" (nvJPEG / NVDEC on the GPU, one
            pipeline per rank; clips are planned as decode.backend plans them).
        num_workers: decoder worker processes of the "cpu" loader.
        max_length: longer prompts (with their answers for SFT) are skipped and counted; null: no limit.
        sampler_weights: weight per "data_source/qa_type", "data_source" or "qa_type" (default 1 each).
        decode: frame sampling and the CPU decoder.
    """

    train_file: str = ""
    eval_file: str = ""
    root: str = ""
    loader: str = "cpu"
    num_workers: int = 2
    max_length: int | None = None
    sampler_weights: dict[str, float] = field(default_factory=dict)
    decode: DecodeOptions = field(default_factory=DecodeOptions)

    def __post_init__(self) -> None:
        if self.loader not in LOADERS:
            raise ValueError(f"loader must be one of {LOADERS}, got {self.loader!r}")


def record_keys(records: RecordDataset) -> list[str]:
    """Every record's sampler key, from the raw JSON (:func:`~medgrpo.data.records.task_key`: no path resolved).

    A record whose line is not JSON, or whose data source or task type is invalid, gets the key
    ``"invalid/invalid"``: it is still drawn, then skipped and counted by the loader like any other
    unusable record.
    """
    keys = []
    for i in range(len(records)):
        try:
            key = task_key(records.raw(i))
        except RecordError:
            key = None
        keys.append(format_task_key(*(key or ("invalid", "invalid"))))
    return keys


def build_loader(
    config: DataConfig, runtime: Runtime, tokenizer, *, batch_size: int, with_answers: bool, seed: int
) -> tuple[VideoLoader | DaliRecordLoader, BalancedSampler]:
    """The rank's loader: balanced sampler; DALI or CPU decoder workers; the collator.

    ``with_answers`` (SFT): right-padded prompts with their answers and labels; else left-padded
    prompts for rollouts.
    """
    records = RecordDataset(config.train_file, root=config.root or None)
    sampler = BalancedSampler(
        record_keys(records),
        config.sampler_weights,
        rank=runtime.rank,
        world_size=runtime.world_size,
        seed=seed,
        samples_per_epoch=max(len(records) // runtime.world_size, batch_size),
    )
    collate = VideoCollator(
        tokenizer,
        with_answers=with_answers,
        padding_side="right" if with_answers else "left",
        max_length=config.max_length,
    )
    dataset = VideoDataset(records, config.decode)
    if config.loader == "dali":
        device = "gpu" if runtime.device.type == "cuda" else "cpu"
        loader = DaliRecordLoader(
            dataset, collate, batch_size=batch_size, sampler=sampler, device=device, device_id=runtime.device.index
        )
    else:
        loader = VideoLoader(
            dataset,
            collate,
            batch_size=batch_size,
            sampler=sampler,
            num_workers=config.num_workers,
            pin_memory=runtime.device.type == "cuda",
        )
    return loader, sampler


def batches(loader: VideoLoader | DaliRecordLoader, sampler: BalancedSampler) -> Iterator[VideoBatch]:
    """Batches forever, epoch after epoch; the sampler's position follows what was consumed."""
    while True:
        for batch in loader:
            sampler.advance(len(batch) + len(batch.skipped))
            yield batch
        sampler.set_epoch(sampler.epoch + 1)


__all__ = ["DataConfig", "LOADERS", "batches", "build_loader", "record_keys"]
