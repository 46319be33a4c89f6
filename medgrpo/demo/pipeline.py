"""``medgrpo demo``: SFT vs plain GRPO vs MedGRPO on CPU, on a synthetic mixture of tasks whose rewards
live on different scales, per dataset and task, in a table and two figures.

The paper's comparison, small. For each seed: render the dataset (:mod:`medgrpo.demo.synthetic`),
train a local BPE tokenizer on its text and build a random tiny Qwen2.5-VL, SFT it on the reference
answers, fit the per-(data_source, qa_type) normalization statistics on sampled SFT rollouts
(``medgrpo fit-norm``), then run two RL arms from that one SFT checkpoint with the same data, seed,
steps and budget: plain GRPO (raw rewards, group-normalized advantages) and MedGRPO (the same, on the
rewards normalized with those statistics). Both are scored on held-out records during training
(the curves) and at the end, beside SFT itself and a constant-answer baseline
(:mod:`medgrpo.demo.heldout`). Everything goes through the code of a real run
(:func:`medgrpo.train.loop.train`, the loader, the rewards, ``fit-norm``, ``medgrpo eval``'s metrics,
checkpoints, the Hugging Face export). What the outputs show: :mod:`medgrpo.demo.report`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from medgrpo.demo.progress import PhaseClock, ProgressLine, announce
from medgrpo.demo.synthetic import DECODE_SIDE, decode_options, demo_tokenizer_corpus, generate_dataset
from medgrpo.ops.reference import ADVANTAGE_SCALES
from medgrpo.train.config import TrainConfig, config_from_dict
from medgrpo.train.metrics import read_metrics

RL_ARMS = ("grpo", "medgrpo")
# One torch thread, measured (load average 4-9 from other work on this 2-core machine; wall / CPU seconds,
# threads 1 vs 2): a 16x64 @ 64x128 linear 0.016 / 0.008 ms vs 1.4 / 0.56 ms; 20 SFT steps 5.1 / 2.6 s vs
# 40 / 19 s; 4 GRPO steps (4 prompts x 8) 3.3 / 1.6 s vs 49 / 23 s; a greedy evaluation of 6 records 0.34 /
# 0.17 s vs 5.7 / 2.7 s. The tiny model's ops are too small to share: with 2 threads each op waits for the
# second OpenMP thread, which sleeps until the scheduler's next tick whenever another process runs.
DEFAULT_THREADS = 1


def _option(default: Any, text: str) -> Any:
    return field(default=default, metadata={"help": text})


@dataclass
class DemoSettings:
    """Sizes of the demo; the defaults take 2-3 minutes for one seed on 2 busy CPU cores (docs/design-demo.md)."""

    out_dir: str = _option("runs/demo", "where everything goes: one folder per seed, the figures and the JSON result")
    seed: int = _option(0, "the first seed (data, weights, sampling); --seeds N runs seed .. seed + N - 1")
    seeds: int = _option(1, "seeds to run; with more than one the table shows mean +- spread (std) per key")
    num_videos: int = _option(160, "synthetic videos (60%% train, 20%% val, 20%% test; 2-3 questions each)")
    side: int = _option(DECODE_SIDE, "frames are decoded at side x side pixels (a multiple of 28)")
    sft_steps: int = _option(400, "SFT steps")
    sft_batch_size: int = _option(8, "SFT records per step")
    sft_lr: float = _option(3e-3, "SFT learning rate (cosine schedule)")
    grpo_steps: int = _option(120, "RL steps of each arm (plain GRPO and MedGRPO)")
    grpo_lr: float = _option(2e-4, "RL learning rate of both arms (constant)")
    group_size: int = _option(8, "completions per prompt (G) in RL")
    prompts_per_step: int = _option(4, "prompts per RL step")
    scale: str = _option("group", "advantage scaling of both RL arms: group (the usual GRPO), batch or none")
    max_new_tokens: int = _option(32, "the longest answer sampled or generated")
    eval_every: int = _option(10, "held-out (val) evaluation every this many RL steps: the curves")
    norm_rollouts: int = _option(4, "sampled SFT completions per train record for fit-norm's statistics")
    threads: int = _option(
        DEFAULT_THREADS, "torch CPU threads (1: measured fastest for the tiny model, docs/design-demo.md)"
    )


@dataclass
class SeedRun:
    """One seed's outputs: held-out scores per arm (and the baseline), curves, timings, paths."""

    seed: int
    scores: dict[str, Any] = field(default_factory=dict)  # arm -> HeldOutScores
    curves: dict[str, dict[str, list[tuple[int, float]]]] = field(default_factory=dict)  # arm -> key -> points
    advantages: dict[str, dict[str, float]] = field(default_factory=dict)  # key -> the arms' weights
    timings: dict[str, dict[str, float]] = field(default_factory=dict)
    paths: dict[str, str] = field(default_factory=dict)


