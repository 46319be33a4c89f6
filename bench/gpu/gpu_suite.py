"""pytest plugin of the GPU validation's test stage (``-p gpu_suite``, with bench/gpu on PYTHONPATH).

Two jobs, both driven by environment variables that the stage sets (xdist workers inherit them):

* MEDGRPO_GPU_SUITE_PATHS (``:``-separated, relative to the rootdir): keep the tests under these
  paths and every test marked ``gpu`` elsewhere; deselect the rest. The stage passes these paths
  plus the files holding ``gpu``-marked tests, so the suite is "tests/ops, tests/nn, the patchify
  tests, and every gpu test".
* MEDGRPO_GPU_SUITE_LOG: append one JSON line per test outcome as it happens, from the
  controlling process only. Unlike JUnit XML, written at the end of the session, this survives
  the stage being stopped at its timeout.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest


def _suite_paths(config: pytest.Config) -> list[Path]:
    raw = os.environ.get("MEDGRPO_GPU_SUITE_PATHS", "")
    return [(config.rootpath / part).resolve() for part in raw.split(":") if part]


def _inside(path: Path, roots: list[Path]) -> bool:
    return any(path == root or root in path.parents for root in roots)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    roots = _suite_paths(config)
    if not roots:
        return
    kept, dropped = [], []
    for item in items:
        in_suite = _inside(Path(item.path).resolve(), roots) or item.get_closest_marker("gpu") is not None
        (kept if in_suite else dropped).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


def _is_worker() -> bool:
    """Whether this is an xdist worker (the controller receives and logs every worker's reports)."""
    return "PYTEST_XDIST_WORKER" in os.environ


def _message(report: pytest.TestReport | pytest.CollectReport) -> str:
    if report.skipped and isinstance(report.longrepr, tuple):
        return str(report.longrepr[2])
    crash = getattr(report.longrepr, "reprcrash", None)
    return str(crash.message if crash is not None else report.longrepr or "")[:600]


def _log(line: dict) -> None:
    path = os.environ.get("MEDGRPO_GPU_SUITE_LOG")
    if path and not _is_worker():
        with open(path, "a") as log:
            log.write(json.dumps(line) + "\n")


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """One line per test: its call's outcome, or the setup / teardown that failed or skipped it."""
    if report.when != "call" and report.passed:
        return
    outcome = "error" if report.failed and report.when != "call" else report.outcome
    line = {"nodeid": report.nodeid, "when": report.when, "outcome": outcome, "seconds": round(report.duration, 3)}
    if not report.passed:
        line["message"] = _message(report)
    _log(line)


def pytest_collectreport(report: pytest.CollectReport) -> None:
    """Modules that failed to import (errors) or skipped themselves (importorskip) as a whole."""
    if not report.passed:
        outcome = "collect_error" if report.failed else "skipped"
        _log({"nodeid": report.nodeid, "when": "collect", "outcome": outcome, "message": _message(report)})
