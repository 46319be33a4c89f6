"""Smoke run of the trainer on the device: tiny random Qwen2.5-VL, SFT and MedGRPO in bf16, checkpoint, resume, export.

``python bench/gpu/trainer_smoke.py --json PATH [--work DIR]``. Runs on CUDA when a GPU is
visible (the CPU in the dry run). Each phase is asserted, timed and recorded:

    data         the demo's synthetic dataset (8 videos) without its caption records (their similarity reward
                 needs MiniLM weights, absent on the device), a BPE tokenizer trained on it, a random tiny model
    sft          2 SFT steps: metrics per step, a checkpoint at step 2, a Hugging Face export
    sft_resume   the same run to step 3 with resume: it starts from the step-2 checkpoint and runs 1 step
    grpo         2 MedGRPO steps from the SFT export: rollout, rewards, group advantages, the fused head + loss
    grpo_resume  the MedGRPO run to step 3 with resume
    export       the final export loads back onto the device in bf16 and gives a finite forward

The trainer's config is built in :func:`smoke_config` only: when TrainConfig's fields change,
that is the one function to update.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from timing import StageResult, bench_device

SIDE = 56  # decode side: 2 x 2 merged visual tokens per temporal patch (the demo's)
SFT_STEPS, GRPO_STEPS = 2, 2  # then one more step each, resumed


def smoke_config(mode: str, out: Path, model_dir: Path, train_file: Path, device: str, steps: int, resume: bool):
    """The smoke run's TrainConfig: bf16, attention "auto", activation checkpointing, a checkpoint every step."""
    from medgrpo.train.config import config_from_dict

    return config_from_dict(
        {
            "mode": mode,
            "output_dir": str(out),
            "seed": 3,
            "steps": steps,
            "save_every": 1,
            "resume": resume,
            "device": device,
            "model": {
                "path": str(model_dir),
                "dtype": "bfloat16",
                "attention": "auto",
                "activation_checkpointing": True,
                "freeze_vision": mode == "grpo",
            },
            "data": {
                "train_file": str(train_file),
                "num_workers": 0,
                "decode": {"min_pixels": SIDE * SIDE, "max_pixels": SIDE * SIDE},
            },
            "optim": {"lr": 1e-4},
            "sft": {"batch_size": 4, "micro_batch_size": 4},
            "grpo": {
                "prompts_per_step": 2,
                "micro_batch_size": 8,
                "rollout": {"group_size": 4, "max_new_tokens": 12},
            },
        }
    )