def _run_config(settings: DemoSettings, mode: str, name: str, dataset, model_dir: Path, **sections) -> TrainConfig:
    """The demo's config of a run: the tiny fp32 model on the CPU (vision trained by SFT only), frames of
    ``side`` x ``side``."""
    pixels = float(settings.side * settings.side)
    model = {"path": str(model_dir), "dtype": "float32", "attention": "sdpa", "activation_checkpointing": False}
    model["freeze_vision"] = mode == "grpo"
    data = {"train_file": str(dataset.train), "num_workers": 0, "decode": {"min_pixels": pixels, "max_pixels": pixels}}
    data.update(sections.pop("data", {}))
    base = {"mode": mode, "output_dir": str(Path(settings.out_dir) / name), "seed": settings.seed, "save_every": 0}
    return config_from_dict({**base, "device": "cpu", "model": model, "data": data, **sections})


def prepare(settings: DemoSettings) -> tuple[object, Path]:
    """Dataset, tokenizer and the random tiny model (saved with its tokenizer) under ``settings.out_dir``;
    returns (dataset, model dir)."""
    from medgrpo.demo.tiny_model import build_tiny_model, build_tokenizer

    out = Path(settings.out_dir)
    dataset = generate_dataset(out / "data", num_videos=settings.num_videos, seed=settings.seed, overwrite=True)
    model_dir = out / "init"
    tokenizer = build_tokenizer(model_dir, corpus=demo_tokenizer_corpus(dataset))
    build_tiny_model(model_dir, tokenizer, seed=settings.seed)
    return dataset, model_dir


def sft_config(settings: DemoSettings, dataset, model_dir: Path) -> TrainConfig:
    return _run_config(
        settings,
        "sft",
        "sft",
        dataset,
        model_dir,
        steps=settings.sft_steps,
        optim={"lr": settings.sft_lr, "warmup_steps": 10, "schedule": "cosine", "max_grad_norm": 1.0},
        sft={"batch_size": settings.sft_batch_size, "micro_batch_size": settings.sft_batch_size},
    )


def grpo_config(settings: DemoSettings, dataset, model_dir: Path, stats: Path | None, name: str) -> TrainConfig:
    """An RL arm from the SFT checkpoint: MedGRPO with ``stats``, plain GRPO (raw rewards) without."""
    rollout = {"group_size": settings.group_size, "max_new_tokens": settings.max_new_tokens, "temperature": 1.0}
    grpo = {
        "prompts_per_step": settings.prompts_per_step,
        "norm_stats": str(stats) if stats is not None else "",
        "scale": settings.scale,
        "micro_batch_size": settings.group_size * settings.prompts_per_step,
        "rollout": rollout,
    }
    return _run_config(
        settings,
        "grpo",
        name,
        dataset,
        model_dir,
        steps=settings.grpo_steps,
        eval_every=settings.eval_every,
        data={"eval_file": str(dataset.val)},
        optim={"lr": settings.grpo_lr, "max_grad_norm": 1.0},
        grpo=grpo,
    )


