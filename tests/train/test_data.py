"""The trainer's data: unusable records found once, counted once, never drawn again; full batches; exact resume."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from medgrpo.data.loader import DecodeOptions
from medgrpo.data.records import RecordDataset
from medgrpo.testing.corrupt import write_undecodable_frames
from medgrpo.testing.video_fixtures import write_jpeg_folder
from medgrpo.train.data import DataConfig, NoUsableRecords, build_loader, screen_records
from medgrpo.train.distributed import Runtime
from medgrpo.train.sampler import BalancedSampler

SIDE = 56
DECODE = {"min_pixels": SIDE * SIDE, "max_pixels": SIDE * SIDE}


def record(frames: list[str], *, source: str = "AVOS", qa_type: str = "tal", answer: str | None = "1.0-2.0 seconds."):
    turns = [{"from": "human", "value": "<video>\nWhen does the action happen?"}]
    if answer is not None:
        turns.append({"from": "gpt", "value": answer})
    return {
        "conversations": turns,
        "video": frames,
        "metadata": {"fps": "1.0", "video_id": "clip"},
        "qa_type": qa_type,
        "data_source": source,
    }


def clip(root: Path, name: str, frames: int = 4) -> list[str]:
    """A JPEG frame list under ``root/name``, as paths relative to ``root``."""
    return [f"{name}/{Path(p).name}" for p in write_jpeg_folder(root / name, frames, (SIDE, SIDE))]


def write_records(path: Path, lines: list) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


@pytest.fixture
def mixed_file(tmp_path) -> Path:
    """Six good records over two keys, one line that is not JSON, two records whose frames do not decode."""
    good = [record(clip(tmp_path, f"good{i}"), source="AVOS" if i < 3 else "NurViD") for i in range(6)]
    corrupt = [record(write_undecodable_frames(tmp_path, f"corrupt{i}", 4)) for i in range(2)]
    return write_records(tmp_path / "train.jsonl", [*good[:3], "{not json", corrupt[0], *good[3:], corrupt[1]])


def test_screen_finds_unusable_records_from_their_cheap_fields(tmp_path, tokenizer):
    from medgrpo.data.collate import VideoCollator
    from medgrpo.train.data import text_ids

    good = clip(tmp_path, "good")
    lines = [
        record(good),
        "{not json",
        record(good, qa_type="knitting"),
        record([f"long/{i:06d}.jpg" for i in range(10_000)]),  # no such frames: the count alone decides
        record(good, answer="lorem ipsum " * 10_000),  # 120,000 characters
        record(["missing/000000.jpg", "missing/000001.jpg"]),
        record(good, answer=None),
    ]
    records = RecordDataset(write_records(tmp_path / "train.jsonl", lines))
    collator = VideoCollator(tokenizer, with_answers=True, max_length=32768)
    tokenized = []

    def text_tokens(question: str, answer: str | None) -> int:
        tokenized.append(answer)
        return len(text_ids(collator, question, answer))

    screen = screen_records(records, max_frames=768, max_tokens=32768, text_tokens=text_tokens, with_answers=True)
    kinds = {skip.index: skip.kind for skip in screen.skipped}
    assert kinds == {
        1: "bad_record",
        2: "bad_record",
        3: "too_many_frames",
        4: "too_long",
        5: "unreadable_video",
        6: "no_answer",
    }
    assert screen.keys == ["AVOS/tal"] + [None] * 6
    assert len(tokenized) == 1  # only the text longer than the cap in bytes is tokenized
    assert "10000 frames > max_frames 768" in screen.skipped[2].reason


def test_sampler_never_draws_unusable_records():
    """The issue's case: one bad line among 58 records was an eighth of all draws (its own key)."""
    keys = [f"S{i % 7}/tal" for i in range(57)] + [None]
    sampler = BalancedSampler(keys, samples_per_epoch=5000, seed=0, skipped={"bad_record": 1})
    draws = list(sampler)
    assert 57 not in draws
    shares = Counter(keys[i] for i in draws)
    assert len(shares) == 7 and all(abs(n / 5000 - 1 / 7) < 0.03 for n in shares.values())
    with pytest.raises(ValueError, match="at least one usable record"):
        BalancedSampler([None, None])


