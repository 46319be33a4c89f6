"""patchify: the reference layout, the op's CPU kernel and the Triton kernel against it, the reference
against Hugging Face's Qwen2-VL processors, input errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medgrpo.ops import reference
from medgrpo.ops.patchify import patchify
from medgrpo.ops.reference import CLIP_MEAN, CLIP_STD, PATCH_SIZE, ROW_LEN

SHAPES = [(2, 28, 28), (4, 56, 84), (6, 112, 56)]


def _frames(t: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (t, h, w, 3), dtype=torch.uint8, generator=g)


def _launch(frames: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The Triton launcher, given the constants the op passes in."""
    from medgrpo.kernels.patchify import patchify as launch

    r = reference
    return launch(
        frames, dtype, r.CLIP_MEAN, r.CLIP_STD, r.RESCALE_FACTOR, r.PATCH_SIZE, r.MERGE_SIZE, r.TEMPORAL_PATCH_SIZE
    )


# --------------------------------------------------------------------------- reference semantics


@pytest.mark.parametrize("thw", SHAPES)
def test_reference_shapes_and_grid(thw: tuple[int, int, int]) -> None:
    t, h, w = thw
    pv, grid = reference.patchify(_frames(t, h, w))
    gt, gh, gw = t // 2, h // 14, w // 14
    assert pv.dtype == torch.float32 and pv.shape == (gt * gh * gw, ROW_LEN)
    assert grid.dtype == torch.int64 and grid.tolist() == [[gt, gh, gw]]


