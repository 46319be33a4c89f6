"""``medgrpo demo``: SFT then MedGRPO on CPU, on the synthetic dataset and a tiny Qwen2.5-VL.

The whole MedGRPO recipe, small: render the dataset (:mod:`medgrpo.demo.synthetic`), train a
local BPE tokenizer on its text and build a random tiny Qwen2.5-VL, SFT on the reference
answers, score the SFT policy on held-out records, fit the per-(data_source, qa_type)
normalization statistics on sampled SFT rollouts (``medgrpo fit-norm``), run MedGRPO from the
SFT checkpoint with those statistics, and score again. Everything goes through the same code as
a real run (:func:`medgrpo.train.loop.train`, the loader, the rewards, checkpoints, HF export).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from medgrpo.demo.synthetic import DECODE_SIDE, decode_options, demo_tokenizer_corpus, generate_dataset
from medgrpo.train.config import TrainConfig, config_from_dict


@dataclass
class DemoSettings:
    """Sizes of the demo (defaults: about a minute on 2 idle CPU cores, 123 held-out records)."""

    out_dir: str = "runs/demo"
    seed: int = 0
    num_videos: int = 160
    side: int = DECODE_SIDE
    sft_steps: int = 300
    sft_batch_size: int = 8
    sft_lr: float = 3e-3
    grpo_steps: int = 200
    grpo_lr: float = 5e-5
    group_size: int = 8
    prompts_per_step: int = 8
    max_new_tokens: int = 40
    norm_rollouts_group: int = 4
    threads: int = 2


@dataclass
class DemoResult:
    """Held-out scores after SFT and after GRPO, and the time it all took."""

    sft: dict = field(default_factory=dict)
    grpo: dict = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def improved(self) -> bool:
        return self.grpo["reward_norm"] > self.sft["reward_norm"]


def _run_config(settings: DemoSettings, mode: str, dataset, model_dir: Path, **sections) -> TrainConfig:
    """The demo's config of a run: the tiny fp32 model on the CPU (vision trained by SFT only), frames of
    ``side`` x ``side``."""
    pixels = float(settings.side * settings.side)
    model = {"path": str(model_dir), "dtype": "float32", "attention": "sdpa", "activation_checkpointing": False}
    model["freeze_vision"] = mode == "grpo"
    data = {"train_file": str(dataset.train), "num_workers": 0, "decode": {"min_pixels": pixels, "max_pixels": pixels}}
    base = {"mode": mode, "output_dir": str(Path(settings.out_dir) / mode), "seed": settings.seed, "save_every": 0}
    return config_from_dict({**base, "device": "cpu", "model": model, "data": data, **sections})


def prepare(settings: DemoSettings) -> tuple[object, Path]:
    """Dataset, tokenizer and the random tiny model (saved with its tokenizer); returns (dataset, model dir)."""
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
        dataset,
        model_dir,
        steps=settings.sft_steps,
        optim={"lr": settings.sft_lr, "warmup_steps": 10, "schedule": "cosine", "max_grad_norm": 1.0},
        sft={"batch_size": settings.sft_batch_size, "micro_batch_size": settings.sft_batch_size},
    )


def grpo_config(settings: DemoSettings, dataset, model_dir: Path, stats: Path) -> TrainConfig:
    rollout = {"group_size": settings.group_size, "max_new_tokens": settings.max_new_tokens, "temperature": 1.0}
    grpo = {
        "prompts_per_step": settings.prompts_per_step,
        "norm_stats": str(stats),
        "micro_batch_size": settings.group_size * settings.prompts_per_step,
        "rollout": rollout,
    }
    return _run_config(
        settings,
        "grpo",
        dataset,
        model_dir,
        steps=settings.grpo_steps,
        optim={"lr": settings.grpo_lr, "max_grad_norm": 1.0},
        grpo=grpo,
    )


def _load(model_dir: Path):
    from transformers import AutoTokenizer

    from medgrpo.train.model import ModelConfig, load_model

    model = load_model(ModelConfig(path=str(model_dir), dtype="float32", attention="sdpa"), "cpu")
    return model.eval(), AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)


def fit_stats(settings: DemoSettings, dataset, model_dir: Path, reward_fn) -> Path:
    """Sampled SFT rollouts on the train split → rollouts.jsonl → ``medgrpo fit-norm`` → stats file."""
    from medgrpo.rewards import norm_stats
    from medgrpo.train.evaluation import rollouts, write_rollout_jsonl

    model, tokenizer = _load(model_dir)
    records, texts = rollouts(
        model,
        tokenizer,
        dataset.train,
        decode_options(settings.side),
        group_size=settings.norm_rollouts_group,
        temperature=1.0,
        max_new_tokens=settings.max_new_tokens,
        seed=settings.seed,
    )
    out = Path(settings.out_dir)
    jsonl = write_rollout_jsonl(out / "sft_rollouts.jsonl", records, texts, reward_fn)
    stats = out / "norm_stats.json"
    if norm_stats.main([str(jsonl), "-o", str(stats), "--min-samples", "8"]) != 0:
        raise RuntimeError("fit-norm failed on the SFT rollouts")
    return stats


def held_out(settings: DemoSettings, dataset, model_dir: Path, reward_fn, stats) -> dict:
    """Greedy answers of the policy in ``model_dir`` on the val and test splits, scored."""
    from medgrpo.train.evaluation import evaluate_policy

    model, tokenizer = _load(model_dir)
    options = decode_options(settings.side)
    results = [
        evaluate_policy(
            model, tokenizer, path, reward_fn, stats, options=options, max_new_tokens=settings.max_new_tokens
        )
        for path in (dataset.val, dataset.test)
    ]
    count = sum(r.count for r in results)
    keys = sorted({k for r in results for k in r.per_key_norm})

    def pooled(name: str) -> float:
        return sum(getattr(r, name) * r.count for r in results) / count

    per_key = {}
    for key in keys:
        values = [(r.per_key_norm[key], r.per_key_raw[key]) for r in results if key in r.per_key_norm]
        per_key[key] = {
            "reward_norm": sum(v for v, _ in values) / len(values),
            "reward_raw": sum(v for _, v in values) / len(values),
        }
    return {
        "reward_raw": pooled("reward_raw"),
        "reward_norm": pooled("reward_norm"),
        "count": count,
        "per_key": per_key,
        "examples": results[0].answers[:4],
    }


def run_demo(settings: DemoSettings) -> DemoResult:
    """The demo end to end; prints progress and the held-out table, returns the scores."""
    from medgrpo.rewards.norm_stats import load_norm_stats
    from medgrpo.rewards.rewarder import build_rewarder
    from medgrpo.rewards.task_rewards import RewardConfig
    from medgrpo.train.loop import train

    start = time.perf_counter()
    torch.set_num_threads(settings.threads)
    dataset, init_dir = prepare(settings)
    print(f"demo: dataset and tiny model ready in {Path(settings.out_dir).resolve()}")
    sft = train(sft_config(settings, dataset, init_dir))
    sft_dir = sft.export_dir
    print(f"demo: SFT done ({sft.steps} steps, last loss {sft.last_metrics.get('loss'):.3f})")
    reward_fn = build_rewarder(RewardConfig()).fn
    stats_path = fit_stats(settings, dataset, sft_dir, reward_fn)
    stats = load_norm_stats(stats_path)
    result = DemoResult(sft=held_out(settings, dataset, sft_dir, reward_fn, stats))
    grpo = train(grpo_config(settings, dataset, sft_dir, stats_path))
    print(f"demo: MedGRPO done ({grpo.steps} steps)")
    result.grpo = held_out(settings, dataset, grpo.export_dir, reward_fn, stats)
    result.seconds = time.perf_counter() - start
    print_table(result)
    (Path(settings.out_dir) / "demo_result.json").write_text(
        json.dumps(
            {"sft": result.sft, "grpo": result.grpo, "seconds": result.seconds, "improved": result.improved}, indent=2
        )
    )
    return result


def print_table(result: DemoResult) -> None:
    """Held-out mean normalized (and raw) reward per key, after SFT and after GRPO."""
    print(f"\n{'held-out key':34s} {'SFT norm':>9s} {'GRPO norm':>9s} {'SFT raw':>8s} {'GRPO raw':>8s}")
    for key, sft in result.sft["per_key"].items():
        grpo = result.grpo["per_key"].get(key, {})
        print(
            f"{key:34s} {sft['reward_norm']:9.3f} {grpo.get('reward_norm', float('nan')):9.3f} "
            f"{sft['reward_raw']:8.3f} {grpo.get('reward_raw', float('nan')):8.3f}"
        )
    print(
        f"{'all (' + str(result.sft['count']) + ' records)':34s} {result.sft['reward_norm']:9.3f} "
        f"{result.grpo['reward_norm']:9.3f} {result.sft['reward_raw']:8.3f} {result.grpo['reward_raw']:8.3f}"
    )
    verdict = "improved" if result.improved else "did NOT improve"
    print(f"\nMedGRPO {verdict} the mean normalized held-out reward over SFT; {result.seconds:.0f} s in all.")


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """Arguments of ``medgrpo demo`` (every :class:`DemoSettings` field)."""
    parser = parser or argparse.ArgumentParser(prog="medgrpo demo", description=__doc__.split("\n\n")[0])
    for name, value in vars(DemoSettings()).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    return parser


def run(args: argparse.Namespace) -> int:
    """Run the demo from parsed arguments: exit status 0 when GRPO improved on SFT, 1 otherwise."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    fields = {name: getattr(args, name) for name in vars(DemoSettings())}
    return 0 if run_demo(DemoSettings(**fields)).improved else 1


def register(subparsers) -> argparse.ArgumentParser:
    """Add ``demo`` to the ``medgrpo`` command line."""
    parser = subparsers.add_parser(
        "demo",
        help="SFT then MedGRPO on CPU on a synthetic dataset (a few minutes)",
        description=__doc__.split("\n\n")[0],
    )
    build_parser(parser).set_defaults(func=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """``python -m medgrpo.demo.pipeline``: same as ``medgrpo demo``."""
    return run(build_parser().parse_args(argv))


__all__ = ["DemoResult", "DemoSettings", "build_parser", "main", "register", "run", "run_demo"]
