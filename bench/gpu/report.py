"""Turn the GPU validation's validate.json into results: targets, a summary, a Markdown table, a plot.

    python bench/gpu/report.py validate.json [--results-dir bench/results] [--name NAME] [--readme bench/README.md]

writes ``<results-dir>/<name>.json`` (the device's results file, ``name`` the slugified GPU name
as bench/conftest.py names it, e.g. ``nvidia-h200``: the run is stored under its
``gpu_validation`` key, next to what ``pytest bench/`` merged there), ``<name>.md`` (the
targets of issue 11's Part B with the measured ratios and pass / fail) and ``<name>.png``.
With ``--readme`` the table also replaces the block between the README's
``<!-- gpu-validation:begin -->`` and ``<!-- gpu-validation:end -->`` markers. A dry run's JSON
is only written where ``--results-dir`` says (never into bench/results by default).

stages.py imports :func:`evaluate_targets` and :func:`summary_lines` (standard library only;
matplotlib is imported for the plot alone).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent.parent / "results"
BEGIN, END = "<!-- gpu-validation:begin -->", "<!-- gpu-validation:end -->"

# Issue 11, Part B.
HEAD_FLOOR_MAX = 1.25  # medgrpo time / bare-GEMM floor
HEAD_LIGER_MIN = 1.5  # Liger time / medgrpo time
ADVANTAGES_FLOOR_MAX = 2.0  # medgrpo per-call time / empty-kernel launch
POLICY_LOSS_BANDWIDTH_MIN = 0.8  # fraction of the measured copy bandwidth
# Issue 16: rollout decode of a 3B-shaped model (bench_decode.py).
DECODE_FLOOR_MAX = 2.0  # time per step / (weights + KV cache bytes over the copy bandwidth)
DECODE_HF_MIN = 3.0  # HF generate's time per step / medgrpo's
ADVANTAGE_COLUMNS = ("medgrpo", "empty_kernel", "reference", "trl")


# ------------------------------------------------------------------------------------ targets
def _result(data: dict, stage: str) -> dict:
    return (data.get("stages", {}).get(stage) or {}).get("result") or {}


def _groups(data: dict, stage: str) -> dict[str, dict]:
    return _result(data, stage).get("groups") or {}


def _verdict(values: list[float | None], ok) -> bool | None:
    """All measured and all within the target: True; any outside: False; otherwise (missing) None."""
    if any(v is not None and not ok(v) for v in values):
        return False
    return None if not values or any(v is None for v in values) else True


def _target(what: str, target: str, measured: dict[str, float | None], ok, fmt: str) -> dict[str, Any]:
    shown = ", ".join(f"{k}: {'n/a' if v is None else format(v, fmt)}" for k, v in measured.items()) or "not measured"
    return {
        "what": what,
        "target": target,
        "measured": shown,
        "values": measured,
        "passed": _verdict(list(measured.values()), ok),
    }


def evaluate_targets(data: dict) -> list[dict[str, Any]]:
    """Issue 11's Part B targets (plus the smoke run and the AOT gate) on what the run measured."""
    head = _groups(data, "bench_head")
    advantages = _groups(data, "bench_advantages")
    loss = _groups(data, "bench_policy_loss")
    launches = {k: (g.get("medgrpo_launches") or {}).get("kernels") for k, g in advantages.items()}
    tests = _result(data, "tests")
    counts = tests.get("counts", {})
    test_status = (data.get("stages", {}).get("tests") or {}).get("status")
    suite_ok = None
    if test_status is not None and test_status != "running":
        suite_ok = test_status == "ok" and tests.get("failures_total", 1) == 0 and counts.get("passed", 0) > 0
    decode = _result(data, "bench_decode")
    smoke = _result(data, "trainer").get("phases") or {}
    aot = data.get("stages", {}).get("aot") or {}
    return [
        _target(
            "fused head + loss, fwd+bwd, 7B head, bf16: time / bare-GEMM floor",
            f"<= {HEAD_FLOOR_MAX}x",
            {k: g.get("medgrpo_ratio_to_gemm_floor") for k, g in head.items()},
            lambda v: v <= HEAD_FLOOR_MAX,
            ".2f",
        ),
        _target(
            "fused head + loss: speed-up over Liger's LigerFusedLinearGRPOLoss",
            f">= {HEAD_LIGER_MIN}x",
            {k: g.get("medgrpo_speedup_over_liger") for k, g in head.items()},
            lambda v: v >= HEAD_LIGER_MIN,
            ".2f",
        ),
        _target(
            "fused head + loss: peak memory / Liger's",
            "<= 1.0",
            {k: g.get("medgrpo_memory_over_liger") for k, g in head.items()},
            lambda v: v <= 1.0,
            ".2f",
        ),
        _target(
            "group advantages + normalization: time per call / empty-kernel launch",
            f"<= {ADVANTAGES_FLOOR_MAX}x",
            {k: g.get("medgrpo_ratio_to_launch_floor") for k, g in advantages.items()},
            lambda v: v <= ADVANTAGES_FLOOR_MAX,
            ".2f",
        ),
        _target("group advantages + normalization: kernel launches per call", "1", launches, lambda v: v == 1, "d"),
        _target(
            "policy loss fwd+bwd, (B,T) = (512, 2048): fraction of copy bandwidth",
            f">= {POLICY_LOSS_BANDWIDTH_MIN:.0%}",
            {k: g.get("medgrpo_fraction_of_copy_bandwidth") for k, g in loss.items()},
            lambda v: v >= POLICY_LOSS_BANDWIDTH_MIN,
            ".0%",
        ),
        _target(
            "rollout decode, 3B-shaped, bf16, G 8, 256 tokens: time per step / weights + KV read floor",
            f"<= {DECODE_FLOOR_MAX}x",
            {"3B": decode.get("medgrpo_ratio_to_floor")} if decode else {},
            lambda v: v <= DECODE_FLOOR_MAX,
            ".2f",
        ),
        _target(
            "rollout decode, 3B-shaped: speed-up over HF generate",
            f">= {DECODE_HF_MIN}x",
            {"3B": decode.get("medgrpo_speedup_over_hf_generate")} if decode else {},
            lambda v: v >= DECODE_HF_MIN,
            ".2f",
        ),
        {
            "what": "whole GPU test suite, real Triton",
            "target": "green",
            "measured": ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) or "not run",
            "values": counts,
            "passed": suite_ok,
        },
        {
            "what": "trainer smoke run: SFT, MedGRPO, checkpoint, resume, export (bf16)",
            "target": "every phase ok",
            "measured": ", ".join(f"{k} {p.get('status')}" for k, p in smoke.items()) or "not run",
            "values": {k: p.get("status") for k, p in smoke.items()},
            "passed": None if not smoke else all(p.get("status") == "ok" for p in smoke.values()) and len(smoke) == 6,
        },
        {
            "what": "ahead-of-time Triton compile gate (bench/gpu/aot_compile.py)",
            "target": "exit 0",
            "measured": aot.get("status", "not run"),
            "values": {"status": aot.get("status")},
            "passed": {"ok": True, "failed": False, "timeout": False}.get(aot.get("status")),
        },
    ]


