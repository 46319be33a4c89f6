"""records: valid records build, each malformed field is named, paths stay in the root, loading is lazy."""

from __future__ import annotations

import copy
import json
import os
import pickle
from pathlib import Path

import pytest

from medgrpo.data import records
from medgrpo.data.records import (
    RecordDataset,
    RecordError,
    RegionCaptionInfo,
    parse_record,
    resolve_path,
)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    (data / "clips").mkdir(parents=True)
    return data


def frame_list_record(**overrides) -> dict:
    record = {
        "id": "clip-7",
        "conversations": [
            {"from": "human", "value": "<video>\nFind the segment(s) where tying happens."},
            {"from": "gpt", "value": "1.0-3.0 seconds."},
        ],
        "video": [f"clips/vid1/{i:06d}.jpg" for i in (0, 30, 60, 90)],
        "metadata": {"fps": "1.0", "video_id": "vid1", "input_video_start_frame": "0", "input_video_end_frame": "90"},
        "qa_type": "tal",
        "data_source": "AVOS",
        "struc_info": [{"span": [1.0, 3.0], "label": "tying"}],
        "is_RC": False,
        "RC_info": {},
    }
    record.update(overrides)
    return record


def test_frame_list_record(root):
    record = parse_record(frame_list_record(), index=7, root=root)
    assert record.index == 7 and record.id == "clip-7"
    assert record.question == "Find the segment(s) where tying happens."
    assert record.answer == "1.0-3.0 seconds."
    assert (record.qa_type, record.qa_type_raw, record.data_source) == ("tal", "tal", "AVOS")
    assert record.is_frame_list and record.video == tuple(
        Path(os.path.realpath(root)) / "clips" / "vid1" / f"{i:06d}.jpg" for i in (0, 30, 60, 90)
    )
    assert (record.fps, record.video_id, record.start_frame, record.end_frame) == (1.0, "vid1", 0, 90)
    assert record.struc_info == [{"span": [1.0, 3.0], "label": "tying"}]
    assert not record.is_rc and record.rc_info is None
    assert record.submission_id == "vid1&&0&&90&&1.0"
    assert record == parse_record(frame_list_record(), index=7, root=root) and hash(record)


def test_video_file_record_without_answer(root):
    raw = frame_list_record(
        video="clips/case3.mp4",
        conversations=[{"from": "human", "value": "Summarize the video. <video>"}],
        metadata={"fps": 29.97, "video_id": 3, "start_frame": 120, "end_frame": 480},
        qa_type="video_summary_gemini",
        data_source=None,
        dataset_name="CoPESD",
    )
    del raw["id"]
    record = parse_record(raw, index=0, root=root)
    assert not record.is_frame_list and record.video == Path(os.path.realpath(root)) / "clips" / "case3.mp4"
    assert record.id is None and record.answer is None and record.question == "Summarize the video. "
    assert (record.qa_type, record.qa_type_raw, record.data_source) == (
        "video_summary",
        "video_summary_gemini",
        "CoPESD",
    )
    assert (record.fps, record.video_id, record.start_frame, record.end_frame) == (29.97, "3", 120, 480)
    assert record.submission_id == "3&&120&&480&&29.97"


def test_region_caption_record(root):
    raw = frame_list_record(qa_type="region_caption_gpt", is_RC=True)
    raw["RC_info"] = {"start_frame": raw["video"][1], "start_frame_bbox": [10, 20.5, 300, 400]}
    record = parse_record(raw, index=0, root=root)
    assert record.is_rc and record.qa_type == "region_caption"
    assert record.rc_info == RegionCaptionInfo(
        frame_index=1, bbox=(10.0, 20.5, 300.0, 400.0), start_frame=record.video[1]
    )
    video_file = frame_list_record(
        video="clips/a.mp4", is_RC=True, RC_info={"start_frame": 12, "start_frame_bbox": [0, 0, 1, 1]}
    )
    assert parse_record(video_file, index=0, root=root).rc_info == RegionCaptionInfo(12, (0.0, 0.0, 1.0, 1.0))


def _set(path: str, value):
    """A mutation of the raw record: set (or, for value DELETE, remove) a dotted key."""

    def mutate(raw: dict) -> None:
        *parents, last = path.split(".")
        target = raw
        for key in parents:
            target = target[int(key)] if key.isdigit() else target[key]
        if value is DELETE:
            del target[int(last) if last.isdigit() else last]
        else:
            target[int(last) if last.isdigit() else last] = value

    return mutate


