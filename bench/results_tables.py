"""Markdown tables of a results file, for bench/README.md: one table per benchmark group.

    python bench/results_tables.py                                  # every group of this machine's file
    python bench/results_tables.py "^policy_loss" "^group_adv"      # groups whose name matches a regex
    python bench/results_tables.py --results bench/results/cpu-2cores.json "^rewards"

Per provider: median, mean, rounds, time / medgrpo (> 1: medgrpo is faster), the bench size
and ``other_cpu_cores`` (the cores other processes kept busy while it was timed: above ~0.1
the timing was taken on a contended machine). A group with a bandwidth floor also gets
medgrpo's and the copy's GB/s.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any


def seconds(value: float) -> str:
    """A duration with its natural unit: 27.9 µs, 3.46 ms, 5.02 s."""
    for scale, unit in ((1.0, "s"), (1e-3, "ms"), (1e-6, "µs")):
        if value >= scale:
            return f"{value / scale:.3g} {unit}"
    return f"{value / 1e-9:.3g} ns"


def group_table(name: str, group: dict[str, Any]) -> str:
    """One group as a markdown table (medgrpo first, then the providers by median)."""
    providers = group["providers"]
    ours = providers.get("medgrpo")
    order = sorted(providers, key=lambda p: (p != "medgrpo", providers[p]["median_s"]))
    lines = [
        f"**{name}**",
        "",
        "| provider | median | mean | rounds | time / medgrpo | size | other cores busy |",
        "|---|---:|---:|---:|---:|---|---:|",
    ]
    for provider in order:
        p = providers[provider]
        label = f"{provider} ({p['backend']})" if p.get("backend") and len(providers) > 1 else provider
        ratio = f"{p['median_s'] / ours['median_s']:.2f}×" if ours else "-"
        busy = "-" if p.get("other_cpu_cores") is None else f"{p['other_cpu_cores']:.2f}"
        cells = [label, seconds(p["median_s"]), seconds(p["mean_s"]), str(p["rounds"]), ratio, p.get("bench_size", "-")]
        lines.append("| " + " | ".join([*cells, busy]) + " |")
    if group.get("medgrpo_gb_per_s") is not None:
        lines += [
            "",
            f"medgrpo {group['medgrpo_gb_per_s']:.1f} GB/s vs copy {group['copy_gb_per_s']:.1f} GB/s: "
            f"{100 * group['medgrpo_fraction_of_copy_bandwidth']:.1f}% of copy bandwidth.",
        ]
    return "\n".join(lines)


def tables(results: dict[str, Any], patterns: list[str]) -> str:
    """Every group whose name matches one of ``patterns`` (all groups without any), in name order."""
    names = sorted(results["groups"])
    if patterns:
        names = [n for n in names if any(re.search(p, n) for p in patterns)]
    return "\n\n".join(group_table(n, results["groups"][n]) for n in names)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("patterns", nargs="*", help="regular expressions selecting groups (default: all)")
    parser.add_argument("--results", help="a results file (default: this machine's, bench/results/<device_name>.json)")
    args = parser.parse_args(argv)
    if args.results:
        path = Path(args.results)
    else:  # bench/conftest.py names this machine's file (imported only here: it loads torch and medgrpo)
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from conftest import RESULTS_DIR, device_name

        path = RESULTS_DIR / f"{device_name()}.json"
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        print(f"results_tables: cannot read {path}: {error}", file=sys.stderr)
        return 2
    print(tables(results, args.patterns))
    return 0


if __name__ == "__main__":
    sys.exit(main())
