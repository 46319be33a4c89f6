"""task_key: the one reading of a record's task type, and the "data_source/qa_type" key."""

from __future__ import annotations

import pytest

from medgrpo.data.task_key import QA_TYPES, TaskKey, format_task_key, normalize_qa_type, task_of


@pytest.mark.parametrize(
    ("qa_type", "task"),
    [(t, t) for t in QA_TYPES]
    + [(f"{t}_{v}", t) for t in ("dense_captioning", "video_summary", "region_caption") for v in ("gpt", "gemini")]
    + [("dc", "dense_captioning")],
)
def test_qa_type_normalization(qa_type, task):
    assert normalize_qa_type(qa_type) == task
    assert task_of(qa_type) == task


@pytest.mark.parametrize("qa_type", ["tal_gpt", "TAL", "free_text", "", None, 3])
def test_unknown_qa_types(qa_type):
    assert task_of(qa_type) is None
    with pytest.raises(ValueError, match="unknown qa_type"):
        normalize_qa_type(qa_type)


def test_task_key_folds_caption_variants_and_keeps_unknown_types():
    assert TaskKey.of("NurViD", "dense_captioning_gpt") == ("NurViD", "dense_captioning")
    assert TaskKey.of("AVOS", "video_summary_gemini") == ("AVOS", "video_summary")
    assert TaskKey.of("AVOS", "tal") == ("AVOS", "tal")
    assert TaskKey.of("AVOS", "free_text") == ("AVOS", "free_text")


def test_task_key_string_round_trip():
    key = TaskKey.of("CholecT50", "region_caption_gpt")
    assert str(key) == format_task_key("CholecT50", "region_caption_gpt") == "CholecT50/region_caption"
    assert TaskKey.parse(str(key)) == key
    assert TaskKey.parse("Cholec80/CVS/cvs_assessment") == ("Cholec80/CVS", "cvs_assessment")
    with pytest.raises(ValueError, match="data_source/qa_type"):
        TaskKey.parse("tal")
