"""The demo's synthetic dataset: deterministic, loadable, decodable, scored perfectly by its own answers,
and its answers are in its pixels (phase tints, instrument boxes, CVS cues)."""

from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medgrpo.data.loader import SkippedSample, VideoDataset
from medgrpo.data.records import VideoRecord
from medgrpo.demo import synthetic
from medgrpo.demo.synthetic import (
    PROCEDURES,
    SPLITS,
    SYNTH_CHOLEC,
    SYNTH_NURSE,
    DemoDataset,
    answer_stats,
    dataset_fingerprint,
    decode_options,
    demo_tokenizer_corpus,
    generate_dataset,
    majority_baseline,
    plan_scene,
    render_frames,
)
from medgrpo.rewards.evaluate import evaluate_file
from medgrpo.rewards.metrics import EvalRecord, evaluate_records
from medgrpo.rewards.parsers import parse_answer, parse_next_action

SCORED = ("tag_miou_03", "tag_miou_05", "stg_miou", "nap_acc", "cvs_acc")
UNJUDGED = ("vs_llm",)  # video summaries are scored by the LLM judge only (none in tests)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> DemoDataset:
    """The default dataset (seed 0), generated once for the module."""
    return generate_dataset(tmp_path_factory.mktemp("demo") / "data", seed=0)


def all_records(dataset: DemoDataset) -> list[VideoRecord]:
    return [record for split in SPLITS for record in dataset.records(split)]


def frame_means(record: VideoRecord) -> np.ndarray:
    """(T, 3) mean colour of each stored frame of a record."""
    return np.stack([np.asarray(Image.open(p), np.float64).reshape(-1, 3).mean(0) for p in record.video])


# --- generation ----------------------------------------------------------------------------


def test_default_size_counts_and_time(tmp_path):
    start = time.perf_counter()
    demo = generate_dataset(tmp_path / "d", seed=0)
    elapsed = time.perf_counter() - start
    assert elapsed < 10.0
    counts = demo.manifest()["records"]
    assert counts == {split: len(demo.records(split)) for split in SPLITS}
    assert counts == {"train": 55, "val": 20, "test": 20}
    assert len(list((tmp_path / "d" / "frames").rglob("*.jpg"))) == 40 * 8


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    first = generate_dataset(tmp_path / "a", num_videos=6, seed=3)
    second = generate_dataset(tmp_path / "b", num_videos=6, seed=3)
    other = generate_dataset(tmp_path / "c", num_videos=6, seed=4)
    assert dataset_fingerprint(first.root) == dataset_fingerprint(second.root)
    assert first.train.read_bytes() == second.train.read_bytes()
    assert dataset_fingerprint(first.root) != dataset_fingerprint(other.root)
    # Regenerating in place (overwrite) reproduces the same bytes too.
    again = generate_dataset(tmp_path / "a", num_videos=6, seed=3, overwrite=True)
    assert dataset_fingerprint(again.root) == dataset_fingerprint(second.root)


def test_existing_dataset_needs_overwrite_and_bad_arguments_are_refused(tmp_path):
    generate_dataset(tmp_path / "d", num_videos=2, seed=0)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        generate_dataset(tmp_path / "d", num_videos=2, seed=0)
    bad = [
        {"num_videos": 1},
        {"frame_size": (16, 112)},
        {"frames_per_video": 3},
        {"fps": 0.0},
        {"fps": 12.0},
        {"split_fractions": (0.5, 0.5, 0.5)},
        {"split_fractions": (1.2, -0.1, -0.1)},
    ]
    for kwargs in bad:
        with pytest.raises(ValueError):
            generate_dataset(tmp_path / "x", **{"num_videos": 4, "seed": 0, **kwargs})
    with pytest.raises(FileNotFoundError, match="not a generated demo dataset"):
        DemoDataset.at(tmp_path / "nothing")


def test_splits_hold_whole_videos_and_every_source(dataset):
    videos = {split: {r.video_id for r in dataset.records(split)} for split in SPLITS}
    assert not videos["train"] & videos["val"] and not videos["train"] & videos["test"]
    assert not videos["val"] & videos["test"]
    for split in SPLITS:
        assert {r.data_source for r in dataset.records(split)} == {"SynthCholec", "SynthNurse"}
    assert synthetic.split_counts(20, (0.75, 0.125, 0.125)) == [15, 3, 2]
    assert synthetic.split_counts(3, (0.5, 0.5, 0.0)) == [2, 1, 0]