def fit_stats(settings: DemoSettings, dataset, model_dir: Path, reward_fn) -> Path:
    """Sampled SFT rollouts on the train split → sft_rollouts.jsonl → ``medgrpo fit-norm`` → norm_stats.json."""
    from medgrpo.demo.heldout import load_policy
    from medgrpo.rewards import norm_stats
    from medgrpo.train.evaluation import rollouts, write_rollout_jsonl

    model, tokenizer = load_policy(model_dir)
    records, texts = rollouts(
        model,
        tokenizer,
        dataset.train,
        decode_options(settings.side),
        group_size=settings.norm_rollouts,
        temperature=1.0,
        max_new_tokens=settings.max_new_tokens,
        seed=settings.seed,
        progress=ProgressLine("fit-norm rollouts"),
    )
    out = Path(settings.out_dir)
    jsonl = write_rollout_jsonl(out / "sft_rollouts.jsonl", records, texts, reward_fn)
    stats = out / "norm_stats.json"
    if norm_stats.main([str(jsonl), "-o", str(stats), "--min-samples", "8"]) != 0:
        raise RuntimeError("fit-norm failed on the SFT rollouts")
    return stats


def eval_curves(metrics_file: Path) -> dict[str, list[tuple[int, float]]]:
    """The held-out raw reward per key at each evaluation of a run (its ``eval/reward_raw/<key>`` rows)."""
    curves: dict[str, list[tuple[int, float]]] = {}
    prefix = "eval/reward_raw/"
    for row in read_metrics(metrics_file):
        for name, value in row.items():
            if name.startswith(prefix) and value is not None:
                curves.setdefault(name[len(prefix) :], []).append((row["step"], float(value)))
    return curves


def run_seed(settings: DemoSettings) -> SeedRun:
    """One seed of the comparison in ``settings.out_dir`` (module docstring); prints progress."""
    from medgrpo.demo import heldout
    from medgrpo.demo.advantages import advantage_weights
    from medgrpo.rewards.norm_stats import load_norm_stats
    from medgrpo.rewards.rewarder import build_rewarder
    from medgrpo.rewards.task_rewards import RewardConfig
    from medgrpo.train.evaluation import score_completions
    from medgrpo.train.loop import train

    clock, run = PhaseClock(), SeedRun(settings.seed)
    out = Path(settings.out_dir)
    options = decode_options(settings.side)
    with clock.phase("prepare"):
        dataset, init_dir = prepare(settings)
        counts = dataset.manifest()["records"]
    announce(f"seed {settings.seed}: dataset {counts} and a random tiny model in {out}")
    announce(f"SFT, {settings.sft_steps} steps")
    with clock.phase("sft"):
        sft = train(sft_config(settings, dataset, init_dir))
    reward_fn = build_rewarder(RewardConfig()).fn
    with clock.phase("fit-norm"):
        stats_path = fit_stats(settings, dataset, sft.export_dir, reward_fn)
        stats = load_norm_stats(stats_path)
    rollouts_file = out / "sft_rollouts.jsonl"
    run.advantages = advantage_weights(rollouts_file, stats, group_size=settings.norm_rollouts, scale=settings.scale)
    held_out_files = [dataset.val, dataset.test]
    val_count = counts["val"]

    def evaluate(arm: str, model_dir: Path) -> None:
        with clock.phase(f"eval {arm}"):
            records, texts = heldout.model_answers(
                model_dir,
                held_out_files,
                options,
                max_new_tokens=settings.max_new_tokens,
                progress=ProgressLine(f"held-out answers of {arm}"),
            )
            run.scores[arm] = heldout.score_answers(
                records, texts, reward_fn, stats, out / "heldout" / f"{arm}_predictions.json"
            )
        if arm == "sft":  # step 0 of the curves: the SFT model on the val records
            val = score_completions(records[:val_count], texts[:val_count], reward_fn, stats)
            run.curves["sft"] = {key: [(0, value)] for key, value in val.per_key_raw.items()}

    evaluate("sft", sft.export_dir)
    with clock.phase("baseline"):
        train_records = list(dataset.records("train"))
        held_out = [r for split in ("val", "test") for r in dataset.records(split)]
        texts = heldout.constant_answers(train_records, held_out, reward_fn)
        run.scores["constant"] = heldout.score_answers(
            held_out, texts, reward_fn, stats, out / "heldout" / "constant_predictions.json"
        )
    for arm in RL_ARMS:
        name = "plain GRPO (raw rewards)" if arm == "grpo" else "MedGRPO (normalized rewards)"
        announce(
            f"{name}, {settings.grpo_steps} steps from the SFT model, held-out evaluation every {settings.eval_every}"
        )
        with clock.phase(arm):
            summary = train(
                grpo_config(settings, dataset, sft.export_dir, stats_path if arm == "medgrpo" else None, arm)
            )
        run.curves[arm] = eval_curves(summary.output_dir / "metrics.jsonl")
        evaluate(arm, summary.export_dir)
        run.paths[f"{arm} metrics"] = str(summary.output_dir / "metrics.jsonl")
        run.paths[f"{arm} model"] = str(summary.export_dir)
    run.paths.update(
        {
            "sft metrics": str(sft.output_dir / "metrics.jsonl"),
            "sft model": str(sft.export_dir),
            "norm stats": str(stats_path),
            "held-out predictions": str(out / "heldout"),
        }
    )
    run.timings = clock.as_dict()
    return run


