"""Rollout decode, providers side by side: decode tokens/s, total time and peak memory.

Providers (``medgrpo.train.rollout.generate`` unless said otherwise):

    medgrpo          decode="static", compile=True: the static KV cache, one compiled step (a CUDA graph on a GPU)
    medgrpo_eager    decode="static", compile=False: the same step, eager
    reference_loop   decode="dynamic": the reference loop on Hugging Face's DynamicCache, KV replicated G times
    hf_generate      ``model.generate(num_return_sequences=G, do_sample=True)``: each prompt encoded and
                     prefilled G times, then HF's decoding loop
    linear_floor     not a decoder: the language model's linear layers and the lm head applied to the B x G
                     rows of a step, new_tokens - 1 times (the forwards a rollout runs after the prefill),
                     nothing else: the matrix products every decoder of the model must do, what a step
                     costs at least on this machine (its "decode" is that time)

Models: random Qwen2.5-VL built by ``medgrpo.demo.tiny_model.build_tiny_model``: ``tiny`` (the demo's:
hidden 64, 2 layers), ``h512x4`` (hidden 512, 4 layers, 8 heads / 2 KV heads, MLP 1536, vision hidden
64: 12.9 M parameters with the demo's 512-token vocabulary, the issue's CPU target point) and
``h1024x8`` (hidden 1024, 8 layers, 16 / 2 heads, MLP 3072); vocabulary ``demo`` (the 512 tokens of
the demo's tokenizer) or ``qwen`` (151,936, the real Qwen2.5-VL tokenizer's size: embeddings and lm
head resized). Prompts: B videos of 16 frames at 56 x 56 (32 video tokens) with a tal question,
left-padded. Every row decodes ``new_tokens`` steps: the stop token is a vision placeholder, which
is never sampled. Temperature 1, no top-k / top-p.

Timing: the whole rollout is the benchmark's time (encode + prefill + decode); ``decode_s`` (median)
is the rollout's own decode stage, and for ``hf_generate`` its time minus the median time of the same
call with one new token (prefill + first token). ``decode_tokens_per_s`` = rows x new tokens /
decode_s. The compiled provider's first call (the compile) is ``first_call_s``, outside the timing.
Peak memory: one separate call under ``medgrpo.testing.memory.PeakMemory`` (extra bytes allocated).

Knobs (environment):

    MEDGRPO_BENCH_SIZE              "small" (the default without a GPU): the demo's shape, the 12.9 M point (G 8 / 64
                                    tokens, the 152k vocabulary, G 16 / 256 tokens) and h1024x8 at
                                    G 8 / 64 tokens; "full": the issue's
                                    whole grid (3 models x 2 vocabularies x G 8, 16 x 64, 256 tokens)
    MEDGRPO_BENCH_ROLLOUT_BUDGET_S  cases that would start after this many seconds are skipped
                                    (default 600)
    MEDGRPO_BENCH_ROLLOUT_ROUNDS    timed rounds per provider (default 5)
    MEDGRPO_BENCH_THREADS           torch threads on the CPU (default 1: on a shared 2-core machine two
                                    threads wait on each other at every op and the timings scatter 10x)
"""

from __future__ import annotations

import itertools
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest
import torch
from bench_train_step import video_prompts
from conftest import MEASURED, _cpu_seconds, bench_size, other_cpu_cores, synchronize

from medgrpo.testing.memory import PeakMemory
from medgrpo.train.rollout import RolloutConfig, generate, vision_placeholder_ids

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
SIZE = bench_size()  # MEDGRPO_BENCH_SIZE
BUDGET_S = float(os.environ.get("MEDGRPO_BENCH_ROLLOUT_BUDGET_S", "600"))
THREADS = int(os.environ.get("MEDGRPO_BENCH_THREADS", "1"))
ROUNDS = int(os.environ.get("MEDGRPO_BENCH_ROLLOUT_ROUNDS", "5"))
QWEN_VOCAB = 151_936
MODELS = {
    "tiny": {},
    "h512x4": {"hidden_size": 512, "layers": 4, "heads": 8, "kv_heads": 2, "intermediate_size": 1536},
    "h1024x8": {"hidden_size": 1024, "layers": 8, "heads": 16, "kv_heads": 2, "intermediate_size": 3072},
}
VISION = {"tiny": {}, "h512x4": {"vision_hidden": 64}, "h1024x8": {"vision_hidden": 64}}
PROVIDERS = ["medgrpo", "medgrpo_eager", "reference_loop", "hf_generate", "linear_floor"]


@dataclass(frozen=True)
class Case:
    model: str
    vocab: str  # "demo" or "qwen"
    prompts: int
    group: int
    new_tokens: int

    @property
    def name(self) -> str:
        return f"rollout {self.model} V={self.vocab} B={self.prompts} G={self.group} T={self.new_tokens}"


SMALL = [
    Case("tiny", "demo", 8, 8, 40),  # the demo's GRPO step: 8 prompts x G 8, 40 new tokens
    Case("h512x4", "demo", 2, 8, 64),  # the CPU target point
    Case("h512x4", "qwen", 2, 8, 64),
    Case("h512x4", "demo", 2, 16, 256),
    Case("h1024x8", "demo", 2, 8, 64),
]
FULL = SMALL + [
    Case(model, vocab, 2, group, tokens)
    for model, vocab, group, tokens in itertools.product(MODELS, ("demo", "qwen"), (8, 16), (64, 256))
    if Case(model, vocab, 2, group, tokens) not in SMALL
]
CASES = FULL if SIZE == "full" else SMALL
START = time.monotonic()


