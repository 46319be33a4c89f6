"""The real compiler accepts GSPO with a reference policy: the launch the interpreter let through broken.

_policy_loss_rows_kernel with SEQUENCE_IS=True, HAS_REF=True once bound '_' to a scalar before its
token loop and to a block inside it, which Triton's compiler rejects (the interpreter runs it as
Python and never noticed). This compiles that one launch for sm_90 through the AOT gate
(bench/gpu/aot_compile.py, the full guard that CI runs), in a subprocess since the gate needs
Triton's JIT rather than this process's interpreter. Skipped where triton has no ptxas.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

GATE = Path(__file__).resolve().parents[2] / "bench" / "gpu" / "aot_compile.py"
GSPO_WITH_REF = (
    r"^policy_loss: _policy_loss_rows_kernel\[HAS_OLD=True HAS_REF=True KL_ESTIMATOR=3 SEQUENCE_IS=True "
    r"BLOCK_T=1024\] warps=4 logp_ptr=\*fp32 old_ptr=\*fp32 ref_ptr=\*fp32"
)


def test_gspo_with_reference_compiles_for_sm90(tmp_path):
    report = tmp_path / "aot.json"
    gate = [sys.executable, str(GATE), "--jobs", "1", "--quiet", "--json", str(report), "--match", GSPO_WITH_REF]
    done = subprocess.run(gate, capture_output=True, text=True, timeout=600)
    if done.returncode == 2:
        pytest.skip(f"the AOT gate cannot run here: {done.stderr.strip().splitlines()[-1]}")
    assert done.returncode == 0, done.stdout + done.stderr
    launches = json.loads(report.read_text())["launches"]
    assert len(launches) == 1 and launches[0]["ok"] and launches[0]["spill_bytes"] == 0
    assert launches[0]["constexprs"]["SEQUENCE_IS"] is True and launches[0]["constexprs"]["HAS_REF"] is True
