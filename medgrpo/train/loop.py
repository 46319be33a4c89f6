"""The training loop: SFT or MedGRPO on Qwen2.5-VL, one process or torchrun on N devices.

Written out, torchtitan-style: set up (distributed, model, optimizer, data, rewards), then a
plain ``for step`` loop whose body is the SFT or GRPO step, metrics, checkpoints and
evaluation. Everything a step produces stays on the device until the step is logged.

GRPO step (per rank): the loader's prompts (left padded) → :func:`medgrpo.train.rollout.generate`
(each video encoded once, G completions from one prefill) → rewards
(:class:`medgrpo.rewards.task_rewards.RewardFunction`) → :func:`medgrpo.group_advantages` with
the run's normalization statistics → ``num_iterations`` updates with
:func:`medgrpo.fused_linear_policy_loss` (old log-probs from the policy before the first
update when ``num_iterations > 1``; reference log-probs when ``beta > 0``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from medgrpo.data.collate import END_OF_TURN, VideoBatch, VideoCollator
from medgrpo.data.loader import DaliRecordLoader, DecodeOptions, VideoDataset, VideoLoader
from medgrpo.data.records import RecordDataset
from medgrpo.ops.group_advantages import group_advantages_with_stats
from medgrpo.ops.policy_loss import PolicyLossConfig
from medgrpo.train import checkpoint as ckpt
from medgrpo.train.config import TrainConfig, config_to_dict
from medgrpo.train.grpo import LossOptions, backward_policy_loss, optimizer_step, policy_inputs, sequence_logprobs
from medgrpo.train.sampler import BalancedSampler, record_key
from medgrpo.train.sft import sft_backward

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------- setup
@dataclass
class Runtime:
    """Process-level state: device, ranks."""

    device: torch.device
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_runtime(device: str = "auto") -> Runtime:
    """Join the torchrun process group when launched by torchrun (NCCL on CUDA, gloo on CPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    return Runtime(torch.device("cuda", local_rank) if use_cuda else torch.device("cpu"), rank, world_size)


def seed_everything(seed: int, rank: int) -> None:
    """Python, NumPy and torch RNGs from ``seed`` (offset by rank: ranks sample differently)."""
    random.seed(seed + rank)
    np.random.seed(seed + rank)
    torch.manual_seed(seed + rank)


def build_model(config: TrainConfig, runtime: Runtime):
    """Policy (and frozen reference when beta > 0) from the local directory, FSDP2-sharded under torchrun."""
    from medgrpo.train.model import ModelConfig, load_model, load_reference_model, shard_model

    section = config.model
    model_config = ModelConfig(
        path=section.path,
        dtype=section.dtype,
        attention=section.attention,
        activation_checkpointing=section.activation_checkpointing,
        freeze_vision=section.freeze_vision,
    )
    model = load_model(model_config, runtime.device)
    reference = None
    if config.mode == "grpo" and config.grpo.beta > 0:
        reference = load_reference_model(model_config, runtime.device)
    if runtime.world_size > 1:
        # The loss is divided by the global token count: gradients are summed over ranks.
        dtype = torch.bfloat16 if section.dtype == "bfloat16" else None
        model = shard_model(model, param_dtype=dtype, gradient_divide_factor=1.0)
        warm_up(model)
        if reference is not None:
            reference = shard_model(reference, param_dtype=dtype, gradient_divide_factor=1.0)
            warm_up(reference)
    return model, reference


@torch.no_grad()
def warm_up(model) -> None:
    """One text-only root forward: FSDP2 initializes its state on the root's first forward, and the
    rollout later calls submodules directly (see :func:`gathered`)."""
    from medgrpo.train.model import final_hidden_states

    device = next(model.parameters()).device
    ids = torch.full((1, 2), int(model.config.get_text_config().eos_token_id or 0), dtype=torch.long, device=device)
    final_hidden_states(model, input_ids=ids, attention_mask=torch.ones_like(ids))
    # The root keeps its parameters gathered after a forward (for the backward that normally
    # follows); reshard now, so the optimizer is built over the sharded parameters.
    model.reshard()


@contextlib.contextmanager
def gathered(model) -> Iterator[None]:
    """Gather a sharded model's root parameters (embeddings, norm, lm head) for a no-grad rollout.

    The rollout calls the model's stages directly (:mod:`medgrpo.train.qwen`); the decoder blocks
    and the vision tower gather themselves in their own forward hooks. Unsharded models: nothing.
    """
    from medgrpo.train.grpo import is_sharded

    if not is_sharded(model):
        yield
        return
    model.unshard()
    try:
        yield
    finally:
        model.reshard()


def build_optimizer(model: torch.nn.Module, config: TrainConfig):
    """AdamW over the trainable parameters, with linear warmup then constant or cosine decay."""
    section = config.optim
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=section.lr, betas=(section.beta1, section.beta2), weight_decay=section.weight_decay
    )
    steps, warmup = max(config.steps, 1), section.warmup_steps

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if section.schedule == "cosine":
            progress = (step - warmup) / max(steps - warmup, 1)
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        return 1.0

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor), params