# ------------------------------------------------------------------------------------ summary
def _mark(passed: bool | None) -> str:
    return {True: "PASS", False: "FAIL", None: "----"}[passed]


def _ms(entry: dict | None) -> str:
    if not entry:
        return "-"
    return f"{entry['median_s'] * 1e3:.2f}" if "median_s" in entry else str(entry.get("status", "-"))


def _us(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e6:.1f}"


def _yes_no(flag: bool | None) -> str:
    return "-" if flag is None else ("yes" if flag else "no")


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _x(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}"


def _get(data: Any, *keys: str) -> Any:
    """``data[k1][k2]...``, None where a level is missing."""
    for key in keys:
        data = data.get(key) if isinstance(data, dict) else None
    return data


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    """Aligned columns, the first left-aligned (nothing when there are no rows)."""
    if not rows:
        return []
    widths = [max(len(str(row[i])) for row in [head, *rows]) for i in range(len(head))]
    return [
        "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
        for row in [head, *rows]
    ]


def header(data: dict) -> str:
    env = _result(data, "env")
    versions = env.get("versions", {})
    run = data.get("run", {})
    commit = (run.get("commit") or "unknown")[:12] + (" (dirty)" if run.get("dirty") else "")
    return (
        f"GPU validation ({data.get('mode')}) {data.get('started', '')} on {env.get('gpu', {}).get('name', '?')}: "
        f"python {env.get('python')}, torch {env.get('torch')}, triton {versions.get('triton')}, "
        f"transformers {versions.get('transformers')}; commit {commit}, tree {str(run.get('tree_sha256'))[:12]}"
    )


