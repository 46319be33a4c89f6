"""Video patchify: uint8 frames -> ``pixel_values_videos`` rows, medgrpo vs the reference and the copy floor.

One clip as a MedGRPO prompt sees it: 32 frames of 448 x 448 (``max_pixels = 448 * 448``), and a
long one of 128 frames on the GPU. The op reads each uint8 pixel once and writes it once as an
output element, so the floor is bandwidth: ``copy_floor`` moves the same bytes.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from medgrpo.ops import reference
from medgrpo.ops.patchify import patchify

PROVIDERS = ["medgrpo", "reference", "reference_compiled", "copy_floor"]
SIZE = (448, 448)
FRAMES = [32, 128] if torch.cuda.is_available() else [32]
DTYPES = [torch.float32, torch.bfloat16] if torch.cuda.is_available() else [torch.float32]

_compiled_reference = torch.compile(reference.patchify, dynamic=False)


def fused_bytes(frames: int, dtype: torch.dtype) -> int:
    """Bytes the op must move: read every uint8 value once, write it once in ``dtype``."""
    values = frames * SIZE[0] * SIZE[1] * 3
    return values * (1 + torch.finfo(dtype).bits // 8)


def provider_fn(provider: str, clip: torch.Tensor, dtype: torch.dtype, nbytes: int) -> Callable[[], object]:
    """The call each provider makes (or the floor's copy of the same traffic)."""
    if provider == "copy_floor":
        src = torch.empty(nbytes // 2, dtype=torch.uint8, device=clip.device)
        dst = torch.empty_like(src)
        return lambda: dst.copy_(src)
    if provider == "medgrpo":
        return lambda: patchify(clip, dtype=dtype)
    if provider == "reference":
        return lambda: reference.patchify(clip, dtype=dtype)
    return lambda: _compiled_reference(clip, dtype=dtype)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("frames", FRAMES, ids=lambda t: f"T{t}")
def bench_patchify(measure, device: str, frames: int, dtype: torch.dtype, provider: str) -> None:
    gen = torch.Generator().manual_seed(frames)
    clip = torch.randint(0, 256, (frames, SIZE[0], SIZE[1], 3), dtype=torch.uint8, generator=gen).to(device)
    nbytes = fused_bytes(frames, dtype)
    dtype_name = str(dtype).removeprefix("torch.")
    params = {"op": "patchify", "frames": frames, "height": SIZE[0], "width": SIZE[1], "dtype": dtype_name}
    measure(
        provider_fn(provider, clip, dtype, nbytes),
        group=f"patchify T={frames} {SIZE[0]}x{SIZE[1]} {dtype_name}",
        provider=provider,
        params={**params, "device": device},
        bytes_moved=nbytes,
    )