def decode_options(config: TrainConfig) -> DecodeOptions:
    """Sampling options of the run (``backend: dali`` plans like the CPU decoders; DALI reads the pixels)."""
    data = config.data
    backend = "pyav" if data.backend == "dali" else data.backend
    return DecodeOptions(backend=backend, fps=data.fps, min_pixels=data.min_pixels, max_pixels=data.max_pixels)


def record_keys(records: RecordDataset) -> list[str]:
    """Every record's sampler key, from the raw JSON (:func:`~medgrpo.data.records.task_key`: no path resolved).

    A record whose line is not JSON, or whose data source or task type is invalid, gets the key
    ``"invalid/invalid"``: it is still drawn, then skipped and counted by the loader like any other
    unusable record.
    """
    from medgrpo.data.records import RecordError, task_key

    keys = []
    for i in range(len(records)):
        try:
            key = task_key(records.raw(i))
        except RecordError:
            key = None
        keys.append(record_key(*(key or ("invalid", "invalid"))))
    return keys


def build_loader(
    config: TrainConfig, runtime: Runtime, tokenizer
) -> tuple[VideoLoader | DaliRecordLoader, BalancedSampler]:
    """The rank's loader: balanced sampler; DALI (``data.backend: dali``) or CPU decoder workers; the collator."""
    data = config.data
    records = RecordDataset(data.train_file, root=data.root or None)
    sft = config.mode == "sft"
    batch_size = config.sft.batch_size if sft else config.grpo.prompts_per_step
    sampler = BalancedSampler(
        record_keys(records),
        data.sampler_weights,
        rank=runtime.rank,
        world_size=runtime.world_size,
        seed=config.seed,
        samples_per_epoch=max(len(records) // runtime.world_size, batch_size),
    )
    collate = VideoCollator(
        tokenizer, with_answers=sft, padding_side="right" if sft else "left", max_length=data.max_length
    )
    dataset = VideoDataset(records, decode_options(config))
    if data.backend == "dali":
        device = "gpu" if runtime.device.type == "cuda" else "cpu"
        loader = DaliRecordLoader(
            dataset, collate, batch_size=batch_size, sampler=sampler, device=device, device_id=runtime.device.index
        )
    else:
        loader = VideoLoader(
            dataset,
            collate,
            batch_size=batch_size,
            sampler=sampler,
            num_workers=data.num_workers,
            pin_memory=runtime.device.type == "cuda",
        )
    return loader, sampler


def batches(loader: VideoLoader, sampler: BalancedSampler) -> Iterator[VideoBatch]:
    """Batches forever, epoch after epoch; the sampler's position follows what was consumed."""
    while True:
        for batch in loader:
            sampler.advance(len(batch) + len(batch.skipped))
            yield batch
        sampler.set_epoch(sampler.epoch + 1)


# ------------------------------------------------------------------------------------ rewards
def build_rewards(config: TrainConfig):
    """The reward function and the normalization statistics (None: raw rewards)."""
    from medgrpo.rewards.judge import JudgeConfig
    from medgrpo.rewards.norm_stats import load_norm_stats
    from medgrpo.rewards.task_rewards import RewardConfig, RewardFunction

    section = config.rewards
    judge = None
    if section.judge_base_url:
        judge = JudgeConfig(
            base_url=section.judge_base_url,
            model=section.judge_model,
            api_key_env=section.judge_api_key_env,
            cache_path=section.judge_cache or None,
        )
    reward_fn = RewardFunction(
        RewardConfig(format_penalty=section.format_penalty, judge=judge, embedder_dir=section.embedder or None)
    )
    stats = load_norm_stats(config.grpo.norm_stats) if config.grpo.norm_stats else None
    return reward_fn, stats


@dataclass
class Rewarder:
    """The run's reward function and normalization statistics (``table``: their (K, 3) tensor on the device)."""

    fn: Any
    stats: Any = None
    table: torch.Tensor | None = None

    def score(self, texts: list[str], records: list, device: torch.device):
        """Raw rewards on ``device``, their key rows (None without statistics) and the reward batch (counts)."""
        batch = self.fn(texts, records)
        rewards = batch.rewards.to(device)
        if self.stats is None:
            return rewards, None, batch
        sources, qa_types = [r.data_source for r in records], [r.qa_type for r in records]
        return rewards, self.stats.indices(sources, qa_types, unknown="nan", device=device), batch


# --------------------------------------------------------------------------------- the steps
@dataclass
class StepResult:
    metrics: dict[str, Any]
    stepped: bool
    reward_rows: tuple[list[str], torch.Tensor, torch.Tensor] | None = None  # keys, raw and normalized rewards


def grpo_step(
    model,
    reference,
    batch: VideoBatch,
    tokenizer,
    rewarder: Rewarder,
    optimizer,
    scheduler,
    params,
    config: TrainConfig,
    generator: torch.Generator | None,
) -> StepResult:
    """One MedGRPO step on a batch of prompts (see the module docstring)."""
    from medgrpo.train.rollout import RolloutConfig, decode_text, generate

    g = config.grpo
    device = batch.input_ids.device
    start = time.perf_counter()
    with gathered(model), torch.no_grad():
        rollout = generate(
            model,
            batch,
            RolloutConfig(
                group_size=g.group_size, max_new_tokens=g.max_new_tokens, temperature=g.temperature, top_p=g.top_p
            ),
            eos_token_ids=eos_ids(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            generator=generator,
        )
    t_rollout = time.perf_counter()
    texts = decode_text(tokenizer, rollout)
    records = [r for r in batch.records for _ in range(g.group_size)]
    rewards, keys, reward_batch = rewarder.score(texts, records, device)
    advantage = group_advantages_with_stats(
        rewards, group_size=g.group_size, keys=keys, stats=rewarder.table, k=g.k, scale=g.scale
    )
    normalized = advantage.rewards  # the rewards the advantages came from: normalized when stats are given
    t_reward = time.perf_counter()
    inputs = policy_inputs(model, rollout, batch.video_grid_thw, batch.second_per_grid_ts, batch.pixel_values_videos)
    loss = PolicyLossConfig(loss_type=g.loss_type, epsilon_low=g.epsilon_low, epsilon_high=g.epsilon_high, beta=g.beta)
    options = LossOptions(
        loss=loss, temperature=g.temperature if g.temperature > 0 else 1.0, micro_batch_size=g.micro_batch_size
    )
    logp_kwargs = {"temperature": options.temperature, "micro_batch_size": g.micro_batch_size}
    ref_logp = sequence_logprobs(reference, inputs, **logp_kwargs) if reference is not None else None
    old_logp = sequence_logprobs(model, inputs, **logp_kwargs) if g.num_iterations > 1 else None
    t_logp = time.perf_counter()
    model.train()
    stepped_all, skipped = True, 0
    for _ in range(g.num_iterations):
        update = backward_policy_loss(
            model, inputs, advantage.advantages, options, old_logp=old_logp, ref_logp=ref_logp
        )
        stepped, grad_norm = optimizer_step(
            params, optimizer, scheduler, loss=update.loss, max_grad_norm=config.optim.max_grad_norm
        )
        stepped_all &= stepped
        skipped += not stepped
    end = time.perf_counter()
    tokens = int(rollout.completion_tokens)
    metrics = {
        "loss": update.loss,
        "kl": update.kl,
        "clip_fraction": update.clip_fraction,
        "clip_fraction_low": update.clip_fraction_low,
        "clip_fraction_high": update.clip_fraction_high,
        "entropy": update.entropy,
        "grad_norm": grad_norm,
        "reward_raw": torch.nanmean(rewards),
        "reward_norm": torch.nanmean(normalized),
        "reward_missing": torch.isnan(rewards).float().mean(),
        "advantage_std": advantage.advantages.std(),
        "zero_std_group_fraction": advantage.zero_std_fraction,
        "completion_tokens": tokens,
        "nonfinite_skipped": skipped,
        "time_rollout_s": t_rollout - start,
        "time_reward_s": t_reward - t_rollout,
        "time_logprob_s": t_logp - t_reward,
        "time_update_s": end - t_logp,
        "tokens_per_s": tokens / max(end - start, 1e-9),
        "samples_per_s": len(texts) / max(end - start, 1e-9),
        **{f"reward_count/{k}": v for k, v in reward_batch.counts.items()},
    }
    rows = ([record_key(r.data_source, r.qa_type) for r in records], rewards, normalized)
    return StepResult(metrics, stepped_all, rows)


def sft_step(model, batch: VideoBatch, optimizer, scheduler, params, config: TrainConfig) -> StepResult:
    """One SFT step: answer-token NLL through the fused head, clipped, skipped when not finite."""
    start = time.perf_counter()
    model.train()
    loss, tokens = sft_backward(
        model, batch, micro_batch_size=config.grpo.micro_batch_size, train_vision=not config.model.freeze_vision
    )
    stepped, grad_norm = optimizer_step(
        params, optimizer, scheduler, loss=loss, max_grad_norm=config.optim.max_grad_norm
    )
    elapsed = time.perf_counter() - start
    metrics = {
        "loss": loss,
        "grad_norm": grad_norm,
        "answer_tokens": tokens,
        "nonfinite_skipped": int(not stepped),
        "time_update_s": elapsed,
        "samples_per_s": len(batch) / max(elapsed, 1e-9),
        "tokens_per_s": batch.attention_mask.sum() / max(elapsed, 1e-9),
    }
    return StepResult(metrics, stepped)


def eos_ids(tokenizer) -> list[int]:
    """Tokens that end a completion: ``<|im_end|>`` and the pad/end-of-text token."""
    ids = [tokenizer.convert_tokens_to_ids(END_OF_TURN)]
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id not in ids:
        ids.append(tokenizer.pad_token_id)
    return ids


# ------------------------------------------------------------------------------- logging
def as_number(value: Any) -> Any:
    """A logged value on the host (tensors read here, once per logged step)."""
    if isinstance(value, torch.Tensor):
        value = value.detach().float().item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsLog:
    """Per-step JSONL metrics, TensorBoard scalars when available, and a progress line with ETA."""

    def __init__(self, directory: Path, total_steps: int, enabled: bool, start_step: int = 0):
        self.enabled, self.total, self.start_step = enabled, total_steps, start_step
        self.start = time.perf_counter()
        self.path = directory / "metrics.jsonl"
        self.writer = None
        if enabled:
            directory.mkdir(parents=True, exist_ok=True)
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(directory / "tensorboard"))
            except ImportError:
                logger.info("tensorboard is not installed: metrics go to %s only", self.path)

    def log(self, step: int, metrics: dict[str, Any]) -> dict[str, Any]:
        row = {"step": step, **{k: as_number(v) for k, v in metrics.items()}}
        if not self.enabled:
            return row
        with open(self.path, "a") as handle:
            handle.write(json.dumps(row) + "\n")
        if self.writer is not None:
            for name, value in row.items():
                if isinstance(value, (int, float)) and name != "step":
                    self.writer.add_scalar(name, value, step)
        self._progress(step, row)
        return row

    def _progress(self, step: int, row: dict[str, Any]) -> None:
        done = step - self.start_step
        elapsed = time.perf_counter() - self.start
        eta = elapsed / max(done, 1) * (self.total - step)
        width = 24
        filled = int(width * step / max(self.total, 1))
        shown = " ".join(
            f"{k}={row[k]:.4g}" for k in ("loss", "reward_raw", "reward_norm") if isinstance(row.get(k), (int, float))
        )
        sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {step}/{self.total} {shown} eta {eta:5.0f}s ")
        if step == self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def plot_reward_curves(rows: list[dict[str, Any]], path: Path) -> Path | None:
    """PNG of the mean raw and normalized reward per key (data_source/qa_type) against the step."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.info("matplotlib is not installed: no reward-curve figure")
        return None
    series: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        for name, value in row.items():
            if name.startswith("reward_norm/") and value is not None:
                series.setdefault(name.split("/", 1)[1], []).append((row["step"], value))
    if not series:
        return None
    figure, axis = plt.subplots(figsize=(7, 4))
    for key, points in sorted(series.items()):
        axis.plot(*zip(*points), label=key)
    axis.set_xlabel("step")
    axis.set_ylabel("mean normalized reward")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def per_key_means(rows: tuple[list[str], torch.Tensor, torch.Tensor]) -> dict[str, float]:
    """``reward_raw/<key>`` and ``reward_norm/<key>`` means of a step (NaN rewards left out); read when logged."""
    keys, raw_rewards, normalized = rows
    sums: dict[str, list[float]] = {}
    for key, raw, norm in zip(keys, raw_rewards.tolist(), normalized.tolist()):
        for name, value in ((f"reward_raw/{key}", raw), (f"reward_norm/{key}", norm)):
            if math.isfinite(value):
                sums.setdefault(name, []).append(value)
    return {name: sum(values) / len(values) for name, values in sums.items()}


# ---------------------------------------------------------------------------------- the run
@dataclass
class RunSummary:
    """What a run did: steps, skips, the final metrics row, and where its outputs are."""

    steps: int
    skipped_steps: int
    skipped_records: dict[str, int]
    last_metrics: dict[str, Any]
    output_dir: Path
    export_dir: Path | None


def train(config: TrainConfig) -> RunSummary:
    """Run SFT or MedGRPO as ``config`` says; resumable; exports the final model (HF format)."""
    from transformers import AutoTokenizer

    runtime = init_runtime(config.device)
    seed_everything(config.seed, runtime.rank)
    output = Path(config.output_dir)
    if runtime.is_main:
        output.mkdir(parents=True, exist_ok=True)
        (output / "config.json").write_text(json.dumps(config_to_dict(config), indent=2))
    tokenizer = AutoTokenizer.from_pretrained(config.model.path, local_files_only=True)
    model, reference = build_model(config, runtime)
    optimizer, scheduler, params = build_optimizer(model, config)
    loader, sampler = build_loader(config, runtime, tokenizer)
    rewarder = None
    if config.mode == "grpo":
        reward_fn, stats = build_rewards(config)
        rewarder = Rewarder(reward_fn, stats, None if stats is None else stats.tensor(runtime.device))
    generator = torch.Generator(device=runtime.device).manual_seed(config.seed * 7919 + runtime.rank)
    start_step = _maybe_resume(config, output, model, optimizer, scheduler, sampler, generator)
    log = MetricsLog(output, config.steps, runtime.is_main, start_step)
    rows: list[dict[str, Any]] = []
    skipped_steps, last = 0, {}
    stream = batches(loader, sampler)
    pixel_dtype = torch.bfloat16 if config.model.dtype == "bfloat16" else torch.float32
    for step in range(start_step, config.steps):
        batch = next(stream).to(runtime.device, pixel_dtype)
        if config.mode == "grpo":
            result = grpo_step(
                model, reference, batch, tokenizer, rewarder, optimizer, scheduler, params, config, generator
            )
        else:
            result = sft_step(model, batch, optimizer, scheduler, params, config)
        skipped_steps += not result.stepped
        result.metrics.update(
            lr=scheduler.get_last_lr()[0],
            skipped_steps=skipped_steps,
            skipped_records=loader.skipped_total,
            **_peak_memory(runtime.device),
        )
        if (step + 1) % max(config.log_every, 1) == 0 or step + 1 == config.steps:
            if result.reward_rows is not None:
                result.metrics.update(per_key_means(result.reward_rows))
            last = log.log(step + 1, result.metrics)
            rows.append(last)
        if config.eval_every and config.data.eval_file and (step + 1) % config.eval_every == 0:
            evaluation = evaluate_during_training(model, tokenizer, config, rewarder, runtime)
            rows.append(log.log(step + 1, evaluation))
        if config.save_every and (step + 1) % config.save_every == 0 and step + 1 < config.steps:
            _save(output, step + 1, model, optimizer, scheduler, sampler, generator, config.keep_checkpoints)
    log.close()
    _save(output, config.steps, model, optimizer, scheduler, sampler, generator, config.keep_checkpoints)
    export = ckpt.export_hf(model, tokenizer, output / "final")
    if runtime.is_main:
        plot_reward_curves(rows, output / "reward_curves.png")
    return RunSummary(config.steps - start_step, skipped_steps, dict(loader.skipped), last, output, export)


def evaluate_during_training(
    model, tokenizer, config: TrainConfig, rewarder: Rewarder | None, runtime: Runtime
) -> dict:
    """Greedy answers on ``data.eval_file`` (this rank's model), as ``eval/...`` metrics."""
    from medgrpo.train.evaluation import evaluate_policy

    if rewarder is None:  # SFT runs build the rewards for evaluation only
        rewarder = Rewarder(*build_rewards(config))
    reward_fn, stats = rewarder.fn, rewarder.stats
    with gathered(model):
        result = evaluate_policy(
            model,
            tokenizer,
            config.data.eval_file,
            reward_fn,
            stats,
            options=decode_options(config),
            max_new_tokens=config.grpo.max_new_tokens,
            device=runtime.device,
        )
    metrics = {
        "eval/reward_raw": result.reward_raw,
        "eval/reward_norm": result.reward_norm,
        "eval/missing": result.missing,
        "eval/count": result.count,
    }
    metrics.update({f"eval/reward_raw/{k}": v for k, v in result.per_key_raw.items()})
    metrics.update({f"eval/reward_norm/{k}": v for k, v in result.per_key_norm.items()})
    model.train()
    return metrics


def _peak_memory(device: torch.device) -> dict[str, float]:
    """Peak device memory (CUDA allocator), or the process's peak resident memory on the CPU."""
    if device.type == "cuda":
        return {"peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30}
    import resource

    return {"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}  # Linux: KiB


def _save(output: Path, step: int, model, optimizer, scheduler, sampler, generator, keep: int) -> None:
    extra = {"sampler": sampler.state_dict(), "generator": generator.get_state(), "step": step}
    ckpt.save_checkpoint(
        output / "checkpoints",
        step,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        extra_state=extra,
        keep=keep,
    )


def _maybe_resume(config: TrainConfig, output: Path, model, optimizer, scheduler, sampler, generator) -> int:
    if not config.resume:
        return 0
    latest = ckpt.latest_checkpoint(output / "checkpoints")
    if latest is None:
        logger.warning("--resume: no complete checkpoint under %s; starting from step 0", output / "checkpoints")
        return 0
    extra = ckpt.load_checkpoint(latest, model=model, optimizer=optimizer, scheduler=scheduler)
    sampler.load_state_dict(extra["sampler"])
    generator.set_state(extra["generator"])
    logger.info("resumed from %s (step %d)", latest, extra["step"])
    return int(extra["step"])


__all__ = ["RunSummary", "Runtime", "init_runtime", "train"]
