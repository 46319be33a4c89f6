"""Rollout decode of a 3B-shaped Qwen2.5-VL in bf16: the static, compiled, graph-captured step against the
reference loop, HF generate and the floor of reading the weights and the KV cache once per step.

``python bench/gpu/bench_decode.py --json PATH [--budget-s S] [--copy-gb-per-s X] [--rounds N]``. CUDA:
random weights of Qwen2.5-VL-3B's language model (hidden 2,048, 36 layers, 16 heads / 2 KV heads, MLP
11,008, vocabulary 151,936, embeddings tied: 3.09 B parameters; the vision tower is the demo's tiny one,
decoding never runs it), bf16, one prompt of 16 frames at 448 x 448 (2,048 video tokens), G = 8,
256 new tokens at temperature 1 (every row decodes every step: the stop token is a vision
placeholder, never sampled). The CPU dry run: the demo's tiny model, fp32, 4 frames at 56 x 56, 32
new tokens. The providers' calls are bench/bench_rollout.py's (:func:`bench_rollout.make_call`):

    floor           per step: the language model's weights (the lm head whole, of the input embeddings
                    one row per row: nothing) plus the KV cache a step reads (the prompt once per group,
                    the completion at its mean length), over the copy bandwidth of the ceilings stage
                    (``--copy-gb-per-s``; measured here when not given)
    medgrpo         ``generate(RolloutConfig(decode="static", compile=True))``: the compiled step, on CUDA
                    captured as a CUDA graph per bucketed shape; the first call (compile + capture) timed
                    on its own, then the median decode seconds of ``--rounds`` calls
    reference_loop  ``generate(RolloutConfig(decode="dynamic"))``: the loop on a DynamicCache (the current one)
    hf_generate     ``model.generate(num_return_sequences=8, do_sample=True)``; its decode = the call minus
                    the same call with one new token

The reference loop and HF generate are slow: each is first timed on a 16-token probe, then at 256
tokens if the probe says the calls fit in what is left of ``--budget-s`` (else the probe's time per
step stands, and ``from`` says so). Per provider: seconds and ms per decode step (a step = one
forward of every row; 255 of them after the prefill's first token), decode tokens/s (rows over the
time per step) and the peak extra memory of one call (medgrpo on CUDA: plus ``kept_cache_mib``,
the KV cache of its captured shape, allocated by the first call and kept for the next rollout).
The result is written after every measurement (a stage stopped at its timeout keeps what it measured).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from timing import StageResult, bench_device, copy_rate, out_of_memory

from bench_rollout import Case, make_call, timed  # isort: skip
from bench_train_step import video_prompts  # isort: skip

CUDA = torch.cuda.is_available()
SHAPE_3B = {
    "hidden_size": 2048,
    "intermediate_size": 11008,
    "num_hidden_layers": 36,
    "num_attention_heads": 16,
    "num_key_value_heads": 2,
    "vocab_size": 151_936,
}
GROUP = 8
NEW_TOKENS = 256 if CUDA else 32
FRAMES, SIDE = (16, 448) if CUDA else (4, 56)
PROBE_TOKENS = 16
SLOW_PROVIDERS = ("reference_loop", "hf_generate")


def build_model(directory: Path, device: str):
    """A random Qwen2.5-VL with the 3B language model on CUDA (the demo's tiny one in the dry run), and its tokenizer.

    The tiny model of ``build_tiny_model`` supplies the tokenizer's special-token ids and the vision
    tower; on CUDA its text config is rebuilt at the 3B shape (embeddings tied, as in the 3B) and the
    model initialized on the device, in bf16.
    """
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from medgrpo.demo.tiny_model import build_tiny_model, build_tokenizer

    tokenizer = build_tokenizer(directory)
    tiny = build_tiny_model(directory, tokenizer)
    if not CUDA:
        return tiny.eval(), tokenizer
    raw = tiny.config.to_dict()
    text = raw["text_config"]
    text.update(SHAPE_3B, max_window_layers=SHAPE_3B["num_hidden_layers"])
    text.pop("layer_types", None)  # recomputed for 36 layers
    text["rope_parameters"]["mrope_section"] = [16, 24, 24]  # Qwen2.5-VL's, head_dim 128
    raw["vision_config"]["out_hidden_size"] = SHAPE_3B["hidden_size"]
    raw["tie_word_embeddings"] = text["tie_word_embeddings"] = True  # as Qwen2.5-VL-3B
    raw.pop("vocab_size", None)
    config = Qwen2_5_VLConfig.from_dict(raw)
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(
            config, dtype=torch.bfloat16, attn_implementation="sdpa"
        )
    return model.eval(), tokenizer


def floor_bytes_per_step(model, prompt_tokens: int, rows: int, new_tokens: int) -> dict[str, int]:
    """Bytes a decode step must read at least: the language model's weights and the KV cache, each once.

    The lm head is read whole; of the input embeddings a step reads one row per row (counted as
    nothing; with tied embeddings the head is that same matrix, counted once). The cache: every
    layer's keys and values of the prompt (once per group) and of the completion at its mean length.
    """
    text = model.config.get_text_config()
    embed = model.get_input_embeddings().weight
    language = model.get_decoder()
    head = model.get_output_embeddings().weight
    size = lambda t: t.numel() * t.element_size()
    weights = sum(size(p) for p in language.parameters()) - size(embed) + size(head)
    head_dim = text.hidden_size // text.num_attention_heads
    per_token = text.num_hidden_layers * 2 * text.num_key_value_heads * head_dim * embed.element_size()
    cache = per_token * (prompt_tokens + rows * (new_tokens + 1) // 2)
    return {"weights": weights, "kv_cache": cache, "total": weights + cache}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", default=None)
    parser.add_argument("--budget-s", type=float, default=120.0, help="skip what would not finish within this")
    parser.add_argument("--copy-gb-per-s", type=float, default=None, help="the ceilings stage's copy bandwidth")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    start, device = time.perf_counter(), bench_device()
    left = lambda: args.budget_s - (time.perf_counter() - start)
    result = StageResult(args.json, group_size=GROUP, new_tokens=NEW_TOKENS, frames=FRAMES, side=SIDE, providers={})
    model, tokenizer = build_model(Path(tempfile.mkdtemp(prefix="bench_decode_")), device)
    batch = video_prompts(tokenizer, device, prompts=1, frames=FRAMES, side=SIDE)
    rows, prompt_tokens = GROUP * len(batch), int(batch.attention_mask.sum())
    result.data.update(
        model={k: getattr(model.config.get_text_config(), k) for k in SHAPE_3B},
        dtype=str(model.dtype).removeprefix("torch."),
        parameters_b=sum(p.numel() for p in model.parameters()) / 1e9,
        prompt_tokens=prompt_tokens,
        build_s=time.perf_counter() - start,
    )
    print(f"decode bench: {result.data['parameters_b']:.2f} B parameters, {prompt_tokens} prompt tokens", flush=True)
    measure_floor(result, model, prompt_tokens, rows, device, args.copy_gb_per_s)
    result.save()
    for provider in ("medgrpo", *SLOW_PROVIDERS):
        result.data["providers"][provider] = measure(provider, model, tokenizer, batch, args.rounds, left)
        compare(result.data, rows)
        result.save()
        entry = result.data["providers"][provider]
        shown = f"{entry['ms_per_step']:.2f} ms/step ({entry['from']})" if "ms_per_step" in entry else entry["status"]
        print(f"decode {provider}: {shown}", flush=True)
    return 1 if result.data["providers"]["medgrpo"]["status"] == "failed" else 0


def measure_floor(result: StageResult, model, prompt_tokens: int, rows: int, device: str, copy_gb_per_s) -> None:
    if copy_gb_per_s is None:
        copy_gb_per_s = copy_rate(device)["bytes_per_s"] / 1e9
        result.data["copy_measured_here"] = True
    per_step = floor_bytes_per_step(model, prompt_tokens, rows, NEW_TOKENS)
    result.data["floor_bytes_per_step"] = per_step
    result.data["copy_gb_per_s"] = copy_gb_per_s
    seconds = per_step["total"] / (copy_gb_per_s * 1e9)
    result.data["providers"]["floor"] = {"status": "ok", "s_per_step": seconds, "from": "bytes / copy bandwidth"}


def decode_call(provider: str, model, tokenizer, batch, tokens: int) -> Callable[[], float]:
    """A call of ``provider`` that decodes ``tokens`` per row and returns its decode seconds.

    Ours report their decode stage; HF generate's decode is its time minus the fastest of two
    calls with one new token (prefill + the first token), measured here once.
    """
    case = Case("3B" if CUDA else "tiny", "qwen" if CUDA else "demo", len(batch), GROUP, tokens)
    times: list[float] = []
    call = make_call(provider, model, tokenizer, batch, case, times)
    if provider != "hf_generate":
        return lambda: (call(), times[-1])[1]
    prefill = make_call(provider, model, tokenizer, batch, case, [], new_tokens=1)
    prefill_s = min(timed(prefill) for _ in range(3))  # the first warms up
    return lambda: timed(call) - prefill_s


def measure(provider: str, model, tokenizer, batch, rounds: int, left: Callable[[], float]) -> dict:
    """One provider: its decode seconds per step (at NEW_TOKENS, or the probe's), decode tokens/s, peak memory."""
    from medgrpo.testing.memory import PeakMemory

    if left() < 10:
        return {"status": "skipped", "error": "stage time budget spent"}
    device = bench_device()
    try:
        tokens, entry = NEW_TOKENS, {"status": "ok"}
        if provider in SLOW_PROVIDERS:
            probe = decode_call(provider, model, tokenizer, batch, PROBE_TOKENS)
            probe()  # warm-up
            per_step = probe() / (PROBE_TOKENS - 1)
            entry.update(s_per_step=per_step, rounds=1, **{"from": f"{PROBE_TOKENS}-token probe"})
            rounds = min(rounds, int((left() - 10) / (per_step * NEW_TOKENS * 1.5)))
            if rounds < 1:
                return entry
        call = decode_call(provider, model, tokenizer, batch, tokens)
        seconds = []
        if provider not in SLOW_PROVIDERS:  # the probe warmed the slow ones up
            begin = time.perf_counter()
            seconds.append(call())  # medgrpo: the compile, and on CUDA the capture of the shape's graph
            entry["first_call_s"] = time.perf_counter() - begin
        with PeakMemory(device) as memory:
            seconds.append(call())
        entry["peak_extra_mib"] = memory.peak_extra_mib
        if provider == "medgrpo":  # on CUDA its KV cache lives on between calls (a captured graph's addresses)
            entry["kept_cache_mib"] = kept_cache_bytes(model) / 2**20
        if provider not in SLOW_PROVIDERS:
            seconds = seconds[1:]  # the compile is not a round
        seconds += [call() for _ in range(rounds - len(seconds))]
        entry.update(decode_s=statistics.median(seconds), rounds=len(seconds), **{"from": f"{tokens} tokens"})
        entry["s_per_step"] = entry["decode_s"] / (tokens - 1)  # the first token comes from the prefill's logits
        return entry
    except Exception as error:  # recorded; the other providers still run
        status = "oom" if out_of_memory(error) else "failed"
        return {"status": status, "error": f"{type(error).__name__}: {error}"[:500]}


def kept_cache_bytes(model) -> int:
    """Bytes of the static KV caches the model's compiled decoder keeps between rollouts (CUDA; 0 on the CPU)."""
    from medgrpo.train.decode import static_decoder

    return sum(shape.cache.nbytes() for shape in static_decoder(model, compile=True).shapes.values())


def compare(data: dict, rows: int) -> None:
    """Per provider: ms per step and decode tokens/s; medgrpo's ratio to the floor and speed-ups over the others."""
    providers = data["providers"]
    for entry in providers.values():
        if "s_per_step" in entry:
            entry["ms_per_step"] = entry["s_per_step"] * 1e3
            entry["decode_tokens_per_s"] = rows / entry["s_per_step"]
    per_step = {name: entry.get("s_per_step") for name, entry in providers.items()}
    ours = per_step.get("medgrpo")
    if not ours:
        return
    if per_step.get("floor"):
        data["medgrpo_ratio_to_floor"] = ours / per_step["floor"]
    for name in SLOW_PROVIDERS:
        if per_step.get(name):
            data[f"medgrpo_speedup_over_{name}"] = per_step[name] / ours


if __name__ == "__main__":
    raise SystemExit(main())