def test_excluded_records_are_counted_once_and_never_yielded_again():
    keys = ["A/tal"] * 4 + ["B/tal"] * 4
    sampler = BalancedSampler(keys, samples_per_epoch=64, seed=2)
    first = list(sampler)
    assert sampler.exclude(first[0], "unreadable_video") and not sampler.exclude(first[0], "unreadable_video")
    assert sampler.skipped == {"unreadable_video": 1}
    sampler.advance(10)
    state = sampler.state_dict()
    again = BalancedSampler(keys, samples_per_epoch=64, seed=2)
    again.load_state_dict(state)
    resumed = list(again)
    assert resumed == [i for i in first[10:] if i != first[0]]
    assert again.skipped == {"unreadable_video": 1} and again.excluded == {first[0]}
    for index in range(8):
        again.exclude(index, "bad_record")
    assert again.exhausted and list(again) == []


def loader_for(path: Path, tokenizer, *, batch_size: int = 3, num_workers: int = 0, with_answers: bool = True):
    config = DataConfig(train_file=str(path), num_workers=num_workers, decode=DecodeOptions(**DECODE))
    runtime = Runtime(torch.device("cpu"))
    return build_loader(config, runtime, tokenizer, batch_size=batch_size, with_answers=with_answers, seed=5)


def record_ids(batch) -> list[int]:
    return [r.index for r in batch.records]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_batches_are_full_skips_counted_once_and_resume_is_exact(mixed_file, tokenizer, num_workers):
    data = loader_for(mixed_file, tokenizer, num_workers=num_workers)
    assert data.sampler.skipped == {"bad_record": 1}  # the line that is not JSON, found before any draw
    stream = iter(data)
    straight = [record_ids(next(stream)) for _ in range(12)]
    assert all(len(ids) == 3 for ids in straight)
    assert not {3, 4, 8} & {i for ids in straight for i in ids}
    assert data.sampler.skipped == {"bad_record": 1, "unreadable_video": 2}  # each corrupt record counted once
    assert data.sampler.excluded == {4, 8}

    data = loader_for(mixed_file, tokenizer, num_workers=num_workers)
    stream = iter(data)
    head = [record_ids(next(stream)) for _ in range(5)]
    state = data.sampler.state_dict()
    resumed = loader_for(mixed_file, tokenizer, num_workers=num_workers)
    resumed.sampler.load_state_dict(state)
    stream = iter(resumed)
    tail = [record_ids(next(stream)) for _ in range(7)]
    assert head + tail == straight
    assert resumed.sampler.skipped == {"bad_record": 1, "unreadable_video": 2}


def test_records_that_never_decode_end_in_an_empty_batch(tmp_path, tokenizer):
    records = [record(write_undecodable_frames(tmp_path, f"c{i}", 4)) for i in range(3)]
    path = write_records(tmp_path / "train.jsonl", records)
    data = loader_for(path, tokenizer, batch_size=2)
    batch = next(iter(data))
    assert len(batch) == 0 and data.sampler.exhausted
    assert data.sampler.skipped == {"unreadable_video": 3}


def test_no_usable_record_stops_before_any_draw(tmp_path, tokenizer):
    path = write_records(tmp_path / "train.jsonl", ["{not json", record(["gone/000000.jpg", "gone/000001.jpg"])])
    with pytest.raises(NoUsableRecords, match=r"none of its 2 records is usable .*bad_record: 1, unreadable_video: 1"):
        loader_for(path, tokenizer)


def test_too_long_after_decoding_is_skipped_and_refilled(tmp_path, tokenizer):
    """A record whose text fits but whose prompt with its video does not: found by the collator, excluded."""
    lines = [record(clip(tmp_path, f"short{i}", frames=2)) for i in range(3)]
    lines.append(record(clip(tmp_path, "long", frames=40)))
    path = write_records(tmp_path / "train.jsonl", lines)
    config = DataConfig(train_file=str(path), num_workers=0, max_length=120, decode=DecodeOptions(**DECODE))
    data = build_loader(config, Runtime(torch.device("cpu")), tokenizer, batch_size=2, with_answers=True, seed=1)
    stream = iter(data)
    batches = [next(stream) for _ in range(6)]
    assert all(len(b) == 2 and 3 not in record_ids(b) for b in batches)
    assert data.sampler.skipped == {"too_long": 1}


@pytest.mark.parametrize("name", ["demo_cpu.yaml", "sft_qwen2_5_vl_7b.yaml", "medgrpo_qwen2_5_vl_7b.yaml"])
def test_shipped_configs_bound_sequence_length_and_frames(name):
    from medgrpo.train.config import load_config

    data = load_config(Path(__file__).resolve().parents[2] / "configs" / name).data
    assert (data.max_length, data.max_frames) == (32768, 768)  # the paper's model length; qwen-vl-utils' frame cap
