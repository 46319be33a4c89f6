"""Parsers: the values the official evaluator reads, the strict format flag, never raising."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medgrpo.rewards.parsers import (
    DenseEvent,
    parse_answer,
    parse_caption,
    parse_cvs,
    parse_dense_captioning,
    parse_next_action,
    parse_skill,
    parse_stg,
    parse_tal,
)

SKILL_ANSWER = (
    "Respect for tissue: 2/5, Suture/needle handling: 3/5, Time and motion: 3/5, "
    "Flow of operation: 2/5, Overall performance: 3/5, Quality of final product: 4/5"
)


class TestTal:
    def test_one_shot_formats(self):
        assert parse_tal("1.1-3.0 seconds.").value == ((1.1, 3.0),)
        parsed = parse_tal("22.0-78.0, 89.0-94.0 seconds.")
        assert parsed.value == ((22.0, 78.0), (89.0, 94.0)) and parsed.follows_format

    def test_prose_is_read_but_breaks_the_format(self):
        parsed = parse_tal("The surgeon ties the knot during 12.5 - 20 seconds.")
        assert parsed.value == ((12.5, 20.0),) and not parsed.follows_format

    def test_reversed_span_breaks_the_format(self):
        parsed = parse_tal("9.0-3.0 seconds.")
        assert parsed.value == ((9.0, 3.0),) and not parsed.follows_format

    def test_zero_shot_fallback_rounds_to_two_decimals(self):
        assert parse_tal("It happens from 1.234s to 5.678 seconds").value == ((1.23, 5.68),)

    def test_clock_fallback_keeps_the_official_spurious_span(self):
        # Official quirk: the "a to b" pattern also fires inside "hh:mm:ss to hh:mm:ss".
        assert parse_tal("00:00:01 to 00:01:08").value == ((1.0, 0.0), (1.0, 68.0))

    @pytest.mark.parametrize("text", ["", "no times here", None, 42])
    def test_nothing(self, text):
        parsed = parse_tal(text)
        assert parsed.value == () and not parsed.follows_format


class TestStg:
    def test_one_shot_format(self):
        parsed = parse_stg("1.0 seconds: [10, 20, 110, 220] 5.0 seconds: [12.5, 20, 100, 200]")
        assert parsed.value.keyed and parsed.follows_format
        assert parsed.value.timed == {"1.0": (10.0, 20.0, 110.0, 220.0), "5.0": (12.5, 20.0, 100.0, 200.0)}

    def test_time_keys_as_the_official_code_writes_them(self):
        assert set(parse_stg("5 seconds: [1, 2, 3, 4] 7.25 seconds: [1, 2, 3, 4]").value.timed) == {"5.0", "7.25"}

    def test_bad_box_copies_the_last_good_one_and_first_bad_is_dropped(self):
        parsed = parse_stg("0.0 seconds: [1, 2, 3] 1.0 seconds: [1, 2, 3, 4] 2.0 seconds: [a, b, c, d]")
        assert parsed.value.timed == {"1.0": (1.0, 2.0, 3.0, 4.0), "2.0": (1.0, 2.0, 3.0, 4.0)}
        assert not parsed.follows_format

    def test_bare_double_bracket_boxes(self):
        parsed = parse_stg("Boxes: [[1, 2, 3, 4]] then [[5, 6, 7, 8]] and [[1, 2]]")
        assert not parsed.value.keyed and parsed.value.untimed == ((1, 2, 3, 4), (5, 6, 7, 8))

    def test_inverted_box_breaks_the_format(self):
        assert not parse_stg("1.0 seconds: [50, 20, 10, 220]").follows_format

    def test_empty(self):
        parsed = parse_stg("")
        assert not parsed.value.keyed and parsed.value.untimed == () and not parsed.follows_format


class TestDenseCaptioning:
    def test_one_event_per_line(self):
        parsed = parse_dense_captioning("36.0-49.0 seconds: cut: the surgeon cuts\n50.0-60.0 seconds: tie: a knot")
        assert parsed.follows_format
        assert parsed.value == (DenseEvent(36.0, 49.0, "cut: the surgeon cuts"), DenseEvent(50.0, 60.0, "tie: a knot"))

    def test_duplicates_keep_the_first_and_captions_run_on(self):
        text = "0-5 seconds: first\ncontinued\n0-5 seconds: again\n6-9 seconds: last"
        assert parse_dense_captioning(text).value == (DenseEvent(0, 5, "first continued"), DenseEvent(6, 9, "last"))

    def test_zero_shot_fallback(self):
        parsed = parse_dense_captioning("**Start Time:** 3.0 - 7.5 seconds **Description:** Dissection of the flap.")
        assert parsed.value == (DenseEvent(3.0, 7.5, "Dissection of the flap"),) and not parsed.follows_format

    def test_prose_line_breaks_the_format(self):
        parsed = parse_dense_captioning("Here are the events:\n0.0-5.0 seconds: cut: x")
        assert parsed.value == (DenseEvent(0.0, 5.0, "cut: x"),) and not parsed.follows_format


class TestNextAction:
    OPTIONS = ["cutting", "tying", "suturing"]

    def test_exact_and_loose(self):
        assert parse_next_action("tying", self.OPTIONS) == parse_next_action(" Tying. ", self.OPTIONS)
        assert parse_next_action("Tying.", self.OPTIONS).value == "tying"

    def test_prose_naming_one_option(self):
        parsed = parse_next_action("The next action will be suturing the wound.", self.OPTIONS)
        assert parsed.value == "suturing" and not parsed.follows_format

    def test_prose_naming_two_options_keeps_the_text(self):
        parsed = parse_next_action("cutting or tying", self.OPTIONS)
        assert parsed.value == "cutting or tying" and not parsed.follows_format

    def test_without_options(self):
        assert parse_next_action("  adjust camera \n").value == "adjust camera"
        assert parse_next_action("adjust camera").follows_format
        assert not parse_next_action("").follows_format


class TestCvs:
    def test_one_shot_format(self):
        parsed = parse_cvs("Two structures: 2, Cystic plate: 1, Hepatocystic triangle: 0")
        assert parsed.follows_format
        assert parsed.value == {"two_structures": 2, "cystic_plate": 1, "hepatocystic_triangle": 0}

    def test_prose_and_partial(self):
        parsed = parse_cvs("I think two structures: 1 (unclear), and cystic plate: 2.")
        assert parsed.value == {"two_structures": 1, "cystic_plate": 2} and not parsed.follows_format

    def test_singular_structure_is_not_read(self):
        # Official quirk: a part must contain "two structures" before "two structures?:" is tried.
        assert parse_cvs("Two structure: 1, Cystic plate: 2").value == {"cystic_plate": 2}

    def test_a_part_naming_two_components_reads_only_the_first(self):
        assert parse_cvs("Cystic plate: 1 Hepatocystic triangle: 2").value == {"cystic_plate": 1}

    def test_out_of_range_breaks_the_format(self):
        parsed = parse_cvs("Two structures: 3, Cystic plate: 1, Hepatocystic triangle: 0")
        assert parsed.value["two_structures"] == 3 and not parsed.follows_format


class TestSkill:
    def test_one_shot_format(self):
        parsed = parse_skill(SKILL_ANSWER)
        assert parsed.follows_format and parsed.value.scores == (2, 3, 3, 2, 3, 4)
        assert parsed.value.aspects["Quality of final product"] == 4
        assert parsed.value.mean == pytest.approx(17 / 6)

    def test_partial_and_prose(self):
        parsed = parse_skill("Overall: Respect for tissue: 4/5 and more")
        assert parsed.value.aspects == {"Respect for tissue": 4} and not parsed.follows_format

    def test_no_score(self):
        assert parse_skill("The surgeon is an expert.").value.mean is None

    def test_score_past_the_float_range(self):
        # A policy's 400-digit score: its mean is inf, not an OverflowError out of the reward.
        assert parse_skill(f"Respect for tissue: {'9' * 400}/5, Time and motion: 3/5").value.mean == math.inf


def test_captions_and_dispatch():
    assert parse_caption("  A summary. ").value == "A summary."
    assert not parse_caption("   ").follows_format
    assert parse_answer("video_summary_gemini", "text").value == "text"
    assert parse_answer("dense_captioning_gpt", "0-1 seconds: a").value == (DenseEvent(0.0, 1.0, "a"),)
    with pytest.raises(ValueError):
        parse_answer("not_a_task", "text")


PARSERS = [parse_tal, parse_stg, parse_dense_captioning, parse_next_action, parse_cvs, parse_skill, parse_caption]
FORMAT_ALPHABET = st.sampled_from(list("0123456789.,:-[] \n/sto") + ["seconds", "Two structures", "/5", "**"])
format_like = st.lists(FORMAT_ALPHABET, max_size=60).map("".join)


@settings(max_examples=300, deadline=None)
@given(text=st.one_of(st.text(max_size=300), format_like))
def test_no_text_raises(text):
    for parser in PARSERS:
        parsed = parser(text)
        assert isinstance(parsed.follows_format, bool)


@given(value=st.one_of(st.none(), st.integers(), st.floats(), st.lists(st.integers()), st.binary()))
def test_non_strings_read_as_empty(value):
    for parser in PARSERS:
        assert parser(value) == parser("")