DELETE = object()
HUMAN = "conversations.0.value"

MALFORMED = {
    "no_conversations": (_set("conversations", DELETE), "conversations"),
    "empty_conversations": (_set("conversations", []), "conversations"),
    "conversations_not_a_list": (_set("conversations", "hi"), "conversations"),
    "three_turns": (_set("conversations", [{"from": "human", "value": "<video>\nQ?"}] * 3), "conversations"),
    "no_video_tag": (_set(HUMAN, "What happens next?"), "conversations[0].value"),
    "two_video_tags": (_set(HUMAN, "<video>\n<video>\nCompare."), "conversations[0].value"),
    "only_the_tag": (_set(HUMAN, "<video>\n"), "conversations[0].value"),
    "question_not_a_string": (_set(HUMAN, ["<video>"]), "conversations[0].value"),
    "first_turn_from_gpt": (_set("conversations.0.from", "gpt"), "conversations[0].from"),
    "second_turn_from_human": (_set("conversations.1.from", "human"), "conversations[1].from"),
    "answer_missing": (_set("conversations.1.value", DELETE), "conversations[1].value"),
    "turn_not_an_object": (_set("conversations.1", "answer"), "conversations[1]"),
    "no_qa_type": (_set("qa_type", DELETE), "qa_type"),
    "unknown_qa_type": (_set("qa_type", "captioning"), "qa_type"),
    "variant_of_non_caption_task": (_set("qa_type", "tal_gpt"), "qa_type"),
    "qa_type_not_a_string": (_set("qa_type", 3), "qa_type"),
    "no_data_source": (_set("data_source", DELETE), "data_source"),
    "empty_data_source": (_set("data_source", ""), "data_source"),
    "no_video": (_set("video", DELETE), "video"),
    "empty_frame_list": (_set("video", []), "video"),
    "video_not_a_path": (_set("video", 5), "video"),
    "frame_not_a_string": (_set("video.1", 3), "video[1]"),
    "empty_frame_path": (_set("video.2", ""), "video[2]"),
    "url": (_set("video", "https://example.invalid/a.mp4"), "video"),
    "no_metadata": (_set("metadata", DELETE), "metadata"),
    "metadata_not_an_object": (_set("metadata", [1.0]), "metadata"),
    "no_fps": (_set("metadata.fps", DELETE), "metadata.fps"),
    "non_numeric_fps": (_set("metadata.fps", "fast"), "metadata.fps"),
    "nan_fps": (_set("metadata.fps", "nan"), "metadata.fps"),
    "zero_fps": (_set("metadata.fps", 0), "metadata.fps"),
    "boolean_fps": (_set("metadata.fps", True), "metadata.fps"),
    "start_after_end": (_set("metadata.input_video_start_frame", "91"), "metadata.input_video_start_frame"),
    "negative_start": (_set("metadata.input_video_start_frame", -1), "metadata.input_video_start_frame"),
    "fractional_start": (_set("metadata.input_video_start_frame", "1.5"), "metadata.input_video_start_frame"),
    "non_numeric_end": (_set("metadata.input_video_end_frame", "end"), "metadata.input_video_end_frame"),
    "video_id_not_a_string": (_set("metadata.video_id", ["vid1"]), "metadata.video_id"),
    "is_rc_not_a_boolean": (_set("is_RC", "yes"), "is_RC"),
    "id_not_a_string": (_set("id", {"a": 1}), "id"),
}


