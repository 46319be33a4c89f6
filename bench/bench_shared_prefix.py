"""Shared-prefix vs dense training passes: the update (forward + backward) and the old-log-prob pass.

The language model of a random Qwen2.5-VL, hidden 1,024, 8 layers, 8 heads / 2 KV heads (head_dim
128, as in 3B and 7B), intermediate 2,816, activation checkpointing on (as a 7B run trains), float32
on CPU, bfloat16 on CUDA. One prompt of P tokens, almost all video (a 16-frame grid; 126 text
tokens), and its G completions of C tokens each (EOS at C), one group per micro-batch:

- ``dense``: :func:`medgrpo.train.update.policy_inputs`: G rows of prompt + completion, (G, P + C);
- ``shared_prefix``: :func:`medgrpo.train.shared_prefix.shared_prefix_inputs`: one row, the prompt
  once and the G completions after it, P + G*C tokens, through :class:`SharedPrefixLayout`.

Both reuse the rollout's video embeddings (the vision tower does not run) and end in the same fused
lm-head ops. ``update`` is :func:`~medgrpo.train.update.backward_policy_loss` (DAPO, eps 0.2 / 0.3,
old log-probs given); ``old_logp`` is :func:`~medgrpo.train.update.sequence_logprobs`.

Points: the main one, P = 2,048, C = 64, G = 8; G = 4 (the gain must shrink with G); P = 1,024,
C = 128, G = 8 (P/C = 8 instead of 32: the gain must shrink with P/C).

Measured per provider: the median wall time of ``ROUNDS[pass]`` calls (pytest-benchmark: 1 for the
update, whose dense call at the main point takes minutes on 2 cores; 3 for old_logp), and, in an
untimed call before (the warm-up), ``peak_extra_mib``: the most memory allocated inside the call and alive at once
(:class:`medgrpo.testing.memory.PeakMemory`; the parameters' gradients exist before the call and
are zeroed in place, so the update's figure is activations and temporaries). ``token_ratio`` =
G(P + C) / (P + G*C), the tokens each layer's linear maps process; ``flop_ratio`` adds the attention
scores (query-key pairs each layout computes, causal halves counted) to the linear maps' FLOPs. The
``shared_prefix`` entry of each group holds ``speedup_vs_dense`` and ``memory_ratio_vs_dense``.

Size knob: ``MEDGRPO_BENCH_SIZE=small`` (the default without a GPU) runs hidden 256, 4 layers, intermediate 704, at
P = 512 / 512 / 256, C = 16 / 16 / 32 (same P/C and G as the full points), for small machines.
Time on the 2-core VM: full 31 minutes with other processes busy (8 minutes for the main point
alone with about one core busy elsewhere; the dense update's memory call, profiled, and its timed call
are most of it); small ~3 minutes.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from conftest import bench_size

from medgrpo.ops.policy_loss import MEDGRPO_LOSS
from medgrpo.testing.memory import PeakMemory
from medgrpo.testing.rollouts import synthetic_rollout
from medgrpo.train.shared_prefix import shared_prefix_inputs
from medgrpo.train.update import LossOptions, backward_policy_loss, policy_inputs, sequence_logprobs

CUDA = torch.cuda.is_available()
SMALL = bench_size() == "small"  # MEDGRPO_BENCH_SIZE; the README's numbers are MEDGRPO_BENCH_SIZE=full
DTYPE = torch.bfloat16 if CUDA else torch.float32
ROUNDS = {"update": 1, "old_logp": 3}  # timed calls per pass: a dense update at the main point takes ~25 s
TEXT_TOKENS = 126  # the chat template and question around the video
SHAPE = dict(hidden_size=1024, layers=8, heads=8, kv_heads=2, intermediate_size=2816)
if SMALL:
    SHAPE = dict(hidden_size=256, layers=4, heads=8, kv_heads=2, intermediate_size=704)


@dataclass(frozen=True)
class Point:
    prompt: int  # P
    completion: int  # C
    group: int  # G

    @property
    def name(self) -> str:
        return f"P={self.prompt} C={self.completion} G={self.group}"

    def token_ratio(self) -> float:
        return self.group * (self.prompt + self.completion) / (self.prompt + self.group * self.completion)


POINTS = [Point(2048, 64, 8), Point(2048, 64, 4), Point(1024, 128, 8)]
if SMALL:
    POINTS = [Point(512, 16, 8), Point(512, 16, 4), Point(256, 32, 8)]
PROVIDERS = ("dense", "shared_prefix")
PASSES = ("update", "old_logp")


def video_grid(video_tokens: int) -> tuple[int, int, int]:
    """A (t, h, w) patch grid of 16 frames (t = 8) with ``video_tokens`` tokens after the 2x2 merge."""
    area = video_tokens * 4 // 8
    height = next(h for h in range(int(area**0.5) // 2 * 2, 1, -2) if area % h == 0 and (area // h) % 2 == 0)
    return 8, height, area // height


@pytest.fixture(scope="module")
def model_and_tokenizer(tmp_path_factory, device):
    from medgrpo.demo.tiny_model import build_tiny_model, build_tokenizer
    from medgrpo.train.model import enable_activation_checkpointing, freeze_vision_tower

    directory = tmp_path_factory.mktemp("shared_prefix_model")
    tokenizer = build_tokenizer(directory)
    model = build_tiny_model(directory, tokenizer, vision_depth=1, vision_hidden=32, vision_heads=2, **SHAPE)
    model = model.to(device, DTYPE)
    freeze_vision_tower(model)
    enable_activation_checkpointing(model)
    return model.train(), tokenizer


def make_inputs(model, tokenizer, point: Point, device: str) -> dict[str, Any]:
    """One prompt (video between two runs of text) and G completions of C tokens, in both layouts."""
    config = model.config
    video_tokens = point.prompt - TEXT_TOKENS - 2
    grid = video_grid(video_tokens)
    generator = torch.Generator().manual_seed(0)
    text = lambda n: torch.randint(max(tokenizer.all_special_ids) + 1, len(tokenizer), (n,), generator=generator)
    before = TEXT_TOKENS // 2
    prompt = torch.cat(
        [
            text(before),
            torch.tensor([config.vision_start_token_id]),
            torch.full((video_tokens,), config.video_token_id),
            torch.tensor([config.vision_end_token_id]),
            text(TEXT_TOKENS - before),
        ]
    )[None].to(device)
    hidden = config.get_text_config().hidden_size
    embeds = [0.02 * torch.randn(video_tokens, hidden, generator=generator).to(device, DTYPE)]
    rollout = synthetic_rollout(
        prompt,
        torch.ones_like(prompt),
        embeds,
        rows=[(point.completion, False)] * point.group,
        steps=point.completion,
        token_range=(max(tokenizer.all_special_ids) + 1, len(tokenizer)),
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id,
    )
    grids = torch.tensor([grid], device=device)
    seconds = torch.ones(1, device=device)
    with torch.no_grad():
        dense = policy_inputs(model, rollout, grids, seconds)
        shared = shared_prefix_inputs(model, rollout, grids, seconds)
        old_logp = sequence_logprobs(model, shared, temperature=1.0, micro_batch_size=point.group)  # the cheap way
    old_logp = old_logp + 0.2 * torch.randn(old_logp.shape, generator=generator).to(device)  # some tokens clip
    advantages = torch.randn(point.group, generator=generator).to(device)
    return {"dense": dense, "shared_prefix": shared, "old_logp": old_logp, "advantages": advantages}


def make_call(model, inputs: dict[str, Any], provider: str, which: str, group: int):
    data, options = inputs[provider], LossOptions(loss=MEDGRPO_LOSS, micro_batch_size=group)
    if which == "old_logp":
        return lambda: sequence_logprobs(model, data, temperature=1.0, micro_batch_size=group)

    def update() -> None:
        model.zero_grad(set_to_none=False)  # in place: the gradients' memory is not counted
        backward_policy_loss(model, data, inputs["advantages"], options, old_logp=inputs["old_logp"])

    return update


def tokens_run(point: Point, provider: str) -> int:
    """Tokens each decoder layer processes per pass."""
    if provider == "dense":
        return point.group * (point.prompt + point.completion)
    return point.prompt + point.group * point.completion


def language_model_flops(model, point: Point, provider: str) -> int:
    """Forward FLOPs of the decoder layers: linear maps over the tokens run, attention over the pairs scored."""
    text = model.config.get_text_config()
    hidden, layers, inner = text.hidden_size, text.num_hidden_layers, text.intermediate_size
    head_dim = hidden // text.num_attention_heads
    kv = text.num_key_value_heads * head_dim
    linear = 2 * (2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * inner)  # q, o, k, v, MLP: per token
    P, C, G = point.prompt, point.completion, point.group
    pairs = G * (P + C) * (P + C + 1) // 2 if provider == "dense" else P * (P + 1) // 2 + G * (C * P + C * (C + 1) // 2)
    attention = 4 * pairs * hidden  # scores and weighted values, all query heads
    return layers * (tokens_run(point, provider) * linear + attention)


RESULTS: dict[str, dict[str, dict[str, Any]]] = {}


def summarize() -> None:
    """Dense over shared-prefix time and memory, stored with the shared-prefix entry; a table on stdout."""
    lines = []
    for group, providers in RESULTS.items():
        dense, shared = providers.get("dense"), providers.get("shared_prefix")
        if not (dense and shared and "median_s" in dense and "median_s" in shared):
            continue
        speedup = dense["median_s"] / shared["median_s"]
        memory = dense["peak_extra_mib"] / max(shared["peak_extra_mib"], 1e-9)
        shared["info"].update(speedup_vs_dense=speedup, memory_ratio_vs_dense=memory)
        lines.append(
            f"{group}: dense {dense['median_s']:.2f} s {dense['peak_extra_mib']:.0f} MiB | shared "
            f"{shared['median_s']:.2f} s {shared['peak_extra_mib']:.0f} MiB | {speedup:.2f}x time, {memory:.2f}x memory"
        )
    if lines:
        print("\n" + "\n".join(lines))


@pytest.fixture(scope="module", autouse=True)
def _summary():
    yield
    summarize()  # before conftest's session end writes the results file


@pytest.fixture(scope="module")
def inputs_by_point(model_and_tokenizer, device):
    model, tokenizer = model_and_tokenizer
    cache: dict[Point, dict[str, Any]] = {}

    def get(point: Point) -> dict[str, Any]:
        if point not in cache:
            cache.clear()  # one point's inputs at a time
            gc.collect()
            cache[point] = make_inputs(model, tokenizer, point, device)
        return cache[point]

    return get


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("which", PASSES)
@pytest.mark.parametrize("point", POINTS, ids=lambda p: p.name.replace(" ", "-"))
def bench_shared_prefix(model_and_tokenizer, inputs_by_point, measure, benchmark, device, point, which, provider):
    model, _ = model_and_tokenizer
    inputs = inputs_by_point(point)
    call = make_call(model, inputs, provider, which, point.group)
    for param in model.parameters():  # gradients exist before the call: it counts activations, not their buffers
        if param.requires_grad and param.grad is None:
            param.grad = torch.zeros_like(param)
    gc.collect()
    with PeakMemory(device) as meter:
        call()
    text = model.config.get_text_config()
    group = f"shared_prefix {which} {point.name} H={text.hidden_size} layers={text.num_hidden_layers} {str(DTYPE)[6:]}"
    params = {
        "pass": "update fwd+bwd" if which == "update" else "old logp",
        "prompt": point.prompt,
        "completion": point.completion,
        "group_size": point.group,
        "hidden": text.hidden_size,
        "layers": text.num_hidden_layers,
        "intermediate": text.intermediate_size,
        "activation_checkpointing": which == "update",
        "dtype": str(DTYPE)[6:],
        "token_ratio": point.token_ratio(),
        "flop_ratio": language_model_flops(model, point, "dense") / language_model_flops(model, point, "shared_prefix"),
    }
    measure(call, group=group, provider=provider, params=params, warmup=0, rounds=ROUNDS[which])
    flops = language_model_flops(model, point, provider) * (4 if which == "update" else 1)  # fwd, recompute, bwd x2
    entry = RESULTS.setdefault(group, {}).setdefault(provider, {})
    entry["peak_extra_mib"] = meter.peak_extra_mib
    if benchmark.stats is None:  # --benchmark-disable: called once, nothing timed
        return
    entry.update(median_s=benchmark.stats.stats.median, info=benchmark.extra_info)
    benchmark.extra_info.update(peak_extra_mib=meter.peak_extra_mib, flops=flops, tokens=tokens_run(point, provider))
