"""The run's data: records screened → balanced sampler → decoder workers or DALI → full batches, forever.

Unusable records never reach a step and never cost a step. Before training, :func:`screen_records`
reads every record's cheap fields (:meth:`~medgrpo.data.records.RecordDataset.outline`: JSON, task
key, texts, frame count, whether the video exists) and the sampler never draws those that fail
(not JSON, malformed, more frames than ``max_frames``, text alone over the token cap, no video).
What only decoding finds (a corrupt file, a clip too short, tokens over the cap with the video's)
is excluded from the sampler when first seen. Either way a record is counted once, by kind, and
logged with its id. :class:`RecordBatches` fills every batch to its size from the next usable
draws, so a step always has ``batch_size`` records; the sampler's state (position, exclusions,
counts) is checkpointed, and a resumed run draws exactly what the uninterrupted one would have.
"""

from __future__ import annotations

import logging
import os
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from medgrpo.data import sampling
from medgrpo.data.collate import TokenizedItems, VideoBatch, VideoCollator
from medgrpo.data.loader import (
    DaliRecordLoader,
    DecodeOptions,
    SkippedSample,
    VideoDataset,
    VideoLoader,
    log_skip,
)
from medgrpo.data.records import RecordDataset, RecordError, RecordOutline
from medgrpo.data.task_key import format_task_key
from medgrpo.train.distributed import Runtime
from medgrpo.train.sampler import BalancedSampler

logger = logging.getLogger(__name__)

