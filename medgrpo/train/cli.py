"""``medgrpo train --config run.yaml [section.field=value ...]`` (``torchrun ... -m medgrpo train`` on N GPUs)."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from medgrpo.train.config import ConfigError, describe_fields, load_config


def register(subparsers) -> argparse.ArgumentParser:
    """Add ``train`` to the ``medgrpo`` command line."""
    parser = subparsers.add_parser(
        "train",
        help="SFT or MedGRPO on Qwen2.5-VL",
        description="SFT or MedGRPO on Qwen2.5-VL, one process or torchrun on N GPUs "
        "(torchrun --nproc_per_node N -m medgrpo train --config run.yaml).",
        epilog=describe_fields(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="YAML config (see configs/); defaults when omitted")
    parser.add_argument("--resume", action="store_true", help="continue from the run's latest complete checkpoint")
    parser.add_argument(
        "overrides", nargs="*", help="dotted overrides, e.g. grpo.rollout.group_size=8 optim.lr=1e-6 (fields below)"
    )
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Load and check the config, train, print where the outputs are.

    A user mistake (a config that does not load, or that :func:`~medgrpo.train.validate.validate`
    refuses, a records file without one usable record) is printed as one line per problem, before the
    model is loaded or the output directory touched, and the status is 2; so is a resume where no
    checkpoint verifies.
    """
    from medgrpo.train.checkpoint import CheckpointError
    from medgrpo.train.data import NoUsableRecords
    from medgrpo.train.distributed import shutdown_runtime
    from medgrpo.train.loop import train

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    overrides = list(args.overrides) + (["resume=true"] if args.resume else [])
    try:
        summary = train(load_config(args.config, overrides))
    except ConfigError as error:
        problems = error.problems
    except (NoUsableRecords, CheckpointError) as error:  # every rank raises them together
        problems = [str(error)]
    else:
        problems = None
    shutdown_runtime()
    if problems is not None:
        return _refuse(problems)
    print(
        f"medgrpo train: {summary.steps} steps run (skipped steps in the run: {summary.skipped_steps}; records "
        f"skipped by kind: {summary.skipped_records or 'none'}); outputs in {summary.output_dir}, "
        f"model in {summary.export_dir}"
    )
    return 0


def _refuse(problems: list[str]) -> int:
    """Print each problem on one line (on the first rank only under torchrun); the exit status 2."""
    if int(os.environ.get("RANK", "0")) == 0:
        for problem in problems:
            print(f"medgrpo train: {problem}", file=sys.stderr)
    return 2
