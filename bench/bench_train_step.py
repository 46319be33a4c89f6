"""One MedGRPO step, split into rollout, reward, old/ref log-probs and update: samples/s and tokens/s.

CPU (here): the tiny random Qwen2.5-VL of the demo, 16 frames at 56x56 per prompt, G = 8,
2 prompts, 32 new tokens. CUDA: a Qwen2.5-VL-3B-shaped model with random weights (hidden
2048, 36 layers, 16 heads / 2 KV heads, vision depth 32), 16 frames at 448x448, G = 8,
256 new tokens, bf16, 2 prompts per GPU (set ``MEDGRPO_BENCH_PROMPTS``).

Each stage is timed on its own (``time_<stage>_s`` in the results, median over rounds), and
the whole step; samples/s = prompts x G / step time. The step is the trainer's default
(``grpo_step`` with ``shared_prefix`` on): the log-prob and update passes run each prompt and
its video once per group. The old log-prob pass is part of the step, as in a run with
``num_iterations = 2``; one update is timed.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import pytest
import torch

from medgrpo.data.collate import VideoCollator
from medgrpo.data.loader import VideoSample
from medgrpo.data.records import VideoRecord
from medgrpo.data.sampling import FramePlan
from medgrpo.demo.tiny_model import build_tokenizer
from medgrpo.train.optim import optimizer_step
from medgrpo.train.rollout import RolloutConfig, decode_text, generate
from medgrpo.train.shared_prefix import shared_prefix_inputs
from medgrpo.train.update import LossOptions, backward_policy_loss, sequence_logprobs

CUDA = torch.cuda.is_available()
PROMPTS = int(os.environ.get("MEDGRPO_BENCH_PROMPTS", "2"))
G = 8
NEW_TOKENS = 256 if CUDA else 32
SIDE = 448 if CUDA else 56
FRAMES = 16
SHAPE_3B = {
    "hidden_size": 2048,
    "layers": 36,
    "heads": 16,
    "kv_heads": 2,
    "intermediate_size": 11008,
    "vision_depth": 32,
    "vision_hidden": 1280,
    "vision_heads": 16,
    "window_size": 112,
}


def _model(directory: Path, tokenizer):
    from medgrpo.demo.tiny_model import build_tiny_model
    from medgrpo.train.model import ModelConfig, load_model

    shape = SHAPE_3B if CUDA else {}
    build_tiny_model(directory, tokenizer, **shape)
    dtype = "bfloat16" if CUDA else "float32"
    return load_model(ModelConfig(str(directory), dtype=dtype, freeze_vision=True), "cuda" if CUDA else "cpu")


def video_prompts(tokenizer, device: str, *, prompts: int = PROMPTS, frames: int = FRAMES, side: int = SIDE):
    """A left-padded batch of ``prompts`` random ``frames``-frame ``side`` x ``side`` videos with a tal question,
    patchified on ``device`` (bf16 on CUDA, fp32 on the CPU). bench_rollout.py uses it too."""
    record = VideoRecord(
        index=0,
        id="bench",
        question="Localize the grasper retraction. Answer in seconds.",
        answer="2.0-6.0 seconds.",
        qa_type="tal",
        qa_type_raw="tal",
        data_source="Bench",
        video=Path("unused.mp4"),
        fps=2.0,
        struc_info=[{"span": [2.0, 6.0]}],
    )
    generator = torch.Generator().manual_seed(0)
    samples = []
    for _ in range(prompts):
        clip = torch.randint(0, 256, (frames, side, side, 3), dtype=torch.uint8, generator=generator)
        plan = FramePlan(tuple(range(frames)), side, side, 2.0)
        samples.append(VideoSample(record=record, frames=clip, plan=plan))
    dtype = torch.bfloat16 if CUDA else torch.float32
    return VideoCollator(tokenizer, padding_side="left")(samples).to(device, dtype)


def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    directory = tmp_path_factory.mktemp("bench_model")
    tokenizer = build_tokenizer(directory)
    model = _model(directory, tokenizer)
    from medgrpo.rewards.task_rewards import RewardConfig, RewardFunction

    return model, tokenizer, RewardFunction(RewardConfig()), video_prompts(tokenizer, "cuda" if CUDA else "cpu")


def _step(model, tokenizer, reward_fn, batch, optimizer, params) -> dict[str, float]:
    from medgrpo import group_advantages
    from medgrpo.data.collate import eos_ids

    times = {}
    start = time.perf_counter()
    with torch.no_grad():
        rollout = generate(
            model,
            batch,
            RolloutConfig(group_size=G, max_new_tokens=NEW_TOKENS, temperature=1.0),
            eos_token_ids=eos_ids(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
        )
    _sync()
    times["rollout"] = time.perf_counter() - start
    mark = time.perf_counter()
    texts = decode_text(tokenizer, rollout)
    rewards = reward_fn(texts, [r for r in batch.records for _ in range(G)]).rewards.to(batch.input_ids.device)
    advantages = group_advantages(rewards, group_size=G)
    _sync()
    times["reward"] = time.perf_counter() - mark
    mark = time.perf_counter()
    inputs = shared_prefix_inputs(
        model, rollout, batch.video_grid_thw, batch.second_per_grid_ts, batch.pixel_values_videos
    )
    old_logp = sequence_logprobs(model, inputs, temperature=1.0, micro_batch_size=G)
    _sync()
    times["logprobs"] = time.perf_counter() - mark
    mark = time.perf_counter()
    model.train()
    update = backward_policy_loss(model, inputs, advantages, LossOptions(micro_batch_size=G), old_logp=old_logp)
    optimizer_step(params, optimizer, None, loss=update.loss, max_grad_norm=1.0)
    _sync()
    times["update"] = time.perf_counter() - mark
    times["step"] = time.perf_counter() - start
    times["completion_tokens"] = float(rollout.completion_tokens)
    return times


def bench_grpo_step(setup, benchmark, request):
    model, tokenizer, reward_fn, batch = setup
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-7)
    _step(model, tokenizer, reward_fn, batch, optimizer, params)  # warm-up
    runs: list[dict[str, float]] = []
    benchmark.group = "grpo_step"
    benchmark.pedantic(
        lambda: runs.append(_step(model, tokenizer, reward_fn, batch, optimizer, params)),
        rounds=3 if CUDA else 5,
        iterations=1,
    )
    median = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    samples = PROMPTS * G
    info = {f"time_{k}_s": v for k, v in median.items() if k != "completion_tokens"}
    info.update(
        samples_per_s=samples / median["step"],
        tokens_per_s=median["completion_tokens"] / median["step"],
        prompts=PROMPTS,
        group_size=G,
        new_tokens=NEW_TOKENS,
        frames=FRAMES,
        side=SIDE,
        model="qwen2.5-vl-3b-shaped" if CUDA else "tiny",
    )
    if CUDA:
        info["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    benchmark.extra_info.update(provider="medgrpo", params={"prompts": PROMPTS, "group_size": G}, **info)
    from conftest import MEASURED  # bench/conftest.py: results are merged into bench/results/<device>.json

    request.config.stash.setdefault(MEASURED, []).append(benchmark.stats)
    print("\n" + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in info.items()))