def test_nondefault_size_and_fps(tmp_path):
    demo = generate_dataset(tmp_path / "d", num_videos=4, seed=1, frame_size=(96, 64), frames_per_video=12, fps=2.0)
    records = all_records(demo)
    assert all(len(r.video) == 12 and r.fps == 2.0 for r in records)
    assert Image.open(records[0].video[0]).size == (96, 64)
    for record in records:
        if record.qa_type == "tal":
            ((start, end),) = parse_answer("tal", record.answer).value
            assert 0.0 <= start < end <= 6.0 and (start * 2).is_integer() and (end * 2).is_integer()
        if record.qa_type == "stg":
            for x1, y1, x2, y2 in parse_answer("stg", record.answer).value.timed.values():
                assert 0 <= x1 < x2 <= 96 and 0 <= y1 < y2 <= 64


# --- loading and decoding ------------------------------------------------------------------


def test_records_load_and_decode_at_the_demo_budget(dataset):
    for split in SPLITS:
        records = dataset.records(split)
        assert len(records) > 0
        decoded = VideoDataset(records, decode_options())
        for i in range(len(decoded)):
            sample = decoded[i]
            assert not isinstance(sample, SkippedSample), sample
            assert sample.frames.shape == (8, 56, 56, 3)
            assert sample.plan.indices == tuple(range(8)) and sample.plan.sample_fps == 1.0
            record = sample.record
            assert record.id == f"{record.video_id}_{record.qa_type}" and not record.is_rc
            assert (record.start_frame, record.end_frame) == (
                int(record.video[0].stem),
                int(record.video[-1].stem),
            )
            assert record.end_frame - record.start_frame == 7
    full = VideoDataset(dataset.records("val"), decode_options(112))[0]
    assert full.frames.shape == (8, 112, 112, 3)
    with pytest.raises(ValueError, match="multiple of 28"):
        decode_options(50)


def test_raw_records_have_the_medvidbench_fields(dataset):
    raw = dataset.records("train").raw(0)
    assert set(raw) == {
        "id",
        "conversations",
        "video",
        "metadata",
        "qa_type",
        "data_source",
        "struc_info",
        "is_RC",
        "RC_info",
    }
    assert raw["conversations"][0]["from"] == "human" and raw["conversations"][0]["value"].startswith("<video>\n")
    assert raw["conversations"][1]["from"] == "gpt"
    assert raw["metadata"]["fps"] == "1.0" and all(not Path(p).is_absolute() for p in raw["video"])


# --- answers and metrics -------------------------------------------------------------------


def test_reference_answers_follow_the_formats(dataset):
    records = all_records(dataset)
    assert {(r.data_source, r.qa_type) for r in records} == {
        (source.data_source, qa_type) for source in PROCEDURES for qa_type in source.qa_types
    }
    for record in records:
        parsed = parse_answer(record.qa_type, record.answer)
        assert parsed.follows_format, (record.qa_type, record.answer)
        if record.qa_type == "next_action":
            options = record.struc_info[0]["options"]
            assert ", ".join(options) in record.question
            parsed = parse_next_action(record.answer, options)
            assert parsed.value == record.answer and parsed.follows_format
        if record.qa_type == "stg":
            for key in parse_answer("stg", record.answer).value.timed:
                assert key in record.question


def eval_records(records: list[VideoRecord], answers: list[str]) -> list[EvalRecord]:
    return [
        EvalRecord(
            key=str(i),
            qa_type=r.qa_type_raw,
            data_source=r.data_source,
            answer=a,
            gnd=r.answer,
            question=r.question,
            struc_info=r.struc_info,
            fps=r.metadata["fps"],
        )
        for i, (r, a) in enumerate(zip(records, answers))
    ]


