"""What ``medgrpo demo`` shows: the held-out table, what it found, two figures, the JSON result and where
everything is.

* ``demo_arms.png``: per key, SFT / plain GRPO / MedGRPO side by side as bars (raw reward on top,
  normalized below), the constant-answer baseline as a black line over each group; with several
  seeds the bars are means and the whiskers the spread (std over seeds).
* ``demo_curves.png``: per key, the held-out (val) raw reward of both RL arms at each evaluation
  during training (dots) and smoothed (lines), from the SFT model's value at step 0.
* ``demo_result.json``: the settings, the machine, every seed's numbers, curves, phase timings and
  paths, the summary over seeds and the findings.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medgrpo.rewards.evaluate import write_summary

ARM_LABELS = {"constant": "constant", "sft": "SFT", "grpo": "GRPO", "medgrpo": "MedGRPO"}
ARM_COLORS = {"sft": "0.6", "grpo": "tab:orange", "medgrpo": "tab:blue"}
ALL_KEYS = "all keys"
SMOOTHING = 0.6  # exponential moving average weight of the previous smoothed value (TensorBoard's 0.6)
RAW_VS_NORM = (
    "raw = the task's own reward on [0, 1] (accuracy, IoU, sentence similarity); norm = sigmoid(3 (raw - p50) / IQR) "
    "with that key's quartiles over sampled SFT answers, so 0.5 is what SFT typically scores on every key."
)


def _spread(values: Sequence[float]) -> tuple[float, float]:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return float("nan"), float("nan")
    return statistics.fmean(finite), statistics.stdev(finite) if len(finite) > 1 else 0.0


def summarize_seeds(runs: Sequence[Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """``{arm: {key: {"count", "reward_raw": [mean, std], "reward_norm": [...], "official": {metric: [...]}}}}``
    over the seeds; the key :data:`ALL_KEYS` holds the mean over keys."""
    summary: dict[str, dict[str, dict[str, Any]]] = {}
    for arm in runs[0].scores:
        keys = list(runs[0].scores[arm].per_key)
        rows = {}
        for key in keys:
            scores = [run.scores[arm].per_key[key] for run in runs]
            metrics = list(scores[0].official)
            rows[key] = {
                "count": scores[0].count,
                "reward_raw": _spread([s.reward_raw for s in scores]),
                "reward_norm": _spread([s.reward_norm for s in scores]),
                "official": {m: _spread([s.official[m] for s in scores]) for m in metrics},
            }
        rows[ALL_KEYS] = {
            "count": sum(rows[k]["count"] for k in keys),
            "reward_raw": _spread([run.scores[arm].reward_raw for run in runs]),
            "reward_norm": _spread([run.scores[arm].reward_norm for run in runs]),
            "official": {},
        }
        summary[arm] = rows
    return summary


def mean_curves(runs: Sequence[Any]) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """Per arm and key, the curve's mean over the seeds at each step every seed evaluated; plus the mean over keys."""
    curves: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for arm in runs[0].curves:
        curves[arm] = {}
        for key in runs[0].curves[arm]:
            per_seed = [dict(run.curves[arm].get(key, [])) for run in runs]
            steps = sorted(set.intersection(*(set(points) for points in per_seed)))
            curves[arm][key] = [(step, statistics.fmean(points[step] for points in per_seed)) for step in steps]
        keys = list(curves[arm])
        steps = sorted(set.intersection(*(set(dict(curves[arm][k])) for k in keys))) if keys else []
        curves[arm][ALL_KEYS] = [(s, statistics.fmean(dict(curves[arm][k])[s] for k in keys)) for s in steps]
    return curves


def mean_advantages(runs: Sequence[Any]) -> dict[str, dict[str, float]]:
    """Per key, the mean over seeds of :func:`medgrpo.demo.advantages.advantage_weights`' numbers."""
    keys = runs[0].advantages
    return {
        key: {name: statistics.fmean(run.advantages[key][name] for run in runs) for name in keys[key]} for key in keys
    }


def format_advantages(advantages: dict[str, dict[str, float]], scale: str) -> str:
    """The arms' advantage weights per key on the SFT samples, as text."""
    width = max(len(k) for k in advantages) + 1
    lines = [
        "",
        f"how each arm weighs each key: group advantages (scale={scale}) of the same sampled SFT answers",
        f"{'key':{width}s} {'GRPO mean|A|':>13s} {'MedGRPO mean|A|':>16s} {'correlation':>12s}",
    ]
    for key, row in advantages.items():
        lines.append(
            f"{key:{width}s} {row['grpo_mean_abs']:13.3f} {row['medgrpo_mean_abs']:16.3f} {row['correlation']:12.3f}"
        )
    return "\n".join(lines)