LOADERS = ("cpu", "dali")
MAX_LENGTH = 32768  # the paper's inference: a model length of 32,768 tokens (256 of them for the answer)


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
        max_length: the longest sequence a record may make: prompt with its video tokens plus the answer
            (SFT) or plus grpo.rollout.max_new_tokens (GRPO); longer records are skipped and counted
            (default: the paper's model length, 32768); null: no limit.
        max_frames: frame lists with more frames are skipped and counted (video files are sampled to at
            most qwen-vl-utils' 768 frames anyway); null: no limit.
        sampler_weights: weight per "data_source/qa_type", "data_source" or "qa_type" (default 1 each).
        decode: frame sampling and the CPU decoder.
    """

    train_file: str = ""
    eval_file: str = ""
    root: str = ""
    loader: str = "cpu"
    num_workers: int = 2
    max_length: int | None = MAX_LENGTH
    max_frames: int | None = sampling.FPS_MAX_FRAMES
    sampler_weights: dict[str, float] = field(default_factory=dict)
    decode: DecodeOptions = field(default_factory=DecodeOptions)

    def __post_init__(self) -> None:
        if self.loader not in LOADERS:
            raise ValueError(f"loader must be one of {LOADERS}, got {self.loader!r}")


class NoUsableRecords(ValueError):
    """No record of the training file can be used: nothing to train on."""


@dataclass
class RecordScreen:
    """What :func:`screen_records` found: each record's sampler key (None: unusable) and the unusable ones."""

    keys: list[str | None]
    skipped: list[SkippedSample]

    @property
    def counts(self) -> Counter[str]:
        """Unusable records by kind."""
        return Counter(skip.kind for skip in self.skipped)

    def describe(self) -> str:
        """``"bad_record: 2, too_long: 1"``."""
        return ", ".join(f"{kind}: {count}" for kind, count in sorted(self.counts.items())) or "none"


def screen_records(
    records: RecordDataset,
    *,
    max_frames: int | None = None,
    max_tokens: int | None = None,
    text_tokens: Callable[[str, str | None], int] | None = None,
    with_answers: bool = False,
    log: bool = True,
) -> RecordScreen:
    """Every record's sampler key, or why it is unusable, from its cheap fields alone.

    A record is unusable when its line is not JSON or a field it needs is malformed (``bad_record``),
    its frame list has more than ``max_frames`` frames (``too_many_frames``), SFT has no answer to learn
    (``no_answer``), its video file or first frame does not exist (``unreadable_video``), or its text
    alone exceeds ``max_tokens`` (``too_long``: ``text_tokens(question, answer)`` counts the tokens
    of the prompt with a one-token video and of the answer; it runs only when the text's UTF-8 bytes,
    an upper bound of its byte-level BPE tokens, exceed the cap). Nothing is decoded; no path is
    resolved on the file system. Skips are logged with their ids when ``log``.
    """
    keys: list[str | None] = []
    skipped: list[SkippedSample] = []
    for index in range(len(records)):
        try:
            outline = records.outline(index)
        except RecordError as error:
            problem = SkippedSample(index, error.record_id, "bad_record", str(error))
        else:
            problem = _outline_problem(outline, max_frames, max_tokens, text_tokens, with_answers)
        keys.append(None if problem is not None else format_task_key(*outline.key))
        if problem is not None:
            skipped.append(problem)
            if log:
                log_skip(problem)
    return RecordScreen(keys, skipped)


def _outline_problem(
    outline: RecordOutline,
    max_frames: int | None,
    max_tokens: int | None,
    text_tokens: Callable[[str, str | None], int] | None,
    with_answers: bool,
) -> SkippedSample | None:
    """Why the record of ``outline`` is unusable (see :func:`screen_records`), or None."""

    def skip(kind: str, reason: str) -> SkippedSample:
        return SkippedSample(outline.index, outline.id, kind, reason)

    if max_frames is not None and outline.num_frames is not None and outline.num_frames > max_frames:
        return skip("too_many_frames", f"{outline.num_frames} frames > max_frames {max_frames}")
    if with_answers and outline.answer is None:
        return skip("no_answer", "SFT needs the record's gpt answer")
    text_bytes = len(outline.question.encode()) + len((outline.answer or "").encode())
    if max_tokens is not None and text_tokens is not None and text_bytes > max_tokens:
        try:
            tokens = text_tokens(outline.question, outline.answer if with_answers else None)
        except ValueError as error:
            return skip("bad_prompt", str(error))
        if tokens > max_tokens:
            return skip("too_long", f"{tokens} tokens of text alone > max_length {max_tokens}")
    if not os.path.exists(outline.first_path):
        return skip("unreadable_video", f"{outline.first_path}: no such file or directory")
    return None


class RecordBatches:
    """Batches of exactly ``batch_size`` usable records, epoch after epoch, forever.

    The loader yields the draws' items tokenized, not padded (:class:`~medgrpo.data.collate.TokenizedItems`).
    A skipped item is excluded from the sampler (counted once) and the batch takes the next usable
    item instead; items drawn beyond a full batch wait for the next one. The sampler is told how
    many draws each batch used, so its state is the position after the batch.

    A batch is empty only when no record is left to draw (every drawable record was excluded): the
    loop ends the run on every rank together then (:func:`medgrpo.train.loop.train`).
    """

    def __init__(
        self, loader: VideoLoader | DaliRecordLoader, sampler: BalancedSampler, collator: VideoCollator, batch_size: int
    ):
        self.loader, self.sampler, self.collator, self.batch_size = loader, sampler, collator, batch_size

    def __iter__(self) -> Iterator[VideoBatch]:
        pending: deque = deque()
        chunks: Iterator[TokenizedItems] = iter(self.loader)
        while True:
            rows, used = [], 0
            while len(rows) < self.batch_size:
                if pending:
                    item, used = pending.popleft(), used + 1
                    if isinstance(item, SkippedSample):
                        self.sampler.exclude(item.index, item.kind)
                    else:
                        rows.append(item)
                    continue
                chunk = next(chunks, None)
                if chunk is not None:
                    pending.extend(chunk.items)
                elif self.sampler.exhausted:
                    break
                else:  # the epoch's draws are used up: the next epoch's
                    self.sampler.set_epoch(self.sampler.epoch + 1)
                    chunks = iter(self.loader)
            self.sampler.advance(used)
            yield self.collator.pad(rows)


def build_loader(
    config: DataConfig,
    runtime: Runtime,
    tokenizer,
    *,
    batch_size: int,
    with_answers: bool,
    seed: int,
    reserved_tokens: int = 0,
) -> RecordBatches:
    """The rank's batches: records screened (:func:`screen_records`), the balanced sampler over the usable
    ones, DALI or CPU decoder workers, tokenized on the workers and padded into full batches.

    ``with_answers`` (SFT): right-padded prompts with their answers and labels; else left-padded
    prompts for rollouts, ``reserved_tokens`` (the completions' budget) taken from ``max_length``.

    Raises:
        NoUsableRecords: ``train_file`` cannot be read as records, or not one of its records passes the
            screen (every rank raises it).
    """
    try:
        records = RecordDataset(config.train_file, root=config.root or None)
    except (OSError, ValueError) as error:  # not JSON lines nor a JSON list, not UTF-8, unreadable
        raise NoUsableRecords(f"data.train_file {config.train_file}: cannot read its records: {error}") from None
    max_tokens = None if config.max_length is None else config.max_length - reserved_tokens
    collator = VideoCollator(
        tokenizer,
        with_answers=with_answers,
        padding_side="right" if with_answers else "left",
        max_length=max_tokens,
    )
    screen = screen_records(
        records,
        max_frames=config.max_frames,
        max_tokens=max_tokens,
        text_tokens=lambda question, answer: len(text_ids(collator, question, answer)),
        with_answers=with_answers,
        log=runtime.is_main,
    )
    usable = len(records) - len(screen.skipped)
    if len(records) == 0:
        raise NoUsableRecords(f"data.train_file {config.train_file}: holds no records")
    if usable == 0:
        raise NoUsableRecords(
            f"data.train_file {config.train_file}: none of its {len(records)} records is usable "
            f"(skipped by kind: {screen.describe()}; each is logged with its id)"
        )
    if runtime.is_main:
        logger.info(
            "%s: %d of %d records usable (skipped: %s)", config.train_file, usable, len(records), screen.describe()
        )
    sampler = BalancedSampler(
        screen.keys,
        config.sampler_weights,
        rank=runtime.rank,
        world_size=runtime.world_size,
        seed=seed,
        samples_per_epoch=max(usable // runtime.world_size, batch_size),
        skipped=screen.counts,
    )
    dataset = VideoDataset(records, config.decode)
    if config.loader == "dali":
        device = "gpu" if runtime.device.type == "cuda" else "cpu"
        loader = DaliRecordLoader(
            dataset,
            collator.tokenize_items,
            batch_size=batch_size,
            sampler=sampler,
            device=device,
            device_id=runtime.device.index,
        )
    else:
        loader = VideoLoader(
            dataset,
            collator.tokenize_items,
            batch_size=batch_size,
            sampler=sampler,
            num_workers=config.num_workers,
            pin_memory=runtime.device.type == "cuda",
        )
    return RecordBatches(loader, sampler, collator, batch_size)


def text_ids(collator: VideoCollator, question: str, answer: str | None) -> list[int]:
    """The token ids of a record's text: its prompt with a one-token video, then its answer (if given)."""
    one_token_video = (1, 2, 2)  # one temporal patch of 2 x 2 patches: one merged token
    prompt = collator.prompt_ids(question, one_token_video)
    return prompt + (collator.answer_ids(answer) if answer is not None else [])


__all__ = [
    "DataConfig",
    "LOADERS",
    "MAX_LENGTH",
    "NoUsableRecords",
    "RecordBatches",
    "RecordScreen",
    "build_loader",
    "screen_records",
    "text_ids",
]