def summary_lines(data: dict) -> list[str]:
    """The short table printed last by validate.sh: stages, the numbers, the targets."""
    lines = ["", "=" * 100, header(data), f"{'stage':<18} {'status':<9} {'s':>6}  note"]
    for name, stage in data.get("stages", {}).items():
        note = stage.get("error") or ""
        if name == "wheels":
            note = note or ", ".join(_result(data, name).get("wheels", []))
        elif name == "env":
            env = _result(data, name)
            note = note or f"{env.get('gpu', {}).get('name')}, {env.get('cpu_cores')} cores"
        elif name == "build":
            note = f"extension loaded: {_result(data, name).get('extension_loaded')}"
        elif name == "aot" and _result(data, name).get("launches") is not None:
            aot = _result(data, name)
            note = f"{aot.get('failed')} of {aot.get('launches')} launches failed (aot.json)"
        elif name == "tests":
            note = ", ".join(f"{v} {k}" for k, v in sorted(_result(data, name).get("counts", {}).items()))
        lines.append(f"{name:<18} {stage.get('status', '?'):<9} {stage.get('seconds', 0):>6.0f}  {note[:70]}")
    ceilings = _result(data, "ceilings")
    if ceilings:
        lines.append(
            f"ceilings: copy {ceilings.get('copy_gb_per_s', 0):.0f} GB/s (read+write), "
            f"{ceilings.get('gemm', {}).get('dtype')} GEMM {ceilings.get('gemm_tflop_per_s', 0):.3g} TFLOP/s"
        )
    lines += _table(
        ["head fwd+bwd ms", "floor", "medgrpo", "liger", "trl", "x floor", "x liger", "MiB medgrpo/liger"],
        [
            [key, *(_ms(g["providers"].get(n)) for n in ("gemm_floor", "medgrpo", "liger", "trl_eager"))]
            + [_x(g.get("medgrpo_ratio_to_gemm_floor")), _x(g.get("medgrpo_speedup_over_liger"))]
            + ["/".join(_mib(_get(g, "providers", n, "peak_extra_mib")) for n in ("medgrpo", "liger"))]
            for key, g in _groups(data, "bench_head").items()
        ],
    )
    lines += _table(
        ["advantages us/call", "medgrpo", "empty kernel", "reference", "trl", "x floor", "launches"],
        [
            [key, *(_us(_get(g, "providers", n, "per_call", "median_s")) for n in ADVANTAGE_COLUMNS)]
            + [_x(g.get("medgrpo_ratio_to_launch_floor")), str(_get(g, "medgrpo_launches", "kernels") or "-")]
            for key, g in _groups(data, "bench_advantages").items()
        ],
    )
    lines += _table(
        ["policy loss us", "medgrpo", "floor", "copy", "reference", "trl", "of copy BW", "host hidden"],
        [
            [key, _us(_get(g, "providers", "medgrpo", "median_s")), _us(g.get("floor_s"))]
            + [_us(_get(g, "providers", n, "median_s")) for n in ("copy_floor", "reference", "trl")]
            + [f"{g.get('medgrpo_fraction_of_copy_bandwidth', 0):.0%}", _yes_no(g.get("medgrpo_host_hidden"))]
            for key, g in _groups(data, "bench_policy_loss").items()
        ],
    )
    decode = _result(data, "bench_decode")
    decode_providers = ("medgrpo", "floor", "reference_loop", "hf_generate")
    decode_ratios = (
        "medgrpo_ratio_to_floor",
        "medgrpo_speedup_over_reference_loop",
        "medgrpo_speedup_over_hf_generate",
    )
    lines += _table(
        ["decode ms/step", "medgrpo", "floor", "ref loop", "hf_generate", "x floor", "x ref", "x hf", "first call s"],
        [
            [f"{decode.get('parameters_b', 0) * 1e3:,.1f}M G={decode.get('group_size')} T={decode.get('new_tokens')}"]
            + [_x(_get(decode, "providers", name, "ms_per_step")) for name in decode_providers]
            + [_x(decode.get(key)) for key in decode_ratios]
            + [_x(_get(decode, "providers", "medgrpo", "first_call_s"))]
        ]
        if decode.get("providers")
        else [],
    )
    failures = _result(data, "tests").get("failures", [])
    for failure in failures[:8]:
        lines.append(f"  FAILED {failure['nodeid'][:90]}: {failure['message'][:120]}")
    if len(failures) > 8:
        lines.append(f"  ... {len(failures) - 8} more failures in validate.json")
    lines.append("targets (issue 11, Part B; decode: issue 16):")
    for t in data.get("targets") or evaluate_targets(data):
        lines.append(f"  [{_mark(t['passed'])}] {t['what']} {t['target']}: {t['measured'][:110]}")
    lines.append(f"wall {data.get('wall_s', '?')} s; the full record: validate.json, validate.log, junit.xml in $OUT")
    return lines