@pytest.fixture(scope="module", autouse=True)
def threads():
    if CUDA:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(before)


_LOADED: dict[tuple[str, str], tuple] = {}


def load(model_name: str, vocab: str):
    """(model, tokenizer) of a case, built once; only the last one is kept (the 152k-vocabulary ones are large)."""
    key = (model_name, vocab)
    if key not in _LOADED:
        from medgrpo.demo.tiny_model import build_tiny_model, build_tokenizer
        from medgrpo.train.model import ModelConfig, load_model

        _LOADED.clear()
        directory = Path(tempfile.mkdtemp(prefix="bench_rollout_"))
        tokenizer = build_tokenizer(directory)
        model = build_tiny_model(directory, tokenizer, **MODELS[model_name], **VISION[model_name])
        if vocab == "qwen":
            model.resize_token_embeddings(QWEN_VOCAB, mean_resizing=False)
            model.save_pretrained(directory)
        dtype = "bfloat16" if CUDA else "float32"
        _LOADED[key] = (load_model(ModelConfig(str(directory), dtype=dtype), DEVICE).eval(), tokenizer)
    return _LOADED[key]


def make_call(provider: str, model, tokenizer, batch, case: Case, decode_times: list[float], new_tokens=None):
    """The provider's rollout as a no-argument call; ours append their decode seconds to ``decode_times``."""
    new_tokens = new_tokens or case.new_tokens
    never = [model.config.video_token_id]  # a stop token that is never sampled: every row decodes every step
    pad = tokenizer.pad_token_id
    if provider == "linear_floor":
        return linear_floor_call(model, case.prompts * case.group, new_tokens - 1, decode_times)
    if provider == "hf_generate":
        inputs = batch.model_inputs()
        banned = vision_placeholder_ids(model, batch.input_ids.device).tolist()

        def call():
            with torch.no_grad():
                model.generate(
                    **inputs,
                    do_sample=True,
                    temperature=1.0,
                    top_k=0,
                    top_p=1.0,
                    max_new_tokens=new_tokens,
                    num_return_sequences=case.group,
                    eos_token_id=never,
                    pad_token_id=pad,
                    suppress_tokens=banned,
                )

        return call
    decode = "dynamic" if provider == "reference_loop" else "static"
    config = RolloutConfig(
        group_size=case.group, max_new_tokens=new_tokens, temperature=1.0, decode=decode, compile=provider == "medgrpo"
    )
    generator = torch.Generator(DEVICE).manual_seed(0)

    def call():
        rollout = generate(model, batch, config, eos_token_ids=never, pad_token_id=pad, generator=generator)
        decode_times.append(rollout.decode_s)

    return call


def linear_floor_call(model, rows: int, steps: int, decode_times: list[float]):
    """The language model's linear layers and the lm head on ``rows`` rows, ``steps`` times; appends the seconds."""
    layers = [m for m in model.get_decoder().modules() if isinstance(m, torch.nn.Linear)]
    layers.append(model.get_output_embeddings())
    weight = layers[0].weight
    inputs = [torch.randn(rows, layer.in_features, dtype=weight.dtype, device=weight.device) for layer in layers]

    @torch.no_grad()
    def call():
        start = time.perf_counter()
        for _ in range(steps):
            for layer, x in zip(layers, inputs):
                layer(x)
        synchronize(DEVICE)
        decode_times.append(time.perf_counter() - start)

    return call


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    synchronize(DEVICE)
    return time.perf_counter() - start


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name.removeprefix("rollout ").replace(" ", "-"))
def bench_rollout(case: Case, provider: str, benchmark, request):
    if time.monotonic() - START > BUDGET_S:
        pytest.skip(f"MEDGRPO_BENCH_ROLLOUT_BUDGET_S={BUDGET_S:.0f} spent")
    model, tokenizer = load(case.model, case.vocab)
    batch = video_prompts(tokenizer, DEVICE, prompts=case.prompts)
    decode_times: list[float] = []
    call = make_call(provider, model, tokenizer, batch, case, decode_times)
    first_call_s = timed(call)  # the compile of the compiled provider; warm-up of the others
    with PeakMemory(DEVICE) as memory:
        call()
    decode_times.clear()
    start = _cpu_seconds()
    benchmark.group = case.name
    benchmark.pedantic(lambda: (call(), synchronize(DEVICE)), rounds=ROUNDS, iterations=1)
    if provider == "hf_generate":  # decode = the call - the same call with one new token (prefill + 1st token)
        prefill = make_call(provider, model, tokenizer, batch, case, [], new_tokens=1)
        prefill_s = statistics.median(timed(prefill) for _ in range(ROUNDS))
        decode_s = max(benchmark.stats.stats.median - prefill_s, 1e-9)
    else:
        decode_s = statistics.median(decode_times)
    rows = case.prompts * case.group
    benchmark.extra_info.update(
        provider=provider,
        params=asdict(case),
        decode_s=decode_s,
        decode_tokens_per_s=rows * case.new_tokens / decode_s,
        decode_ms_per_step=decode_s / case.new_tokens * 1e3,
        peak_extra_mib=memory.peak_extra_mib,
        first_call_s=first_call_s,
        parameters_m=sum(p.numel() for p in model.parameters()) / 1e6,
        prompt_tokens=batch.input_ids.shape[1],
        threads=torch.get_num_threads(),
        other_cpu_cores=other_cpu_cores(start),
    )
    request.config.stash.setdefault(MEASURED, []).append(benchmark.stats)