@pytest.mark.parametrize(("mutate", "field"), MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_field_names_record_and_field(root, mutate, field):
    raw = frame_list_record()
    mutate(raw)
    with pytest.raises(RecordError) as caught:
        parse_record(raw, index=41, root=root)
    error = caught.value
    assert (error.index, error.field) == (41, field)
    assert "record 41" in str(error) and repr(field) in str(error)
    if field != "id":
        assert error.record_id == "clip-7" and "'clip-7'" in str(error)


FRAME = "clips/vid1/000030.jpg"
RC_MALFORMED = {
    "no_rc_info": (None, "RC_info"),
    "rc_info_not_an_object": ([], "RC_info"),
    "empty_rc_info": ({}, "RC_info.start_frame_bbox"),
    "bbox_of_three": ({"start_frame": FRAME, "start_frame_bbox": [1, 2, 3]}, "RC_info.start_frame_bbox"),
    "bbox_inverted": ({"start_frame": FRAME, "start_frame_bbox": [9, 2, 3, 4]}, "RC_info.start_frame_bbox"),
    "bbox_not_numbers": ({"start_frame": FRAME, "start_frame_bbox": [1, "a", 3, 4]}, "RC_info.start_frame_bbox"),
    "no_start_frame": ({"start_frame_bbox": [1, 2, 3, 4]}, "RC_info.start_frame"),
    "start_frame_not_a_frame": (
        {"start_frame": "clips/vid1/31.jpg", "start_frame_bbox": [1, 2, 3, 4]},
        "RC_info.start_frame",
    ),
    "start_frame_outside_root": ({"start_frame": "../x.jpg", "start_frame_bbox": [1, 2, 3, 4]}, "RC_info.start_frame"),
}


@pytest.mark.parametrize(("rc_info", "field"), RC_MALFORMED.values(), ids=RC_MALFORMED.keys())
def test_malformed_region_caption_info(root, rc_info, field):
    raw = frame_list_record(qa_type="region_caption", is_RC=True, RC_info=rc_info)
    with pytest.raises(RecordError) as caught:
        parse_record(raw, index=2, root=root)
    assert caught.value.field == field


def test_rc_info_is_ignored_without_is_rc(root):
    raw = frame_list_record(qa_type="region_caption", RC_info={"start_frame": "elsewhere.jpg"})
    assert parse_record(raw, index=0, root=root).rc_info is None


def test_non_object_record():
    with pytest.raises(RecordError, match="record 5: a record must be a JSON object") as caught:
        parse_record(["<video>"], index=5, root=".")
    assert caught.value.field is None


@pytest.mark.parametrize(
    "path",
    ["../outside.jpg", "clips/../../outside.jpg", "/etc/hostname", "escape/secret.jpg", "escape"],
)
def test_paths_may_not_escape_the_root(root, path):
    outside = root.parent / "outside"
    outside.mkdir()
    (root / "escape").symlink_to(outside, target_is_directory=True)
    with pytest.raises(RecordError, match="outside the dataset root") as caught:
        parse_record(frame_list_record(video=["clips/a.jpg", path]), index=0, root=root)
    assert caught.value.field == "video[1]"


def test_paths_inside_the_root(root):
    real = Path(os.path.realpath(root))
    (root / "alias").symlink_to(root / "clips", target_is_directory=True)
    assert resolve_path("alias/a.jpg", root) == real / "clips" / "a.jpg"  # symlinks resolved
    assert resolve_path("clips/x/../a.jpg", root) == real / "clips" / "a.jpg"
    assert resolve_path(str(root / "clips" / "a.jpg"), root) == real / "clips" / "a.jpg"
    rebased = resolve_path("/root/data/clips/a.jpg", root, source_root="/root/data")
    assert rebased == real / "clips" / "a.jpg"
    with pytest.raises(ValueError, match="outside the dataset root"):
        resolve_path("/root/data/../etc/passwd", root, source_root="/root/data/")
    with pytest.raises(ValueError, match="absolute"):
        resolve_path("a.jpg", root, source_root="data")


def test_region_caption_frame_resolves_like_the_frames(tmp_path):
    raw = frame_list_record(qa_type="region_caption", is_RC=True, video=["/root/data/f0.jpg", "/root/data/f1.jpg"])
    raw["RC_info"] = {"start_frame": "/root/data/f1.jpg", "start_frame_bbox": [0, 0, 5, 5]}
    record = parse_record(raw, index=0, root=tmp_path, source_root="/root/data")
    assert record.rc_info.frame_index == 1 and record.rc_info.start_frame == Path(os.path.realpath(tmp_path)) / "f1.jpg"


def _write_json(path: Path, items: list) -> Path:
    path.write_text(json.dumps(items))
    return path


def test_json_list_dataset(root):
    bad = frame_list_record(metadata={"fps": "x"})
    path = _write_json(root / "train.json", [frame_list_record(), bad, frame_list_record(qa_type="stg")])
    dataset = RecordDataset(path)  # the bad record does not fail construction
    assert len(dataset) == 3 and dataset.root == Path(os.path.realpath(root))
    assert dataset[0].qa_type == "tal" and dataset[-1].qa_type == "stg" and dataset[2].index == 2
    assert dataset.raw(1) == bad
    with pytest.raises(RecordError, match="record 1 .*'metadata.fps'"):
        dataset[1]
    with pytest.raises(IndexError):
        dataset[3]
    with pytest.raises(TypeError):
        dataset["0"]


def test_jsonl_dataset(root, tmp_path):
    lines = [json.dumps(frame_list_record(qa_type=t)) for t in ("tal", "stg")]
    path = root / "test.jsonl"
    path.write_text("\n" + lines[0] + "\n\n  \n" + lines[1] + "\n{not json\n")
    dataset = RecordDataset(path, root=root)
    assert len(dataset) == 3
    assert [dataset[i].qa_type for i in range(2)] == ["tal", "stg"]
    with pytest.raises(RecordError, match="record 2: .*not valid JSON"):
        dataset[2]
    copy_ = pickle.loads(pickle.dumps(dataset))
    assert copy_[1] == dataset[1]
    assert len(RecordDataset(_write_json(tmp_path / "empty.jsonl", []), root=root)) == 0
    (tmp_path / "empty.jsonl").write_text("")
    assert len(RecordDataset(tmp_path / "empty.jsonl", root=root)) == 0


def test_iteration_and_dataset_root_checks(root, tmp_path):
    path = _write_json(root / "train.json", [frame_list_record(), frame_list_record()])
    assert [r.index for r in RecordDataset(path)] == [0, 1]
    outside = _write_json(tmp_path / "other.json", [frame_list_record(video="../a.mp4")])
    with pytest.raises(RecordError, match="outside the dataset root"):
        RecordDataset(outside, root=root)[0]
    (tmp_path / "object.json").write_text("[1]")
    with pytest.raises(RecordError, match="JSON object"):
        RecordDataset(tmp_path / "object.json")[0]
    with pytest.raises(ValueError, match="absolute"):
        RecordDataset(path, source_root="relative/dir")
    with pytest.raises(ValueError, match="not a directory"):
        RecordDataset(path, root=path)
    (tmp_path / "results.json").write_text(json.dumps({"0": frame_list_record()}, indent=2))
    with pytest.raises(ValueError, match="expected a JSON list"):
        RecordDataset(tmp_path / "results.json")


@pytest.fixture
def counters(monkeypatch) -> dict[str, int]:
    """Counts of records decoded, validated and paths resolved from now on."""
    counts = {"decode": 0, "parse": 0, "resolve": 0}

    def counting(name: str, function):
        def wrapper(*args, **kwargs):
            counts[name] += 1
            return function(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(records, "_decode_line", counting("decode", records._decode_line))
    monkeypatch.setattr(records, "parse_record", counting("parse", records.parse_record))
    monkeypatch.setattr(records, "_resolve_inside", counting("resolve", records._resolve_inside))
    return counts


def test_jsonl_is_indexed_not_parsed(root, counters):
    size = 200_000
    line = json.dumps(
        {
            "conversations": [{"from": "human", "value": "<video>\nQ?"}],
            "video": "clips/v.mp4",
            "metadata": {"fps": 1},
            "qa_type": "tal",
            "data_source": "AVOS",
        }
    )
    path = root / "big.jsonl"
    path.write_text((line + "\n") * size)
    dataset = RecordDataset(path)
    assert len(dataset) == size
    assert counters == {"decode": 0, "parse": 0, "resolve": 0}
    assert [dataset[i].index for i in (0, 123_456, -1)] == [0, 123_456, size - 1]
    assert counters == {"decode": 3, "parse": 3, "resolve": 3}


def test_json_list_is_not_validated_at_construction(root, counters):
    items = [frame_list_record() for _ in range(1000)]
    dataset = RecordDataset(_write_json(root / "train.json", items))
    assert len(dataset) == 1000 and counters["parse"] == counters["resolve"] == 0
    assert dataset[999].index == 999
    assert counters["parse"] == 1 and counters["resolve"] == len(items[0]["video"])


def test_records_do_not_alias_the_raw_json(root):
    raw = frame_list_record()
    original = copy.deepcopy(raw)
    record = parse_record(raw, index=0, root=root)
    raw["metadata"]["fps"] = "9.0"
    assert record.metadata["fps"] == original["metadata"]["fps"]
    with pytest.raises(TypeError):
        record.metadata["fps"] = "2.0"


def test_records_pickle_for_dataloader_workers(root):
    record = parse_record(frame_list_record(), index=7, root=root)
    clone = pickle.loads(pickle.dumps(record))
    assert clone == record and dict(clone.metadata) == dict(record.metadata)
    with pytest.raises(TypeError):
        clone.metadata["fps"] = "2.0"  # still read-only