def rotated_answers(records: list[VideoRecord]) -> list[str]:
    """Each record given the reference of the next record of its (data_source, qa_type)."""
    groups: dict[tuple[str, str], list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        groups[(r.data_source, r.qa_type)].append(i)
    answers = [r.answer for r in records]
    for members in groups.values():
        for i, j in zip(members, members[1:] + members[:1]):
            answers[i] = records[j].answer
    return answers


def overall(results: dict) -> dict[str, float]:
    scores = {k: v for result in results.values() for k, v in result.overall.items()}
    assert all(scores.pop(k) is None for k in UNJUDGED)
    return scores


def test_reference_predictions_score_perfectly_and_shuffled_ones_do_not(dataset):
    records = all_records(dataset)
    perfect = evaluate_records(eval_records(records, [r.answer for r in records]))
    assert overall(perfect) == dict.fromkeys(SCORED, 1.0)
    assert all(not result.malformed and not result.skipped for result in perfect.values())
    judged = sum(r.qa_type in ("video_summary",) for r in records)  # left for the judge
    assert sum(result.evaluated for result in perfect.values()) == len(records) - judged
    held_out = [r for split in ("val", "test") for r in dataset.records(split)]
    for subset in (records, held_out):
        shuffled = overall(evaluate_records(eval_records(subset, rotated_answers(subset))))
        assert set(shuffled) == set(SCORED)
        assert all(value < 0.5 for value in shuffled.values()), shuffled


def test_official_results_file_of_the_references_scores_perfectly(dataset, tmp_path):
    entries = {}
    for i, record in enumerate(dataset.records("test")):
        raw = dataset.records("test").raw(i)
        entries[str(i)] = {
            "question": record.question,
            "answer": record.answer,
            "gnd": record.answer,
            "qa_type": raw["qa_type"],
            "data_source": raw["data_source"],
            "struc_info": raw["struc_info"],
            "metadata": raw["metadata"],
        }
    path = tmp_path / "results.json"
    path.write_text(json.dumps(entries))
    summary = evaluate_file(path)
    assert {k: summary[k] for k in SCORED} == dict.fromkeys(SCORED, 1.0)
    assert summary["average"] == 1.0 and summary["malformed"] == [] and summary["skipped"] == []
    cholec = {"tag_miou_03": 1.0, "tag_miou_05": 1.0, "nap_acc": 1.0, "cvs_acc": 1.0}
    assert summary["per_dataset"]["SynthCholec"] == cholec
    assert summary["per_dataset"]["SynthNurse"] == {"stg_miou": 1.0, "vs_llm": None}


# --- the answers are in the pixels ---------------------------------------------------------


def nearest_tint(procedure, means: np.ndarray) -> np.ndarray:
    """Phase index of each frame: the procedure tint (as rendered: x0.97 mean light) nearest its mean colour."""
    tints = np.asarray(procedure.tints, np.float64) * 0.97
    return np.argmin(((means[:, None, :] - tints[None]) ** 2).sum(-1), axis=1)


@pytest.mark.parametrize(
    ("procedure", "min_gap"),
    # SynthNurse's injection and dressing tints are close on purpose (its instruments tell them apart).
    [(SYNTH_CHOLEC, 40.0), (SYNTH_NURSE, 10.0)],
    ids=lambda p: getattr(p, "data_source", ""),
)
def test_phases_are_visually_separable(procedure, min_gap):
    """Per-frame median colours: phase centroids apart, every frame nearest its own phase's (and its tint)."""
    medians, labels = [], []
    for index in range(24):
        rng = np.random.default_rng([11, index])
        scene = plan_scene(
            procedure, f"v{index}", size=(112, 112), frames=8, rng=rng, last_phase=index % len(procedure.phases)
        )
        frames = render_frames(scene, (112, 112), rng)
        medians.append(np.median(frames.reshape(8, -1, 3), axis=1))
        labels.extend(scene.phase_of_frame)
    medians_array, labels_array = np.concatenate(medians), np.asarray(labels)
    assert set(labels) == set(range(len(procedure.phases)))
    centroids = np.stack([medians_array[labels_array == p].mean(0) for p in range(len(procedure.phases))])
    gaps = [np.linalg.norm(a - b) for i, a in enumerate(centroids) for b in centroids[i + 1 :]]
    assert min(gaps) > min_gap
    nearest = np.argmin(((medians_array[:, None] - centroids[None]) ** 2).sum(-1), axis=1)
    assert (nearest == labels_array).all()
    assert (nearest_tint(procedure, medians_array) == labels_array).all()


def test_tal_spans_are_the_frames_of_the_asked_phase(dataset):
    procedures = {p.data_source: p for p in PROCEDURES}
    checked = 0
    for record in all_records(dataset):
        if record.qa_type != "tal":
            continue
        procedure = procedures[record.data_source]
        phase = procedure.phases.index(record.struc_info[0]["label"])
        frames = np.flatnonzero(nearest_tint(procedure, frame_means(record)) == phase)
        ((start, end),) = parse_answer("tal", record.answer).value
        assert (start, end) == (frames[0] / record.fps, (frames[-1] + 1) / record.fps)
        assert len(frames) == frames[-1] - frames[0] + 1  # one contiguous span
        checked += 1
    assert checked == 20  # the SynthCholec videos


def test_next_action_is_the_phase_after_the_last_frame(dataset):
    procedures = {p.data_source: p for p in PROCEDURES}
    for record in all_records(dataset):
        if record.qa_type == "next_action":
            procedure = procedures[record.data_source]
            last = nearest_tint(procedure, frame_means(record))[-1]
            assert record.answer == procedure.phases[last + 1]


def instrument_distance(pixels: np.ndarray, instrument) -> np.ndarray:
    """Colour distance of each (N, 3) pixel to the instrument as drawn: its body under any
    shade in [0.85, 1.1] (the nearest point of that segment), or its tip."""
    body = np.asarray(instrument.color, np.float64)
    shade = np.clip(pixels @ body / (body @ body), 0.85, 1.1)
    to_body = np.linalg.norm(pixels - shade[:, None] * body, axis=1)
    to_tip = np.linalg.norm(pixels - np.asarray(instrument.tip, np.float64), axis=1)
    return np.minimum(to_body, to_tip)


def test_stg_boxes_hold_the_instrument(dataset):
    procedures = {p.data_source: p for p in PROCEDURES}
    checked = 0
    for record in all_records(dataset):
        if record.qa_type != "stg":
            continue
        instrument = procedures[record.data_source].instrument(record.struc_info[0]["instrument"])
        for time_key, (x1, y1, x2, y2) in record.struc_info[0]["bbox_dict"].items():
            frame = np.asarray(Image.open(record.video[round(float(time_key) * record.fps)]), np.float64)
            inside = instrument_distance(frame[y1:y2, x1:x2].reshape(-1, 3), instrument)
            assert (inside < 30).mean() > 0.6, (record.id, time_key)
            # The box is tight: the 2-pixel bands just above and below it are not the instrument.
            ring = np.concatenate(
                [frame[max(y1 - 2, 0) : y1, x1:x2].reshape(-1, 3), frame[y2 : y2 + 2, x1:x2].reshape(-1, 3)]
            )
            if len(ring):
                assert (instrument_distance(ring, instrument) < 30).mean() < 0.4, (record.id, time_key)
            checked += 1
    assert checked == 20 * synthetic.STG_TIMES  # the SynthNurse videos


def test_stg_instrument_is_still_on_the_grid_and_drawn_on_top(dataset):
    """The asked instrument sits on the coarse grid, the same box on every frame, never hidden."""
    cell = synthetic.FRAME_SIZE[0] // synthetic.STG_GRID
    for record in all_records(dataset):
        if record.qa_type != "stg":
            continue
        instrument = SYNTH_NURSE.instrument(record.struc_info[0]["instrument"])
        ((time_key, box),) = record.struc_info[0]["bbox_dict"].items()
        assert time_key == "0.0" and all(v % cell == 0 for v in box)
        x1, y1, x2, y2 = box
        assert (x2 - x1, y2 - y1) == (round(instrument.width * 112), round(instrument.height * 112))
        for path in record.video:
            inside = np.asarray(Image.open(path), np.float64)[y1:y2, x1:x2].reshape(-1, 3)
            assert (instrument_distance(inside, instrument) < 30).mean() > 0.9, (record.id, path)


def test_video_summaries_say_what_happens_on_the_last_frame(dataset):
    checked = 0
    for record in all_records(dataset):
        if record.qa_type != "video_summary":
            continue
        last = np.median(np.asarray(Image.open(record.video[-1])).reshape(-1, 3), axis=0)
        (phase,) = nearest_tint(SYNTH_NURSE, last[None]).tolist()
        assert record.answer == SYNTH_NURSE.summaries[phase]
        assert record.struc_info == [{"phase": SYNTH_NURSE.phases[phase]}]
        checked += 1
    assert checked == 20
    sentences = answer_stats(all_records(dataset))[("SynthNurse", "video_summary", "answer")].counts
    assert set(sentences) == set(SYNTH_NURSE.summaries) and max(sentences.values()) - min(sentences.values()) <= 1


def test_cvs_cues_are_countable(dataset):
    """Yellow duct pixels grow with 'two structures'; pale patch and dark triangle with their scores."""
    yellow, pale, dark = (245, 225, 90), (240, 215, 205), (45, 20, 25)
    by_score: dict[str, dict[int, list[int]]] = {k: defaultdict(list) for k in ("two", "plate", "triangle")}
    for record in all_records(dataset):
        if record.qa_type != "cvs_assessment":
            continue
        frame = np.asarray(Image.open(record.video[0]), np.float64)
        scores = record.struc_info[0]["cvs_scores"]
        for name, colour, region, score in (
            ("two", yellow, frame, scores["two_structures"]),
            ("plate", pale, frame[56:, :56], scores["cystic_plate"]),
            ("triangle", dark, frame[:56, 56:], scores["hepatocystic_triangle"]),
        ):
            count = int((np.sqrt(((region - colour) ** 2).sum(-1)) < 40).sum())
            by_score[name][score].append(count)
    for name, counts in by_score.items():
        assert sorted(counts) == [0, 1, 2], name
        assert max(counts[0]) < min(counts[1]) and max(counts[1]) < min(counts[2]), (name, dict(counts))


# --- helpers -------------------------------------------------------------------------------


def test_tokenizer_corpus_trains_the_demo_tokenizer(dataset, tmp_path):
    from medgrpo.demo.tiny_model import build_tokenizer

    corpus = demo_tokenizer_corpus(dataset)
    records = all_records(dataset)
    assert len(corpus) == 2 * len(records)
    assert corpus[:2] == [records[0].question, records[0].answer]
    assert all("<video>" not in text for text in corpus)
    tokenizer = build_tokenizer(tmp_path / "tok", corpus=corpus)
    for record in records[:8]:
        ids = tokenizer(record.answer, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == record.answer
    # The words of the label answers are in the vocabulary as whole tokens: answers are short in tokens.
    labels = [r.answer for r in records if r.qa_type in ("next_action", "cvs_assessment")]
    words = {word.strip(".,:") for answer in labels for word in answer.split() if word.strip(".,:").isalpha()}
    assert max(len(tokenizer(" " + word, add_special_tokens=False)["input_ids"]) for word in words) <= 2


def record(answer: str, qa_type: str = "next_action", source: str = "S", struc_info=None) -> VideoRecord:
    return VideoRecord(
        index=0,
        id=None,
        question="q",
        answer=answer,
        qa_type=qa_type,
        qa_type_raw=qa_type,
        data_source=source,
        video=(Path("/x.jpg"),),
        fps=1.0,
        struc_info=struc_info,
    )


def test_answer_stats_and_majority_baseline():
    cvs = [{"cvs_scores": {"two_structures": 2, "cystic_plate": 0, "hepatocystic_triangle": 1}}]
    train = [
        record("b"),
        record("a"),
        record("b"),
        record("c", source="T"),
        record("Two structures: 2, Cystic plate: 0, Hepatocystic triangle: 1", "cvs_assessment", struc_info=cvs),
    ]
    stats = answer_stats(train)
    assert stats[("S", "next_action", "answer")].counts == {"a": 1, "b": 2}
    assert stats[("S", "next_action", "answer")].majority == "b"
    assert stats[("S", "next_action", "answer")].fraction("b") == pytest.approx(2 / 3)
    assert stats[("S", "cvs_assessment", "two_structures")].counts == {"2": 1}
    assert stats[("S", "cvs_assessment", "cystic_plate")].majority == "0"
    assert answer_stats([record("x"), record("w")])[("S", "next_action", "answer")].majority == "w"  # tie: sorted
    held_out = [record("b"), record("a"), record("a"), record("a", source="T"), record("z", source="U")]
    baseline = majority_baseline(train, held_out)
    assert baseline[("S", "next_action", "answer")] == pytest.approx(1 / 3)
    assert baseline[("T", "next_action", "answer")] == 0.0
    assert baseline[("U", "next_action", "answer")] == 0.0


def test_default_dataset_next_action_labels_are_balanced(dataset):
    stats = answer_stats(all_records(dataset))
    cholec = stats[("SynthCholec", "next_action", "answer")].counts
    assert set(cholec) == {"dissection", "clipping", "retraction"}
    assert max(cholec.values()) - min(cholec.values()) <= 1
    train = list(dataset.records("train"))
    held_out = [r for split in ("val", "test") for r in dataset.records(split)]
    baseline = majority_baseline(train, held_out)
    assert baseline[("SynthCholec", "next_action", "answer")] < 0.5