def check(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(message)


def run_training(mode: str, out: Path, setup: dict, device: str, steps: int, resume: bool) -> dict[str, Any]:
    """One train() call; asserts the steps it ran, finite losses, the checkpoint and the export."""
    from medgrpo.train.checkpoint import checkpoint_step, latest_checkpoint
    from medgrpo.train.loop import train
    from medgrpo.train.metrics import read_metrics

    config = smoke_config(mode, out, setup["model_dir"], setup["train_file"], device, steps, resume)
    first = steps - 1 if resume else 0
    summary = train(config)
    check(summary.steps == steps - first, f"{mode}: ran {summary.steps} steps, expected {steps - first}")
    rows = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    check([r["step"] for r in rows][-(steps - first) :] == list(range(first + 1, steps + 1)), f"{mode}: steps {rows}")
    check(all(math.isfinite(r["loss"]) for r in rows), f"{mode}: non-finite loss in {[r['loss'] for r in rows]}")
    latest = latest_checkpoint(out / "checkpoints")
    check(latest is not None and checkpoint_step(latest) == steps, f"{mode}: latest checkpoint {latest}")
    export = Path(summary.export_dir)
    check((export / "config.json").is_file() and any(export.glob("*.safetensors")), f"{mode}: export {export}")
    keep = ("loss", "grad_norm", "reward_raw", "clip_fraction", "tokens_per_s", "peak_memory_gib", "peak_rss_gib")
    return {
        "steps_run": summary.steps,
        "skipped_steps": summary.skipped_steps,
        "skipped_records": summary.skipped_records,
        "last_metrics": {k: v for k, v in summary.last_metrics.items() if k in keep},
        "checkpoint_step": checkpoint_step(latest),
        "export_dir": str(export),
    }


def check_export(export: Path, device: str) -> dict[str, Any]:
    """The exported model loads onto ``device`` in bf16 and a text-only forward gives finite logits."""
    from medgrpo.train.model import ModelConfig, load_model

    model = load_model(ModelConfig(path=str(export), dtype="bfloat16", attention="auto"), device).eval()
    parameter = next(model.parameters())
    check(parameter.device.type == device and parameter.dtype == torch.bfloat16, f"loaded as {parameter}")
    ids = torch.arange(1, 17, device=device).unsqueeze(0)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    check(bool(torch.isfinite(logits).all()), "export: non-finite logits")
    return {"attention": getattr(model.config, "_attn_implementation", None), "logits_shape": list(logits.shape)}


def prepare(work: Path) -> dict[str, Any]:
    """The demo's preparation, small (the tests' tiny run): 8 synthetic videos and a tiny model (seed 1)."""
    from medgrpo.demo.pipeline import DemoSettings
    from medgrpo.demo.pipeline import prepare as prepare_demo

    dataset, model_dir = prepare_demo(DemoSettings(out_dir=str(work), num_videos=8, seed=1))
    return {"model_dir": model_dir, "train_file": without_captions(Path(dataset.train))}


def without_captions(train_file: Path) -> Path:
    """The train records minus the caption tasks', beside ``train_file``: their similarity reward needs the
    MiniLM weights, which do not travel to the device (stage 2); every other reward runs as in training."""
    from medgrpo.data.task_key import task_of
    from medgrpo.rewards.task_rewards import CAPTION_TASKS

    lines = [line for line in train_file.read_text().splitlines() if line.strip()]
    kept = [line for line in lines if task_of(json.loads(line).get("qa_type")) not in CAPTION_TASKS]
    check(0 < len(kept) < len(lines), f"{len(kept)} of {len(lines)} train records are not captions")
    path = train_file.with_name("train_no_captions.jsonl")
    path.write_text("\n".join(kept) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", default=None)
    parser.add_argument("--work", default=None, help="scratch directory (default: a temporary one)")
    args = parser.parse_args(argv)
    device = bench_device()
    work = Path(args.work or tempfile.mkdtemp(prefix="medgrpo-smoke-"))
    result = StageResult(args.json, work=str(work), phases={})
    setup: dict[str, Any] = {}

    def sft_export() -> Path:
        return Path(result.data["phases"]["sft_resume"]["export_dir"])

    def grpo(out: Path, steps: int, resume: bool) -> dict[str, Any]:
        return run_training("grpo", out, setup | {"model_dir": sft_export()}, device, steps, resume)

    phases: list[tuple[str, Callable[[], dict[str, Any]]]] = [
        ("data", lambda: setup.update(prepare(work)) or {"model_dir": str(setup["model_dir"])}),
        ("sft", lambda: run_training("sft", work / "sft", setup, device, SFT_STEPS, False)),
        ("sft_resume", lambda: run_training("sft", work / "sft", setup, device, SFT_STEPS + 1, True)),
        ("grpo", lambda: grpo(work / "grpo", GRPO_STEPS, False)),
        ("grpo_resume", lambda: grpo(work / "grpo", GRPO_STEPS + 1, True)),
        ("export", lambda: check_export(Path(result.data["phases"]["grpo_resume"]["export_dir"]), device)),
    ]
    failed = False
    for name, phase in phases:
        start = time.perf_counter()
        try:
            entry = {"status": "ok", **phase()}
        except Exception as error:
            traceback.print_exc()
            entry, failed = {"status": "failed", "error": f"{type(error).__name__}: {error}"[:1000]}, True
        entry["seconds"] = round(time.perf_counter() - start, 2)
        result.data["phases"][name] = entry
        result.save()
        print(f"trainer smoke {name}: {entry['status']} ({entry['seconds']:.1f} s)", flush=True)
        if failed:
            break
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
