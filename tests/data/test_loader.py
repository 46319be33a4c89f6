"""loader + collate: records → batches (exact frames, placeholder counts); bad input skipped and counted; no leaks."""

from __future__ import annotations

import gc
import json
import logging
import multiprocessing
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medgrpo.data.collate import IGNORE_INDEX, VIDEO_PAD, VideoCollator, video_token_count
from medgrpo.data.loader import DecodeOptions, SkippedSample, VideoDataset, VideoLoader, open_file_count
from medgrpo.data.records import RecordDataset
from medgrpo.demo.tiny_model import build_tokenizer
from medgrpo.ops import reference
from medgrpo.testing.video_fixtures import read_barcode, write_jpeg_folder, write_video

SIZE = (112, 84)  # (width, height)


def _record(video, question: str, answer: str | None = "1.0-2.0 seconds.", **extra) -> dict:
    conversations = [{"from": "human", "value": f"<video>\n{question}"}]
    if answer is not None:
        conversations.append({"from": "gpt", "value": answer})
    record = {
        "conversations": conversations,
        "video": video,
        "metadata": {"fps": "1.0", "video_id": "v"},
        "qa_type": "tal",
        "data_source": "AVOS",
        "is_RC": False,
        "RC_info": {},
    }
    record.update(extra)
    return record


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def dataset_file(tmp_path_factory) -> Path:
    """8 good records (frame lists of 4 and 7 frames, a VP9 and an H.264 file) and 6 bad ones."""
    root = tmp_path_factory.mktemp("dataset")
    short = [f"frames_a/{Path(p).name}" for p in write_jpeg_folder(root / "frames_a", 4, SIZE)]
    odd = [f"frames_b/{Path(p).name}" for p in write_jpeg_folder(root / "frames_b", 7, (140, 84))]
    write_video(root / "clip.webm", 24, 8, SIZE, "libvpx-vp9")
    write_video(root / "clip.mp4", 30, 10, (84, 112), "libx264")  # portrait
    (root / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(200))
    (root / "frames_c").mkdir()
    Image.new("L", SIZE, 128).save(root / "frames_c" / "gray.jpg")  # grayscale frame
    Image.new("CMYK", SIZE, (0, 64, 128, 0)).save(root / "frames_c" / "cmyk.jpg")
    truncated = root / "frames_c" / "truncated.jpg"
    Image.new("RGB", SIZE, (10, 20, 30)).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:100])
    good = [
        _record(short, "Where is the grasper?"),
        _record(odd, "When does tying happen?", answer="0.0-3.5 seconds."),
        _record("clip.webm", "Which phase is next?", answer="clipping"),
        _record("clip.mp4", "Summarize the video.", answer="The hook dissects."),
        _record(["frames_c/gray.jpg", "frames_c/cmyk.jpg"], "Gray and CMYK frames."),
        _record(
            short,
            "Describe the region.",
            is_RC=True,
            RC_info={"start_frame": short[1], "start_frame_bbox": [10, 10, 60, 50]},
        ),
        _record(short[:3], "Odd frame count."),
        _record(odd[:1], "One frame."),
    ]
    bad = [
        _record("missing.mp4", "A missing file."),
        _record("broken.mp4", "A corrupt file."),
        _record([], "An empty frame list."),
        _record(["frames_c/truncated.jpg", "frames_c/gray.jpg"], "A truncated JPEG."),
        {"conversations": "not a list", "video": "clip.webm", "metadata": {}},
        _record("../outside.mp4", "Escapes the root."),
    ]
    path = root / "records.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in good + bad))
    return path


