"""The ``medgrpo`` command line: one subcommand per task, each module imported only when it runs.

    medgrpo eval --predictions results.json --output metrics.json
    medgrpo fit-norm rollouts.jsonl --output norm_stats.json
    python -m medgrpo <command> ...

:data:`COMMANDS` maps a command name to ``("module:function", help)``. The function
registers the command on the top-level parser's ``subparsers`` and gives it a ``func``
default, ``func(args) -> exit status``::

    def register(subparsers) -> argparse.ArgumentParser:
        parser = subparsers.add_parser("train", help=..., description=...)
        parser.add_argument(...)
        parser.set_defaults(func=run)
        return parser

``medgrpo --help`` lists the commands from their help strings alone; only the command
being run has its module imported, so the listing does not load transformers, openai or
matplotlib, and adding a command (``train``, ``demo``) is one entry here.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from typing import Any, Optional

COMMANDS: dict[str, tuple[str, str]] = {
    "eval": (
        "medgrpo.rewards.evaluate:build_parser",
        "MedVidBench metrics of a predictions file (the paper's table, official numbers)",
    ),
    "fit-norm": (
        "medgrpo.rewards.norm_stats:register",
        "per-(data_source, qa_type) reward quartiles from rollouts of the SFT model",
    ),
    "train": ("medgrpo.train.cli:register", "SFT or MedGRPO on Qwen2.5-VL (one process or torchrun)"),
    "demo": ("medgrpo.demo.pipeline:register", "SFT vs plain GRPO vs MedGRPO on a synthetic task mixture, CPU"),
}


def load_registration(target: str) -> Callable[[Any], argparse.ArgumentParser]:
    """The registration function named by ``"module:function"`` (imports the module)."""
    module_name, _, function = target.partition(":")
    return getattr(importlib.import_module(module_name), function)


def _selected(argv: Sequence[str]) -> Optional[str]:
    # The top-level parser has only option flags without values, so the command is the
    # first argument that does not start with "-".
    return next((arg for arg in argv if not arg.startswith("-")), None)


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The ``medgrpo`` parser; only the command named in ``argv`` (if any) is fully registered."""
    from medgrpo import __version__

    parser = argparse.ArgumentParser(prog="medgrpo", description="MedGRPO: multi-task RL for medical video VLMs.")
    parser.add_argument("--version", action="version", version=f"medgrpo {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    selected = _selected(argv)
    for name, (target, help_text) in COMMANDS.items():
        if name == selected:
            load_registration(target)(subparsers)
        else:
            subparsers.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``medgrpo <command>``; returns its exit status (2 for usage errors)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
