"""What ``medgrpo demo`` says while it runs: a progress line with ETA per phase, and each phase's time.

Every phase that may take more than a few seconds (rollouts for ``fit-norm``, evaluations) draws a
progress bar with an ETA on stderr; the training runs draw their own (:class:`medgrpo.train.metrics.MetricsLog`).
:class:`PhaseClock` records each phase's wall-clock and CPU time (``time.process_time``: the CPU time
of this process, all its threads), which the demo prints and saves: on a busy machine wall time
grows with the load while CPU time stays near what the phase costs on an idle one.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TextIO

from medgrpo.train.metrics import progress_bar


class ProgressLine:
    """``label [#####.....] done/total eta Ns`` on one line of ``stream``, redrawn in place.

    Call it as ``line(done, total)`` (the signature of the ``progress`` callbacks of
    :mod:`medgrpo.train.evaluation`); the line ends when ``done`` reaches ``total``.
    """

    def __init__(self, label: str, stream: TextIO | None = None):
        self.label = label
        self.stream = stream or sys.stderr
        self.start = time.perf_counter()

    def __call__(self, done: int, total: int) -> None:
        elapsed = time.perf_counter() - self.start
        eta = elapsed / max(done, 1) * max(total - done, 0)
        self.stream.write(f"\r{self.label} {progress_bar(done, total)} eta {eta:4.0f}s ")
        if done >= total:
            self.stream.write("\n")
        self.stream.flush()


@dataclass
class PhaseClock:
    """Wall-clock and CPU seconds of each named phase (phases of the same name add up)."""

    wall: dict[str, float] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the block as phase ``name``."""
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.wall[name] = self.wall.get(name, 0.0) + time.perf_counter() - wall
            self.cpu[name] = self.cpu.get(name, 0.0) + time.process_time() - cpu

    def as_dict(self) -> dict[str, dict[str, float]]:
        """``{phase: {"wall_s": ..., "cpu_s": ...}}`` in the order the phases first ran."""
        return {name: {"wall_s": self.wall[name], "cpu_s": self.cpu[name]} for name in self.wall}


def announce(message: str, stream: TextIO | None = None) -> None:
    """One line about what the demo starts or finished."""
    stream = stream or sys.stderr
    stream.write(f"demo: {message}\n")
    stream.flush()


__all__ = ["PhaseClock", "ProgressLine", "announce"]