# ----------------------------------------------------------------------------------- outputs
def device_name(data: dict) -> str:
    return _result(data, "env").get("gpu", {}).get("slug") or "unknown-device"


def markdown(data: dict) -> str:
    """The README table: date, device, versions, and every target with its measured values and pass / fail."""
    env = _result(data, "env")
    run = data.get("run", {})
    lines = [
        f"**{env.get('gpu', {}).get('name', '?')}**, {str(data.get('started', ''))[:10]} ({data.get('mode')} run; "
        f"torch {env.get('torch')}, triton {env.get('versions', {}).get('triton')}, "
        f"commit {(run.get('commit') or 'unknown')[:12]}, tree {str(run.get('tree_sha256'))[:12]}):",
        "",
        "| what | target | measured | status |",
        "|---|---|---|---|",
    ]
    for t in data.get("targets") or evaluate_targets(data):
        lines.append(f"| {t['what']} | {t['target']} | {t['measured']} | {_mark(t['passed']).lower()} |")
    return "\n".join(lines) + "\n"


def plot(data: dict, path: Path) -> Path | None:
    """Four panels: head time / floor and peak memory per provider, advantages per call vs N, loss bandwidth."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    head = _groups(data, "bench_head")
    _bars(axes[0][0], head, lambda e: e.get("ratio_to_gemm_floor"), "head fwd+bwd: time / GEMM floor", HEAD_FLOOR_MAX)
    _bars(axes[0][1], head, lambda e: e.get("peak_extra_mib"), "head fwd+bwd: peak extra memory (MiB)")
    axis = axes[1][0]
    advantages = _groups(data, "bench_advantages")
    sizes = [g["n"] for g in advantages.values()]
    for provider in ADVANTAGE_COLUMNS:
        times = [_get(g, "providers", provider, "per_call", "median_s") for g in advantages.values()]
        if sizes and all(t is not None for t in times):
            axis.plot(sizes, [t * 1e6 for t in times], marker="o", label=provider, color=_color(provider))
    axis.set(xscale="log", yscale="log", xlabel="N rewards", ylabel="us per call", title="group advantages")
    if axis.get_lines():
        axis.legend(fontsize=8)
    _bars(
        axes[1][1],
        _groups(data, "bench_policy_loss"),
        lambda e: e.get("fraction_of_copy_bandwidth"),
        "policy loss fwd+bwd: fraction of copy bandwidth",
        POLICY_LOSS_BANDWIDTH_MIN,
    )
    fig.suptitle(header(data), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


COLORS = {"medgrpo": "C0", "gemm_floor": "C7", "copy_floor": "C7", "empty_kernel": "C7", "liger": "C1"}


def _color(provider: str) -> str:
    return COLORS.get(provider, {"trl": "C2", "trl_eager": "C2", "reference": "C3"}.get(provider, "C4"))


def _bars(axis, groups: dict[str, dict], value, title: str, target: float | None = None) -> None:
    """Grouped bars: one group per shape, one bar per provider; the target as a dashed line."""
    providers = sorted({p for g in groups.values() for p in g.get("providers", {})})
    width = 0.8 / max(len(providers), 1)
    for i, provider in enumerate(providers):
        heights = [value(g["providers"].get(provider, {})) or 0 for g in groups.values()]
        x = [k + i * width for k in range(len(groups))]
        axis.bar(x, heights, width, label=provider, color=_color(provider))
    if target is not None:
        axis.axhline(target, linestyle="--", color="black", linewidth=0.8, label=f"target {target:g}")
    axis.set_xticks([k + 0.4 - width / 2 for k in range(len(groups))], list(groups), fontsize=8)
    axis.set_title(title, fontsize=9)
    if providers:
        axis.legend(fontsize=7)


def stored_run(data: dict) -> dict:
    """What goes into the results file: the run without the logs' tails."""
    stages = {
        name: {k: v for k, v in stage.items() if k != "log_tail"} for name, stage in data.get("stages", {}).items()
    }
    return {k: v for k, v in data.items() if k != "stages"} | {"stages": stages}


