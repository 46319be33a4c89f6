"""Multi-process tests on one CPU machine: N processes joined in a gloo group, or ``torchrun``.

``run_gloo(worker, *args)`` runs ``worker(rank, *args)`` in every process of a fresh gloo group and
returns what each returned, by rank. The worker must be a module-level function (processes are
spawned, so it is pickled by name) and its return value picklable.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch.distributed as dist
import torch.multiprocessing as mp

GLOO = dist.is_available() and dist.is_gloo_available()


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _gloo_process(rank: int, world_size: int, port: int, worker: Callable, args: tuple, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        results[rank] = worker(rank, *args)
        dist.barrier()  # no rank tears gloo down while another still talks to it
    finally:
        dist.destroy_process_group()


def run_gloo(worker: Callable[..., Any], *args: Any, world_size: int = 2, timeout: float | None = None) -> list[Any]:
    """``worker(rank, *args)`` on ``world_size`` processes joined in a gloo group; the results by rank.

    Raises:
        TimeoutError: the processes still ran after ``timeout`` seconds (a rank stuck in a collective);
            they are killed first. None: wait for as long as they run.
    """
    results = mp.Manager().dict()
    context = mp.start_processes(
        _gloo_process, args=(world_size, free_port(), worker, args, results), nprocs=world_size, join=False
    )
    deadline = None if timeout is None else time.monotonic() + timeout
    while not context.join(timeout=5):
        if deadline is not None and time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            raise TimeoutError(f"{world_size} gloo processes still running after {timeout} s")
    return [results[rank] for rank in range(world_size)]


def torchrun(arguments: Sequence[str], *, nproc: int = 2, timeout: float = 400) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node nproc <arguments>`` on the CPU (one thread per process), captured."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)]
    command += ["--master_addr", "127.0.0.1", "--master_port", str(free_port()), *arguments]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)


__all__ = ["GLOO", "free_port", "run_gloo", "torchrun"]
