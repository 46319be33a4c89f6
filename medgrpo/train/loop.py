"""The training run, SFT or MedGRPO, one process or torchrun on N devices.

build → resume → for each step: batch → step → log → eval → save; then the final checkpoint and the
Hugging Face export. The components are the modules next to this one; docs/design-train.md walks
through a step.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medgrpo.rewards.rewarder import Rewarder, build_rewarder
from medgrpo.train import checkpoint as ckpt
from medgrpo.train.config import ConfigError, TrainConfig, config_to_dict
from medgrpo.train.data import NoUsableRecords, build_loader
from medgrpo.train.distributed import Runtime, init_runtime, min_over_ranks, seed_everything, warm_up
from medgrpo.train.evaluation import eval_metrics
from medgrpo.train.grpo import GRPOSetup, grpo_step
from medgrpo.train.metrics import (
    MetricsLog,
    StepResult,
    peak_memory,
    plot_reward_curves,
    read_metrics,
    reward_means,
)
from medgrpo.train.model import DTYPES, ModelConfig, load_model, load_reference_model, shard_model
from medgrpo.train.optim import build_optimizer
from medgrpo.train.sft import sft_step
from medgrpo.train.state import TrainState
from medgrpo.train.validate import validate


@dataclass
class RunSummary:
    """What a run did: the steps this process ran; over the whole run (resumes included) the skipped steps
    and the records skipped by kind; the final metrics row; and where its outputs are."""

    steps: int
    skipped_steps: int
    skipped_records: dict[str, int]
    last_metrics: dict[str, Any]
    output_dir: Path
    export_dir: Path | None


def build_model(config: ModelConfig, runtime: Runtime, *, with_reference: bool) -> tuple[nn.Module, nn.Module | None]:
    """The policy (and the frozen reference for beta > 0) from the local directory, FSDP2-sharded under torchrun."""
    model = load_model(config, runtime.device)
    reference = load_reference_model(config, runtime.device) if with_reference else None
    if runtime.world_size > 1:
        # The loss is divided by the global token count: gradients are summed over ranks.
        dtype = DTYPES[config.compute_dtype or config.dtype]
        model = shard_model(model, param_dtype=dtype, gradient_divide_factor=1.0)
        warm_up(model)
        if reference is not None:
            reference = shard_model(reference, param_dtype=dtype, gradient_divide_factor=1.0)
            warm_up(reference)
    return model, reference


def train(config: TrainConfig) -> RunSummary:
    """Run SFT or MedGRPO as ``config`` says; resumable; exports the final model (HF format).

    Raises:
        ConfigError: the problems :func:`~medgrpo.train.validate.validate` found, before anything is
            loaded or written.
        NoUsableRecords: no record of ``data.train_file`` can be used (found before anything is written,
            or, when only decoding shows it, on every rank at the same step).
    """
    problems = validate(config)
    if problems:
        raise ConfigError(*problems)
    from transformers import AutoTokenizer

    runtime = init_runtime(config.device)
    seed_everything(config.seed, runtime.rank)
    grpo, evaluating = config.mode == "grpo", bool(config.eval_every and config.data.eval_file)
    tokenizer = AutoTokenizer.from_pretrained(config.model.path, local_files_only=True)
    data = build_loader(
        config.data,
        runtime,
        tokenizer,
        batch_size=config.grpo.prompts_per_step if grpo else config.sft.batch_size,
        with_answers=not grpo,
        seed=config.seed,
        reserved_tokens=config.grpo.rollout.max_new_tokens if grpo else 0,
    )
    output = Path(config.output_dir)
    if runtime.is_main:
        output.mkdir(parents=True, exist_ok=True)
        (output / "config.json").write_text(json.dumps(config_to_dict(config), indent=2))
    model, reference = build_model(config.model, runtime, with_reference=grpo and config.grpo.loss.beta > 0)
    optimizer, scheduler = build_optimizer(model, config.optim, config.steps)
    rewarder = build_rewarder(config.rewards, config.grpo.norm_stats, runtime.device) if grpo or evaluating else None
    generator = torch.Generator(device=runtime.device).manual_seed(config.seed * 7919 + runtime.rank)
    state = TrainState(model, optimizer, scheduler, data.sampler, generator)
    if config.resume:
        state.resume(output / "checkpoints")
    start_step = state.step
    if grpo:
        setup = GRPOSetup.build(config.grpo, tokenizer, max_grad_norm=config.optim.max_grad_norm, reference=reference)
        step = functools.partial(grpo_step, rewarder=rewarder, setup=setup)
    else:
        train_vision = not config.model.freeze_vision
        step = functools.partial(
            sft_step, config=config.sft, max_grad_norm=config.optim.max_grad_norm, train_vision=train_vision
        )
    log = MetricsLog(output, config.steps, runtime.is_main, start_step)
    last: dict[str, Any] = {}
    stream = iter(data)
    pixel_dtype = DTYPES[config.model.dtype]
    while state.step < config.steps:
        batch = next(stream)
        if min_over_ranks(len(batch), runtime.device) == 0:  # every rank stops here together
            raise NoUsableRecords(
                f"data.train_file {config.data.train_file}: no usable record left to draw at step {state.step + 1} "
                f"(records skipped by kind: {state.skipped_records}; each is logged with its id)"
            )
        result: StepResult = step(state, batch.to(runtime.device, pixel_dtype))
        state.step += 1
        state.skipped_steps += not result.stepped
        result.metrics.update(
            lr=scheduler.get_last_lr()[0],
            skipped_steps=state.skipped_steps,
            **skip_metrics(state.skipped_records),
            **peak_memory(runtime.device),
        )
        if state.step % max(config.log_every, 1) == 0 or state.step == config.steps:
            if result.reward_rows is not None:
                result.metrics.update(reward_means(result.reward_rows))
            last = log.log(state.step, result.metrics)
        if evaluating and state.step % config.eval_every == 0:
            log.log(state.step, evaluate(model, tokenizer, rewarder, config, runtime))
        if config.save_every and state.step % config.save_every == 0 and state.step < config.steps:
            state.save(output / "checkpoints", config.keep_checkpoints)
    log.close()
    state.save(output / "checkpoints", config.keep_checkpoints)
    export = ckpt.export_hf(model, tokenizer, output / "final")
    if runtime.is_main:  # the whole run's curves: the rows of earlier processes are in the log too
        plot_reward_curves(read_metrics(log.path), output / "reward_curves.png")
    steps = config.steps - start_step
    return RunSummary(steps, state.skipped_steps, state.skipped_records, last, output, export)


def skip_metrics(skipped: dict[str, int]) -> dict[str, int]:
    """``skipped_records`` (the total) and ``skipped_records/<kind>`` of the run's skipped records."""
    return {"skipped_records": sum(skipped.values()), **{f"skipped_records/{k}": v for k, v in sorted(skipped.items())}}


def evaluate(model: nn.Module, tokenizer, rewarder: Rewarder, config: TrainConfig, runtime: Runtime) -> dict[str, Any]:
    """Greedy answers on ``data.eval_file`` (this rank's model), as ``eval/...`` metrics."""
    return eval_metrics(
        model,
        tokenizer,
        rewarder,
        config.data.eval_file,
        options=config.data.decode,
        max_new_tokens=config.grpo.rollout.max_new_tokens,
        device=runtime.device,
    )


__all__ = ["RunSummary", "build_model", "skip_metrics", "train"]
