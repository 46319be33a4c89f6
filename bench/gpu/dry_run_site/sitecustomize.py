"""CPU dry run of bench/gpu/validate.sh only: make the packages the device image lacks unimportable.

validate.sh --dry-run puts this folder on PYTHONPATH, so every Python process of the dry run
(the stages, pytest and its xdist workers) starts with it. The module names in
MEDGRPO_DRY_RUN_ABSENT (comma separated, e.g. ``av,decord,nvidia.dali,openai``) then behave as
on the GPU machine: ``import av`` raises ModuleNotFoundError and ``importlib.util.find_spec("av")``
returns None. Every finder on ``sys.meta_path`` is wrapped rather than one blocker put in front,
because a blocker that raises would break ``find_spec``, and one that returns a failing spec would
make the package look installed.
"""

from __future__ import annotations

import os
import sys

ABSENT = frozenset(name.strip() for name in os.environ.get("MEDGRPO_DRY_RUN_ABSENT", "").split(",") if name.strip())


def _absent(fullname: str) -> bool:
    return any(fullname == name or fullname.startswith(name + ".") for name in ABSENT)


class _HideAbsent:
    """A meta-path finder that answers None for the absent modules and asks ``finder`` otherwise."""

    def __init__(self, finder) -> None:
        self._finder = finder

    def find_spec(self, fullname, path=None, target=None):
        if _absent(fullname):
            return None
        find_spec = getattr(self._finder, "find_spec", None)
        return None if find_spec is None else find_spec(fullname, path, target)

    def invalidate_caches(self) -> None:
        invalidate = getattr(self._finder, "invalidate_caches", None)
        if invalidate is not None:
            invalidate()

    def __getattr__(self, name: str):
        return getattr(self._finder, name)


if ABSENT:
    sys.meta_path[:] = [_HideAbsent(finder) for finder in sys.meta_path]
    for _name in [name for name in sys.modules if _absent(name)]:
        del sys.modules[_name]
