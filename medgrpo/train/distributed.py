"""The process runtime: torchrun's process group, ranks, seeding, and what FSDP2 needs around the model.

Every rank query of the package goes through :func:`rank`, :func:`world_size` and :func:`barrier`
(one process without a process group: rank 0 of 1, barriers are no-ops).
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn


def is_distributed() -> bool:
    """Whether a torch.distributed process group is up."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """The number of ranks (1 without a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def all_ranks(value: Any) -> list[Any]:
    """``value`` of every rank, in rank order (a collective under torch.distributed; ``[value]`` alone)."""
    if not is_distributed():
        return [value]
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def barrier() -> None:
    """Wait for every rank (nothing to wait for without a process group)."""
    if is_distributed():
        dist.barrier()


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
    ranks = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if ranks > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Runtime(torch.device("cuda", local_rank) if use_cuda else torch.device("cpu"), rank(), ranks)


def shutdown_runtime() -> None:
    """Leave the process group :func:`init_runtime` joined, every rank at once (nothing in one process).

    Ranks finish a run at slightly different times; one that exits while the group's communication
    threads are still alive is aborted at exit ("terminate called without an active exception").
    """
    if not dist.is_initialized():
        return
    dist.barrier()
    dist.destroy_process_group()


def seed_everything(seed: int, rank: int) -> None:
    """Python, NumPy and torch RNGs from ``seed`` (offset by rank: ranks sample differently)."""
    random.seed(seed + rank)
    np.random.seed(seed + rank)
    torch.manual_seed(seed + rank)


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` is an FSDP2 module (its forwards must go through the root)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


@torch.no_grad()
def warm_up(model: nn.Module) -> None:
    """One text-only root forward: FSDP2 initializes its state on the root's first forward, and the
    rollout later calls submodules directly (see :func:`gathered`)."""
    from medgrpo.train.model import final_hidden_states

    device = next(model.parameters()).device
    ids = torch.full((1, 2), int(model.config.get_text_config().eos_token_id or 0), dtype=torch.long, device=device)
    final_hidden_states(model, input_ids=ids, attention_mask=torch.ones_like(ids))
    # The root keeps its parameters gathered after a forward (for the backward that normally
    # follows); reshard now, so the optimizer is built over the sharded parameters.
    model.reshard()


def all_finished(finished: torch.Tensor, model: nn.Module) -> bool:
    """Whether every row of ``finished`` is True, on every rank when ``model`` is sharded (a host sync).

    A sharded model's decoder layers all-gather their weights in every forward, so the ranks of a
    rollout must run the same number of decoding steps: a rank whose rows have all ended keeps
    stepping (its rows padded) until every rank's have.
    """
    flag = finished.all()
    if is_sharded(model) and is_distributed():
        flag = flag.to(torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag)


@contextlib.contextmanager
def gathered(model: nn.Module) -> Iterator[None]:
    """Gather a sharded model's root parameters (embeddings, norm, lm head) for a no-grad rollout.

    The rollout calls the model's stages directly (:mod:`medgrpo.train.qwen`); the decoder blocks
    and the vision tower gather themselves in their own forward hooks. Unsharded models: nothing.
    """
    if not is_sharded(model):
        yield
        return
    model.unshard()
    try:
        yield
    finally:
        model.reshard()


def global_token_count(mask: torch.Tensor) -> torch.Tensor:
    """Tokens of ``mask`` over all ranks (a 0-d device tensor; all-reduced on the device, no host sync).

    Each rank's loss is its token sum over this count, and the sharded model sums gradients over
    ranks (``shard_model(gradient_divide_factor=1)``), so the update is the whole batch's token mean.
    """
    count = mask.sum().to(torch.float32)
    if is_distributed():
        dist.all_reduce(count)
    return count.clamp_min(1.0)


def min_over_ranks(value: int, device: torch.device) -> int:
    """The smallest of every rank's ``value`` (all-reduced on ``device``; ``value`` itself in one process).

    Every rank must call it at the same point; each gets the same answer, so all take the same branch
    after it (no rank raises, or skips a collective, while the others wait).
    """
    if not is_distributed():
        return value
    tensor = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return int(tensor.item())


__all__ = [
    "Runtime",
    "all_finished",
    "all_ranks",
    "barrier",
    "gathered",
    "global_token_count",
    "init_runtime",
    "is_distributed",
    "is_sharded",
    "min_over_ranks",
    "rank",
    "seed_everything",
    "shutdown_runtime",
    "warm_up",
    "world_size",
]