def machine() -> dict[str, Any]:
    """What the demo ran on (the figures it prints are measured here)."""
    model = platform.processor()
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), model)
    except OSError:
        pass
    load = round(os.getloadavg()[0], 1) if hasattr(os, "getloadavg") else None
    return {"cpu": model, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "load_average_1min": load}


def run_demo(settings: DemoSettings) -> dict[str, Any]:
    """Every seed, then the table, the figures and the JSON result; returns the result."""
    from medgrpo.demo import report

    torch.set_num_threads(settings.threads)
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    host = machine()
    announce(
        f"{settings.seeds} seed(s) on {host['cores']} CPU cores ({host['cpu']}), torch threads {settings.threads}, "
        f"load average {host['load_average_1min']}"
    )
    runs = []
    for offset in range(settings.seeds):
        seed = settings.seed + offset
        seed_settings = dataclasses.replace(settings, seed=seed, out_dir=str(Path(settings.out_dir) / f"seed{seed}"))
        runs.append(run_seed(seed_settings))
    result = report.build_result(settings, host, runs)
    result["seconds"] = time.perf_counter() - start_wall
    result["cpu_seconds"] = time.process_time() - start_cpu
    report.publish(result, Path(settings.out_dir))
    return result


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """Arguments of ``medgrpo demo``: every :class:`DemoSettings` field, with its help and default."""
    parser = parser or argparse.ArgumentParser(prog="medgrpo demo")
    parser.description = __doc__.split("\n\n")[0]
    parser.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    for option in dataclasses.fields(DemoSettings):
        name = f"--{option.name.replace('_', '-')}"
        kind = type(option.default)
        choices = ADVANTAGE_SCALES if option.name == "scale" else None
        parser.add_argument(name, type=kind, default=option.default, choices=choices, help=option.metadata["help"])
    return parser


def run(args: argparse.Namespace) -> int:
    """Run the demo from parsed arguments; 0 once the arms ran (what they found is printed, not the status)."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    run_demo(DemoSettings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(DemoSettings)}))
    return 0


def register(subparsers) -> argparse.ArgumentParser:
    """Add ``demo`` to the ``medgrpo`` command line."""
    parser = subparsers.add_parser("demo", help="SFT vs plain GRPO vs MedGRPO on CPU on a synthetic task mixture")
    build_parser(parser).set_defaults(func=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """``python -m medgrpo.demo.pipeline``: same as ``medgrpo demo``."""
    return run(build_parser().parse_args(argv))


__all__ = [
    "DemoSettings",
    "SeedRun",
    "build_parser",
    "main",
    "prepare",
    "register",
    "run",
    "run_demo",
    "run_seed",
]