def advantage_finding(advantages: dict[str, dict[str, float]], scale: str) -> str:
    """How alike the two arms' advantages are on the same SFT samples, in one sentence."""
    correlations = [row["correlation"] for row in advantages.values() if math.isfinite(row["correlation"])]
    ratios = [row["medgrpo_mean_abs"] / row["grpo_mean_abs"] for row in advantages.values() if row["grpo_mean_abs"] > 0]
    if not correlations or not ratios:
        return "The arms' advantages on the SFT samples could not be compared (no group with signal)."
    why = (
        "per-group std scaling cancels each key's reward scale, so only the sigmoid's curvature separates the arms; "
        "--scale batch or none lets each key's scale through"
        if scale == "group"
        else "each key's reward scale reaches the advantages"
    )
    return (
        f"On the same sampled SFT answers the two arms' advantages correlate at {min(correlations):.2f}-"
        f"{max(correlations):.2f} per key, and MedGRPO weighs each key {min(ratios):.2f}-{max(ratios):.2f}x as much "
        f"as plain GRPO (mean |advantage|; scale={scale}: {why})."
    )


def findings(summary: dict[str, dict[str, dict[str, Any]]], seeds: int) -> list[str]:
    """What the numbers say, in sentences: MedGRPO and plain GRPO against SFT, and the two arms on the
    keys where SFT scores lowest (the paper's pattern), whatever the outcome."""
    keys = [k for k in summary["sft"] if k != ALL_KEYS]

    def raw(arm: str, key: str) -> float:
        return summary[arm][key]["reward_raw"][0]

    def against(arm: str, base: str) -> str:
        higher = [k for k in keys if raw(arm, k) > raw(base, k)]
        equal = [k for k in keys if raw(arm, k) == raw(base, k)]
        lower = [k for k in keys if raw(arm, k) < raw(base, k)]
        norm = summary[arm][ALL_KEYS]["reward_norm"][0], summary[base][ALL_KEYS]["reward_norm"][0]
        return (
            f"{ARM_LABELS[arm]} vs {ARM_LABELS[base]}: held-out raw reward higher on {len(higher)} of {len(keys)} keys"
            + (f" ({', '.join(higher)})" if higher else "")
            + (f", equal on {len(equal)}" if equal else "")
            + f", lower on {len(lower)}"
            + (f" ({', '.join(lower)})" if lower else "")
            + f"; normalized reward over keys {norm[1]:.3f} -> {norm[0]:.3f}."
        )

    low = sorted(keys, key=lambda k: raw("sft", k))[: max(1, len(keys) // 2)]
    low_text = ", ".join(
        f"{k} {raw('sft', k):.3f} -> GRPO {raw('grpo', k):.3f}, MedGRPO {raw('medgrpo', k):.3f}" for k in low
    )
    medgrpo_holds = sum(raw("medgrpo", k) >= raw("sft", k) for k in keys) > len(keys) / 2
    low_holds = all(raw("grpo", k) < raw("medgrpo", k) for k in low)
    verdict = "shows" if medgrpo_holds and low_holds else "does not show"
    reasons = []
    if not medgrpo_holds:
        reasons.append("MedGRPO is not >= SFT on most keys")
    if not low_holds:
        reasons.append("plain GRPO is not below MedGRPO on every low-reward key")
    noise = (
        f"; spreads over the {seeds} seeds are in the table: differences within them are noise"
        if seeds > 1
        else "; one seed: rerun with --seeds 3 to see which differences exceed the seed-to-seed spread"
    )
    return [
        against("medgrpo", "sft"),
        against("grpo", "sft"),
        f"Keys where SFT scores lowest: {low_text}.",
        f"This run {verdict} the paper's pattern (MedGRPO >= SFT on most keys, plain GRPO below MedGRPO on the "
        f"low-reward keys)" + (f": {'; '.join(reasons)}" if reasons else "") + noise + ".",
    ]


def build_result(settings: Any, host: dict[str, Any], runs: Sequence[Any]) -> dict[str, Any]:
    """The JSON result of the demo (module docstring) from its settings, machine and seed runs."""
    summary, advantages = summarize_seeds(runs), mean_advantages(runs)
    return {
        "settings": dataclasses.asdict(settings),
        "machine": host,
        "seeds": {
            str(run.seed): {
                "scores": {arm: scores.as_dict() for arm, scores in run.scores.items()},
                "curves": run.curves,
                "advantages": run.advantages,
                "timings": run.timings,
                "paths": run.paths,
            }
            for run in runs
        },
        "summary": summary,
        "curves": mean_curves(runs),
        "advantages": advantages,
        "findings": [*findings(summary, len(runs)), advantage_finding(advantages, settings.scale)],
    }


def _cell(value: Sequence[float] | None, seeds: int) -> str:
    if value is None or value[0] is None or not math.isfinite(value[0]):
        return "-"
    return f"{value[0]:.3f}" if seeds == 1 else f"{value[0]:.2f}+-{value[1]:.2f}"


def format_tables(summary: dict[str, dict[str, dict[str, Any]]], seeds: int) -> str:
    """The held-out rewards per key (raw and normalized), then the official metrics per key, as text."""
    arms = ["constant", "sft", "grpo", "medgrpo"]
    keys = list(summary["sft"])
    width = 9 if seeds == 1 else 11
    key_width = max(len(k) for k in keys) + 1
    head = f"{'key':{key_width}s} {'n':>4s} |" + "".join(f"{ARM_LABELS[a]:>{width}s}" for a in arms)
    lines = ["", "held-out reward, raw" + " " * (len(head) - 20) + "| normalized", head + " |" + head.split("|", 1)[1]]
    for key in keys:
        row = f"{key:{key_width}s} {summary['sft'][key]['count']:4d} |"
        for name in ("reward_raw", "reward_norm"):
            row += "".join(f"{_cell(summary[a][key][name], seeds):>{width}s}" for a in arms) + " |"
        lines.append(row.rstrip(" |"))
    lines += [RAW_VS_NORM, "", "official metrics (medgrpo eval; vs_llm needs the LLM judge: -)"]
    lines.append(f"{'key':{key_width}s} {'metric':>12s} |" + "".join(f"{ARM_LABELS[a]:>{width}s}" for a in arms))
    for key in keys[:-1] if keys[-1] == ALL_KEYS else keys:
        for metric in summary["sft"][key]["official"]:
            cells = "".join(f"{_cell(summary[a][key]['official'][metric], seeds):>{width}s}" for a in arms)
            lines.append(f"{key:{key_width}s} {metric:>12s} |{cells}")
    return "\n".join(lines)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_arms(summary: dict[str, dict[str, dict[str, Any]]], path: Path, title: str) -> Path:
    """Bars per key of SFT / GRPO / MedGRPO (raw on top, normalized below), the constant baseline as a line."""
    plt = _pyplot()
    keys = list(summary["sft"])
    figure, axes = plt.subplots(2, 1, figsize=(max(8.0, 1.6 * len(keys)), 7.5), sharex=True)
    width = 0.26
    for axis, name, label in zip(axes, ("reward_raw", "reward_norm"), ("raw reward", "normalized reward")):
        for i, arm in enumerate(("sft", "grpo", "medgrpo")):
            means = [summary[arm][k][name][0] for k in keys]
            spreads = [summary[arm][k][name][1] for k in keys]
            xs = [j + (i - 1) * width for j in range(len(keys))]
            errors = spreads if any(spread > 0 for spread in spreads) else None  # one seed: no whiskers
            axis.bar(xs, means, width, yerr=errors, capsize=3, color=ARM_COLORS[arm], label=ARM_LABELS[arm])
        for j, key in enumerate(keys):
            base = summary["constant"][key][name][0]
            axis.hlines(base, j - 1.5 * width, j + 1.5 * width, colors="black", linewidth=2.0)
        axis.plot([], [], color="black", linewidth=2.0, label="constant answer")
        axis.set_ylim(0, 1.05)
        axis.set_ylabel(f"held-out {label}")
        axis.grid(axis="y", alpha=0.3)
    axes[1].axhline(0.5, color="0.3", linestyle=":", linewidth=1)
    axes[0].legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=9)
    axes[1].set_xticks(range(len(keys)), [k.replace("/", "\n") for k in keys], fontsize=8)
    axes[0].set_title(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def smooth(values: Sequence[float], weight: float = SMOOTHING) -> list[float]:
    """Exponential moving average: each point ``weight`` x the previous smoothed value + the rest of its own."""
    out: list[float] = []
    for value in values:
        out.append(value if not out else weight * out[-1] + (1 - weight) * value)
    return out


def _pad_limits(axis, span: float = 0.2) -> None:
    """Y limits at least ``span`` wide inside [0, 1], so that noise of a few hundredths does not fill the panel."""
    low, high = axis.get_ylim()
    if high - low < span:
        middle = (low + high) / 2
        low, high = middle - span / 2, middle + span / 2
    shift = max(0.0, -low) - max(0.0, high - 1.05)
    axis.set_ylim(max(low + shift, 0.0), min(high + shift, 1.05))


def plot_curves(curves: dict[str, dict[str, list[tuple[int, float]]]], path: Path, title: str) -> Path:
    """One panel per key (and the mean over keys): held-out raw reward of both RL arms against the RL step."""
    plt = _pyplot()
    keys = list(curves["grpo"])
    columns = 3
    rows = math.ceil(len(keys) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.0 * rows), squeeze=False)
    for axis, key in zip(axes.flat, keys):
        start = curves.get("sft", {}).get(key, [])
        for arm in ("grpo", "medgrpo"):
            points = start[:1] + curves[arm].get(key, [])
            if not points:
                continue
            steps, values = zip(*points)
            axis.plot(steps, values, "o", color=ARM_COLORS[arm], alpha=0.3, markersize=3)
            axis.plot(steps, smooth(values), color=ARM_COLORS[arm], linewidth=2, label=ARM_LABELS[arm])
        if start:
            axis.axhline(start[0][1], color=ARM_COLORS["sft"], linestyle="--", linewidth=1, label="SFT")
        _pad_limits(axis)
        axis.set_title(key, fontsize=9)
        axis.set_xlabel("RL step", fontsize=8)
        axis.grid(alpha=0.3)
    for axis in list(axes.flat)[len(keys) :]:
        axis.axis("off")
    axes.flat[0].set_ylabel("held-out raw reward")
    entries = {label: handle for axis in axes.flat for handle, label in zip(*axis.get_legend_handles_labels())}
    handles, labels = list(entries.values()), list(entries)
    figure.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=9, frameon=False)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout(rect=(0, 0.05, 1, 1))  # the legend in its own strip below the panels, never over data
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def publish(result: dict[str, Any], out_dir: Path) -> dict[str, str]:
    """Print the tables and findings, draw the figures, write the JSON; print and return the paths."""
    seeds = len(result["seeds"])
    summary = result["summary"]
    host = result["machine"]
    what = f"seed {next(iter(result['seeds']))}" if seeds == 1 else f"mean +- std over {seeds} seeds"
    title = f"Held-out (val+test) rewards per key, {what}"
    print(f"\n{title}" + format_tables(summary, seeds))
    print(format_advantages(result["advantages"], result["settings"]["scale"]))
    print("\nFindings:")
    for line in result["findings"]:
        print(f"- {line}")
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "bars figure": str(plot_arms(summary, out_dir / "demo_arms.png", title)),
        "curves figure": str(
            plot_curves(
                result["curves"],
                out_dir / "demo_curves.png",
                f"Held-out (val) raw reward during RL, {what}; dots: evaluations, lines: smoothed (EMA {SMOOTHING})",
            )
        ),
        "result JSON": str(out_dir / "demo_result.json"),
    }
    result["paths"] = paths
    write_summary(result, out_dir / "demo_result.json")
    timings = [run["timings"] for run in result["seeds"].values()]
    phases = {name: [t[name] for t in timings] for name in timings[0]}
    print(
        f"\nTime: {result['seconds']:.0f} s wall, {result['cpu_seconds']:.0f} s CPU on {host['cores']} cores "
        f"({host['cpu']}), torch threads {host['torch_threads']}, load average at start {host['load_average_1min']}"
    )
    print(
        "  per phase (wall / CPU s, summed over seeds): "
        + ", ".join(
            f"{name} {sum(t['wall_s'] for t in ts):.0f}/{sum(t['cpu_s'] for t in ts):.0f}"
            for name, ts in phases.items()
        )
    )
    print("\nOutputs:")
    for name, path in paths.items():
        print(f"  {name:22s} {path}")
    for seed, run in result["seeds"].items():
        for name, path in run["paths"].items():
            print(f"  seed {seed} {name:20s} {path}")
    return paths


__all__ = ["ALL_KEYS", "build_result", "findings", "format_tables", "plot_arms", "plot_curves", "publish", "smooth"]