def test_dataset_decodes_good_records_and_skips_bad_ones(dataset_file):
    dataset = VideoDataset(RecordDataset(dataset_file), DecodeOptions(fps=2.0))
    items = [dataset[i] for i in range(len(dataset))]
    good, bad = items[:8], items[8:]
    assert all(not isinstance(item, SkippedSample) for item in good)
    assert all(isinstance(item, SkippedSample) for item in bad)
    assert [s.kind for s in bad] == [
        "unreadable_video",
        "unreadable_video",
        "bad_record",
        "unreadable_video",
        "bad_record",
        "bad_record",
    ]
    assert "missing.mp4" in bad[0].reason and "truncated.jpg" in bad[3].reason
    for sample in good:
        frames, plan = sample.frames, sample.plan
        assert frames.dtype == torch.uint8 and frames.shape == (plan.num_frames, plan.height, plan.width, 3)
        assert plan.num_frames % 2 == 0 and plan.height % 28 == 0 and plan.width % 28 == 0
    # Frame lists: every frame in order, padded to even with the last; files: the planned indices.
    assert good[1].plan.indices == (0, 1, 2, 3, 4, 5, 6, 6)
    assert good[6].plan.indices == (0, 1, 2, 2) and good[7].plan.indices == (0, 0)
    webm = good[2]
    barcodes = [
        read_barcode(
            torch.nn.functional.interpolate(
                webm.frames.permute(0, 3, 1, 2).float(), size=(SIZE[1], SIZE[0]), mode="bilinear"
            )
            .round()
            .clamp(0, 255)
            .to(torch.uint8)
            .permute(0, 2, 3, 1)[i]
            .numpy()
        )
        for i in range(len(webm.plan.indices))
    ]
    assert barcodes == list(webm.plan.indices)
    # The region-caption record carries the green box on its second frame only.
    boxed, plain = good[5].frames, good[0].frames
    changed = (boxed.to(torch.int16) - plain.to(torch.int16)).abs().amax(dim=(1, 2, 3))
    assert changed.nonzero().flatten().tolist() == [1]


