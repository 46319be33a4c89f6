"""DaliRecordLoader (DALI's CPU operators here): the same batches as the CPU loader, bad records counted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.utils.data import SequentialSampler

from medgrpo.data.collate import VideoCollator
from medgrpo.data.loader import DaliRecordLoader, DecodeOptions, VideoDataset, VideoLoader, plan_record
from medgrpo.data.records import RecordDataset
from medgrpo.demo.tiny_model import build_tokenizer
from medgrpo.testing.video_fixtures import write_jpeg_folder, write_video

pytest.importorskip("nvidia.dali")

SIZE = (112, 84)
BUDGET = {"min_pixels": 56 * 56, "max_pixels": 112 * 112}


def _record(video, question: str = "Which phase?", **extra) -> dict:
    record = {
        "conversations": [{"from": "human", "value": f"<video>\n{question}"}, {"from": "gpt", "value": "x"}],
        "video": video,
        "metadata": {"fps": "1.0"},
        "qa_type": "tal",
        "data_source": "AVOS",
    }
    record.update(extra)
    return record


@pytest.fixture(scope="module")
def records_file(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dali_records")
    frames = [f"f/{Path(p).name}" for p in write_jpeg_folder(root / "f", 5, SIZE)]
    write_video(root / "clip.webm", 16, 8, SIZE, "libvpx-vp9")
    write_video(root / "clip.mp4", 16, 8, SIZE, "libx264")
    records = [
        _record(frames),
        _record("clip.webm"),
        _record(frames, is_RC=True, RC_info={"start_frame": frames[2], "start_frame_bbox": [5, 5, 60, 40]}),
        _record("missing.webm"),
        _record("clip.mp4"),  # H.264: DALI's CPU decoder cannot read it (the GPU one can)
    ]
    path = root / "records.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + "{not json\n")
    return path


def test_dali_batches_match_the_cpu_loader(records_file, tmp_path):
    tokenizer = build_tokenizer(tmp_path / "tok")
    dataset = VideoDataset(RecordDataset(records_file), DecodeOptions(fps=2.0, **BUDGET))
    collate = VideoCollator(tokenizer)
    dali = DaliRecordLoader(dataset, collate, batch_size=3, sampler=SequentialSampler(dataset), device="cpu")
    cpu = VideoLoader(dataset, collate, batch_size=3, sampler=SequentialSampler(dataset))
    try:
        dali_batches, cpu_batches = list(dali), list(cpu)
    finally:
        dali.close()
    dali_records = [r.index for b in dali_batches for r in b.records]
    cpu_records = [r.index for b in cpu_batches for r in b.records]
    assert dali_records == [0, 1, 2] and cpu_records == [0, 1, 2, 4]
    assert dict(dali.skipped) == {"unreadable_video": 2, "bad_record": 1}
    assert "h264" in " ".join(s.reason for b in dali_batches for s in b.skipped)
    cpu_frames = {r.index: f for b in cpu_batches for r, f in zip(b.records, b.frames)}
    for batch in dali_batches:
        assert torch.equal(batch.input_ids, collate([*_samples(dataset, batch)]).input_ids)
        for record, frames in zip(batch.records, batch.frames):
            difference = (frames.float() - cpu_frames[record.index].float()).abs()
            assert frames.shape == cpu_frames[record.index].shape
            assert difference.mean() <= 1.0 and difference.max() <= 8, record.index
    boxed = dali_batches[0].frames[2]
    assert (boxed[:, 2:4, 2:4, 1] > 200).any()  # the region box reached the pixels


def _samples(dataset, batch):
    return [dataset[r.index] for r in batch.records]


def test_plan_record_equals_the_decoders_plan(records_file):
    dataset = VideoDataset(RecordDataset(records_file), DecodeOptions(fps=2.0, **BUDGET))
    for index in (0, 1, 2):
        _, plan = plan_record(dataset.records[index], dataset.options)
        assert plan == dataset[index].plan
