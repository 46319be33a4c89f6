"""``medgrpo train --config run.yaml [section.field=value ...]`` (``torchrun ... -m medgrpo train`` on N GPUs)."""

from __future__ import annotations

import argparse
import logging

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
    """Load the config, train, print where the outputs are; 2 on a bad config."""
    from medgrpo.train.loop import train

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    overrides = list(args.overrides) + (["resume=true"] if args.resume else [])
    try:
        config = load_config(args.config, overrides)
    except (ConfigError, OSError) as error:
        print(f"medgrpo train: {error}")
        return 2
    summary = train(config)
    print(
        f"medgrpo train: {summary.steps} steps ({summary.skipped_steps} skipped, records skipped by kind: "
        f"{summary.skipped_records or 'none'}); outputs in {summary.output_dir}, model in {summary.export_dir}"
    )
    return 0