def test_collate_expands_the_placeholder_and_labels_the_answer(dataset_file, tokenizer):
    dataset = VideoDataset(RecordDataset(dataset_file))
    samples = [dataset[i] for i in (0, 1, 2)]
    collate = VideoCollator(tokenizer, with_answers=True)
    batch = collate(samples + [dataset[9]])
    assert len(batch) == 3 and [s.kind for s in batch.skipped] == ["unreadable_video"]
    pad_id = tokenizer.convert_tokens_to_ids(VIDEO_PAD)
    for i, sample in enumerate(samples):
        grid = batch.video_grid_thw[i].tolist()
        assert grid == [sample.plan.num_frames // 2, sample.plan.height // 14, sample.plan.width // 14]
        assert int((batch.input_ids[i] == pad_id).sum()) == video_token_count(grid)
        # Same ids as the Hugging Face processor's route: expand the placeholder in the text, then tokenize.
        text = collate.prompt_text(sample.record.question).replace(VIDEO_PAD, VIDEO_PAD * video_token_count(grid))
        expected = tokenizer(text + sample.record.answer, add_special_tokens=False)["input_ids"]
        n_prompt = int(batch.prompt_lengths[i])
        got = batch.input_ids[i, : int(batch.attention_mask[i].sum())].tolist()
        assert got[:n_prompt] == tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(got[n_prompt:]) == sample.record.answer + "<|im_end|>"
        assert len(got) >= len(expected)
        labels = batch.labels[i]
        assert (labels[:n_prompt] == IGNORE_INDEX).all()
        assert labels[n_prompt : len(got)].tolist() == got[n_prompt:]
        assert (labels[len(got) :] == IGNORE_INDEX).all() and (batch.attention_mask[i, len(got) :] == 0).all()
    assert batch.second_per_grid_ts.tolist() == [2.0, 2.0, 1.0]  # lists at metadata fps 1, the file at 2 fps


def test_collate_left_padding_and_prompt_only(dataset_file, tokenizer):
    dataset = VideoDataset(RecordDataset(dataset_file))
    batch = VideoCollator(tokenizer, padding_side="left")([dataset[0], dataset[2]])
    assert batch.labels is None
    lengths = batch.attention_mask.sum(1)
    assert lengths.tolist() == batch.prompt_lengths.tolist()
    assert (batch.attention_mask[:, -1] == 1).all()  # left padded: every prompt ends at the last column


def test_collate_skips_too_long_and_answerless(dataset_file, tokenizer):
    records = RecordDataset(dataset_file)
    dataset = VideoDataset(records)
    sample = dataset[0]
    answerless = type(sample)(
        record=type(sample.record)(**{**sample.record.__dict__, "answer": None}), frames=sample.frames, plan=sample.plan
    )
    batch = VideoCollator(tokenizer, with_answers=True, max_length=20)([sample, answerless])
    assert len(batch) == 0 and sorted(s.kind for s in batch.skipped) == ["no_answer", "too_long"]


def test_batch_to_device_patchifies_each_video(dataset_file, tokenizer):
    dataset = VideoDataset(RecordDataset(dataset_file))
    samples = [dataset[i] for i in (0, 1, 3)]
    batch = VideoCollator(tokenizer)(samples).to("cpu")
    rows = [reference.patchify(s.frames)[0] for s in samples]
    assert torch.equal(batch.pixel_values_videos, torch.cat(rows))
    assert batch.pixel_values_videos.shape[0] == int(batch.video_grid_thw.prod(1).sum())
    inputs = batch.model_inputs()
    assert set(inputs) == {
        "input_ids",
        "attention_mask",
        "pixel_values_videos",
        "video_grid_thw",
        "second_per_grid_ts",
        "mm_token_type_ids",
    }
    assert torch.equal(inputs["mm_token_type_ids"] == 2, inputs["input_ids"] == collate_pad_id(tokenizer))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_counts_skips_and_shards_by_rank(dataset_file, tokenizer, num_workers, caplog):
    records = RecordDataset(dataset_file)
    dataset = VideoDataset(records)
    collate = VideoCollator(tokenizer, with_answers=True)
    seen = []
    skipped_total = 0
    for rank in range(2):
        loader = VideoLoader(
            dataset, collate, batch_size=3, num_workers=num_workers, rank=rank, world_size=2, shuffle=True, seed=3
        )
        loader.set_epoch(1)
        with caplog.at_level(logging.WARNING, logger="medgrpo.data.loader"):
            for batch in loader:
                seen += [r.index for r in batch.records]
        skipped_total += loader.skipped_total
        assert loader.skipped_total == sum(loader.skipped.values())
    assert sorted(seen) == list(range(8))  # every good record exactly once over the two ranks
    assert skipped_total == 6
    assert sum("skipped record" in r.message for r in caplog.records) == 6


def _resources() -> tuple[int, int, int]:
    gc.collect()
    return open_file_count(), threading.active_count(), len(multiprocessing.active_children())


@pytest.mark.slow
def test_no_leaks_over_many_epochs(dataset_file, tokenizer):
    dataset = VideoDataset(RecordDataset(dataset_file))
    collate = VideoCollator(tokenizer, with_answers=True)
    loader = VideoLoader(dataset, collate, batch_size=4, num_workers=2, shuffle=True)
    list(loader)  # warm up lazy imports and codec libraries
    before = _resources()
    for epoch in range(12):
        loader.set_epoch(epoch)
        for i, _ in enumerate(loader):
            if epoch % 3 == 0 and i == 1:
                break  # an abandoned iterator must release its workers too
    del _
    after = _resources()
    assert after == before, f"(fds, threads, children) before {before}, after {after}"
    assert loader.skipped_total >= 6 * 8


def test_gray_and_cmyk_frames_become_rgb(dataset_file):
    sample = VideoDataset(RecordDataset(dataset_file))[4]
    frames = sample.frames.numpy().astype(np.int16)
    assert frames.shape[-1] == 3
    assert np.abs(frames[0, ..., 0] - frames[0, ..., 1]).max() <= 1  # gray stays gray


def collate_pad_id(tokenizer) -> int:
    return tokenizer.convert_tokens_to_ids(VIDEO_PAD)
