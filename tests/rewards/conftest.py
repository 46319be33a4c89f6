"""Fixtures shared by the rewards commands' bad-input tests."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass(frozen=True)
class Unwritable:
    """An output ``path`` that cannot be written as a file, and a check that its obstacle is untouched."""

    path: Path

    def untouched(self) -> bool:
        """The directory is still empty, or the file in the way still holds what it held (and no file was added)."""
        if self.path.is_dir():
            return not any(self.path.iterdir())
        blocker = self.path.parent
        return blocker.read_text() == "a file" and [p.name for p in blocker.parent.iterdir()] == ["blocker"]


@pytest.fixture(params=["a directory", "under a file"])
def unwritable_output(request: pytest.FixtureRequest, tmp_path: Path) -> Unwritable:
    """An existing directory where the output file should go, or an output path under a regular file."""
    if request.param == "a directory":
        path = tmp_path / "out" / "result.json"
        path.mkdir(parents=True)
        return Unwritable(path)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "blocker").write_text("a file")
    return Unwritable(tmp_path / "out" / "blocker" / "result.json")
