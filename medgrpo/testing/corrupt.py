"""Broken inputs for the bad-input tests: frames that exist but do not decode, files with flipped bytes."""

from __future__ import annotations

import os
from pathlib import Path


def write_undecodable_frames(root: str | os.PathLike, folder: str, count: int = 2) -> list[str]:
    """``count`` files named like JPEG frames under ``root/folder`` that are not images.

    Only decoding finds them unusable (they exist, so a path check passes). Returns their paths
    relative to ``root``, as a record's ``video`` list names them.
    """
    directory = Path(root) / folder
    directory.mkdir(parents=True, exist_ok=True)
    names = [f"{folder}/{i:06d}.jpg" for i in range(count)]
    for name in names:
        (Path(root) / name).write_bytes(b"not a jpeg")
    return names


def flip_middle_bytes(path: str | os.PathLike, size: int = 4096) -> None:
    """Invert ``size`` bytes in the middle of a file: same size, other content (a checksum must catch it)."""
    path = Path(path)
    data = bytearray(path.read_bytes())
    start = max(0, len(data) // 2 - size // 2)
    data[start : start + size] = bytes(b ^ 0xFF for b in data[start : start + size])
    path.write_bytes(bytes(data))


__all__ = ["flip_middle_bytes", "write_undecodable_frames"]