def write_results(data: dict, results_dir: Path, name: str) -> Path:
    """Merge the run into ``<results_dir>/<name>.json`` under ``gpu_validation`` (other keys kept)."""
    path = results_dir / f"{name}.json"
    results: dict[str, Any] = {"device_name": name, "groups": {}}
    if path.exists():
        results = json.loads(path.read_text())
    results["gpu_validation"] = stored_run(data)
    results_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, sort_keys=True, default=str) + "\n")
    return path


def update_readme(readme: Path, table: str) -> bool:
    """Replace the block between the GPU-validation markers; False when the markers are absent."""
    text = readme.read_text()
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        return False
    readme.write_text(pattern.sub(lambda _: f"{BEGIN}\n{table}{END}", text))
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("validate_json", type=Path, help="validate.json as the device run returned it")
    parser.add_argument("--results-dir", type=Path, default=None, help="default bench/results (device runs only)")
    parser.add_argument("--name", default=None, help="results file stem (default: the slugified device name)")
    parser.add_argument("--readme", type=Path, default=None, help="a README with the gpu-validation markers")
    args = parser.parse_args(argv)
    data = json.loads(args.validate_json.read_text())
    data["targets"] = evaluate_targets(data)
    if args.results_dir is None and data.get("mode") != "device":
        print("report.py: a dry run's results go only where --results-dir says", file=sys.stderr)
        return 2
    results_dir = args.results_dir or RESULTS_DIR
    name = args.name or device_name(data)
    path = write_results(data, results_dir, name)
    table = markdown(data)
    (results_dir / f"{name}.md").write_text(table)
    image = plot(data, results_dir / f"{name}.png")
    if args.readme is not None and not update_readme(args.readme, table):
        print(f"report.py: no {BEGIN} ... {END} block in {args.readme}; table not inserted", file=sys.stderr)
    print(table)
    print(f"wrote {path}, {results_dir / f'{name}.md'}" + (f", {image}" if image else " (no matplotlib: no plot)"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