def test_reference_element_positions() -> None:
    """Spot-check the layout by explicit index arithmetic (independent of reshape/permute)."""
    t, h, w = 4, 56, 84
    frames = _frames(t, h, w, seed=3)
    pv, _ = reference.patchify(frames)
    mean, std = torch.tensor(CLIP_MEAN), torch.tensor(CLIP_STD)
    gh, gw = h // 14, w // 14
    g = torch.Generator().manual_seed(1)
    for _ in range(200):
        row = int(torch.randint(0, pv.shape[0], (1,), generator=g))
        col = int(torch.randint(0, ROW_LEN, (1,), generator=g))
        mx, my = row % 2, (row // 2) % 2
        bx, by = (row // 4) % (gw // 2), (row // 4 // (gw // 2)) % (gh // 2)
        tb = row // 4 // (gw // 2) // (gh // 2)
        px, py, tp, c = col % 14, (col // 14) % 14, (col // 196) % 2, col // 392
        v = frames[tb * 2 + tp, (by * 2 + my) * 14 + py, (bx * 2 + mx) * 14 + px, c].float()
        expected = (v * (1.0 / 255.0) - mean[c]) / std[c]
        assert pv[row, col].item() == pytest.approx(expected.item(), abs=1e-6)


# --------------------------------------------------------------------------- the op


def test_patchify_cpu_dispatches_to_reference() -> None:
    frames = _frames(4, 56, 84)
    pv, grid = patchify(frames)
    ref_pv, ref_grid = reference.patchify(frames)
    assert torch.equal(pv, ref_pv) and torch.equal(grid, ref_grid)


def test_op_schema_and_fake_kernel() -> None:
    frames = _frames(2, 28, 56)
    torch.library.opcheck(torch.ops.medgrpo.patchify.default, (frames, torch.float32))
    compiled = torch.compile(lambda f: patchify(f, dtype=torch.bfloat16)[0], fullgraph=True)
    assert torch.equal(compiled(frames), reference.patchify(frames, dtype=torch.bfloat16)[0])


@pytest.mark.gpu
def test_patchify_cuda_dispatch() -> None:
    frames = _frames(6, 112, 56)
    pv, grid = patchify(frames.cuda())
    ref_pv, ref_grid = reference.patchify(frames)
    torch.testing.assert_close(pv.cpu(), ref_pv, rtol=0, atol=1e-6)
    assert torch.equal(grid.cpu(), ref_grid)


# --------------------------------------------------------------------------- Triton kernel


@pytest.mark.parametrize("thw", SHAPES)
def test_triton_matches_reference(triton_device: str, thw: tuple[int, int, int]) -> None:
    frames = _frames(*thw, seed=sum(thw))
    ref_pv, _ = reference.patchify(frames)
    pv = _launch(frames.to(triton_device))
    assert pv.dtype == torch.float32 and pv.shape == ref_pv.shape
    torch.testing.assert_close(pv.cpu(), ref_pv, rtol=0, atol=1e-6)


def test_triton_non_contiguous_input(triton_device: str) -> None:
    base = _frames(4, 84, 56, seed=7)  # (T, W, H, C) storage, viewed as (T, H, W, C)
    frames = base.transpose(1, 2)
    assert not frames.is_contiguous()
    ref_pv, _ = reference.patchify(frames)
    pv = _launch(frames.to(triton_device).transpose(1, 2).contiguous().transpose(1, 2))
    torch.testing.assert_close(pv.cpu(), ref_pv, rtol=0, atol=1e-6)


def test_triton_bf16_output(triton_device: str) -> None:
    frames = _frames(2, 28, 56, seed=5)
    ref_pv, _ = reference.patchify(frames)
    pv = _launch(frames.to(triton_device), dtype=torch.bfloat16)
    assert pv.dtype == torch.bfloat16
    # Within one bf16 ulp: Triton's interpreter may truncate where a GPU rounds to nearest-even.
    torch.testing.assert_close(pv.cpu().float(), ref_pv, rtol=2**-7, atol=1e-6)


# --------------------------------------------------------------------------- Hugging Face equivalence


def _hf_image_processor():
    """The numpy/PIL Qwen2-VL image processor (no torchvision needed), or skip."""
    transformers = pytest.importorskip("transformers")
    cls = getattr(transformers, "Qwen2VLImageProcessorPil", None)
    if cls is None:  # transformers < 5: the slow processor is Qwen2VLImageProcessor itself
        cls = transformers.Qwen2VLImageProcessor
    return cls(do_resize=False)


@pytest.mark.parametrize("hw", [(28, 28), (56, 84), (112, 56)])
def test_reference_matches_hf_image_processor(hw: tuple[int, int]) -> None:
    """A still image is a 2-frame clip of itself for HF (temporal broadcast): compare rows and grid."""
    proc = _hf_image_processor()
    img = _frames(1, *hw, seed=hw[0] + hw[1])[0]
    out = proc(images=[img.numpy()], return_tensors="np")
    pv, grid = reference.patchify(img[None].expand(2, -1, -1, -1))
    torch.testing.assert_close(pv, torch.from_numpy(np.asarray(out["pixel_values"])), rtol=0, atol=1e-6)
    assert grid.tolist() == np.asarray(out["image_grid_thw"]).tolist()


@pytest.mark.parametrize("thw", SHAPES)
def test_reference_matches_hf_per_frame(thw: tuple[int, int, int]) -> None:
    """Distinct frames: temporal slot tp of each video row is frame (2 * t_blk + tp)'s HF image row."""
    proc = _hf_image_processor()
    t, h, w = thw
    frames = _frames(t, h, w, seed=11)
    pv, _ = reference.patchify(frames)
    rows_per_t = (h // PATCH_SIZE) * (w // PATCH_SIZE)
    video = pv.view(t // 2, rows_per_t, 3, 2, PATCH_SIZE, PATCH_SIZE)
    for f in range(t):
        out = proc(images=[frames[f].numpy()], return_tensors="np")
        hf = torch.from_numpy(np.asarray(out["pixel_values"])).view(rows_per_t, 3, 2, PATCH_SIZE, PATCH_SIZE)
        torch.testing.assert_close(video[f // 2, :, :, f % 2], hf[:, :, f % 2], rtol=0, atol=1e-6)


def _hf_video_processor():
    transformers = pytest.importorskip("transformers")
    try:
        return transformers.Qwen2VLVideoProcessor(do_resize=False)
    except ImportError as exc:  # transformers >= 5: the video processor needs torchvision
        pytest.skip(f"Qwen2VLVideoProcessor unavailable: {str(exc).strip().splitlines()[0]}")


@pytest.mark.parametrize("thw", SHAPES)
def test_reference_matches_hf_video_processor(thw: tuple[int, int, int]) -> None:
    proc = _hf_video_processor()
    frames = _frames(*thw, seed=13)
    out = proc(videos=[frames.numpy()], return_tensors="pt", cap_pixels_per_frame=False)
    pv, grid = reference.patchify(frames)
    torch.testing.assert_close(pv, out["pixel_values_videos"].float(), rtol=0, atol=1e-5)
    assert torch.equal(grid, out["video_grid_thw"].to(torch.int64))


# --------------------------------------------------------------------------- input errors


@pytest.mark.parametrize(
    ("frames", "match"),
    [
        (torch.zeros(2, 28, 28, 3, dtype=torch.float32), "uint8"),
        (torch.zeros(28, 28, 3, dtype=torch.uint8), "shape"),
        (torch.zeros(2, 28, 28, 4, dtype=torch.uint8), "channels"),
        (torch.zeros(2, 3, 28, 28, dtype=torch.uint8), "channels"),
        (torch.zeros(3, 28, 28, 3, dtype=torch.uint8), "T=3"),
        (torch.zeros(0, 28, 28, 3, dtype=torch.uint8), "T=0"),
        (torch.zeros(2, 30, 28, 3, dtype=torch.uint8), "H=30"),
        (torch.zeros(2, 28, 42, 3, dtype=torch.uint8), "W=42"),
        (torch.zeros(2, 14, 28, 3, dtype=torch.uint8), "multiples of 28"),
    ],
)
def test_bad_input_errors(frames: torch.Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        reference.patchify(frames)
    with pytest.raises(ValueError, match=match):
        patchify(frames)


def test_bad_output_dtype() -> None:
    with pytest.raises(ValueError, match="dtype"):
        patchify(torch.zeros(2, 28, 28, 3, dtype=torch.uint8), dtype=torch.int32)


def test_not_a_tensor() -> None:
    with pytest.raises(TypeError):
        reference.patchify(np.zeros((2, 28, 28, 3), dtype=np.uint8))  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        patchify(np.zeros((2, 28, 28, 3), dtype=np.uint8))  # type: ignore[arg-type]
