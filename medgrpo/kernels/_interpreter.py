"""Whether Triton kernels run under its CPU interpreter (TRITON_INTERPRET=1, read at import).

The interpreter truncates fp32 -> bf16 where a GPU rounds to nearest even. Launchers that
store bf16 results therefore store fp32 under the interpreter and let torch round, so
CPU tests see the kernel's math, not the interpreter's cast.
"""

from __future__ import annotations

import os

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
