"""decode_dali: DALI's pixels against decode_cpu's, its loader (batches, shards, skips, leaks), its GPU path.

CPU tests run DALI's CPU operators (``device="cpu"``, VP9/MJPEG videos and JPEG folders; its
CPU video decoder does not read H.264). GPU tests (nvJPEG, NVDEC H.264, frames left on the
GPU) carry the ``gpu`` marker. Frames carry their own index as a barcode
(medgrpo.testing.video_fixtures), so a wrong frame is caught exactly. The checks every
backend passes (exact frames and plans, clips, frame lists, missing files) are in test_decoders.py.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

from medgrpo.data import decode, decode_cpu, decode_dali, sampling
from medgrpo.data.decode import FrameRequest, VideoDecodeError
from medgrpo.data.decode_dali import DaliVideoLoader, load_video_sample
from medgrpo.data.records import RegionCaptionInfo
from medgrpo.testing.video_fixtures import read_barcode, write_jpeg_folder, write_video

needs_dali = pytest.mark.skipif(not decode_dali.dali_available(), reason="NVIDIA DALI is not installed")

N = 24
FPS = 10
SIZE = (160, 96)  # (width, height)
BIG = (224, 160)
VIDEOS = {"webm": ("libvpx-vp9", SIZE), "avi": ("mjpeg", SIZE), "mkv": ("mjpeg", SIZE), "big.webm": ("libvpx-vp9", BIG)}

# Measured against decode_cpu (PyAV/PIL + torch bicubic antialias) on these fixtures, DALI 2.4 CPU:
# VP9 mean 0.16 / max 3 levels, MJPEG mean 0.67 / max 2 (DALI's and PyAV's YUV->RGB conversions
# differ), JPEG folders 0 / 0. The resize alone (same uint8 input, cubic antialias vs torch
# bicubic antialias) differs by at most 1 level on barcode and smooth frames, 8 on white noise.
VIDEO_MEAN_TOL, VIDEO_MAX_TOL = 1.0, 4
JPEG_MEAN_TOL, JPEG_MAX_TOL = 0.1, 2
RESIZE_MAX_TOL = 1
NOISE_MEAN_TOL, NOISE_MAX_TOL = 0.25, 16  # white noise: measured max 8-11 levels, varies with DALI threads


def _barcodes(frames: torch.Tensor) -> list[int]:
    return [read_barcode(frame.cpu().numpy()) for frame in frames]


def _tasks() -> int:
    return len(os.listdir("/proc/self/task"))


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("dali_videos")
    out = {key: write_video(root / f"clip.{key}", N, FPS, size, codec) for key, (codec, size) in VIDEOS.items()}
    out["h264"] = write_video(root / "clip.mp4", N, FPS, SIZE, "libx264")
    write_jpeg_folder(root / "frames", N, SIZE)
    out["jpeg"] = str(root / "frames")
    out["odd"] = write_jpeg_folder(root / "odd", 7, BIG)  # a list of paths, padded to 8
    return out


@pytest.fixture(scope="module")
def bad(tmp_path_factory, sources) -> dict[str, object]:
    root = tmp_path_factory.mktemp("dali_bad")
    junk = root / "junk.webm"
    junk.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    data = open(sources["webm"], "rb").read()
    cut = root / "cut.webm"
    cut.write_bytes(data[: len(data) // 2])
    jpegs = write_jpeg_folder(root / "truncated", 4, SIZE)
    jpeg = open(jpegs[2], "rb").read()
    open(jpegs[2], "wb").write(jpeg[: len(jpeg) // 2])
    garbage = root / "garbage.jpg"
    garbage.write_bytes(b"not a jpeg at all")
    return {
        "junk": str(junk),
        "cut": str(cut),
        "truncated_jpeg": jpegs,
        "garbage_jpeg": [str(garbage)],
        "missing": str(root / "nope.webm"),
    }


def test_import_without_dali_is_lazy():
    code = (
        "import sys; sys.modules['nvidia.dali'] = None\n"
        "import medgrpo.data.decode_dali as d\n"
        "assert not d.dali_available()\n"
        "from medgrpo.data.decode import FrameRequest\n"
        "try:\n    d.load_video_sample(FrameRequest('x.webm'), device='cpu')\n"
        "except ImportError as e:\n    assert 'medgrpo[video]' in str(e), e\n"
        "else:\n    raise SystemExit('no ImportError')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


@needs_dali
@pytest.mark.parametrize(
    "key,budget,mean_tol,max_tol",
    [
        ("webm", {}, VIDEO_MEAN_TOL, VIDEO_MAX_TOL),
        ("avi", {"nframes": 6}, VIDEO_MEAN_TOL, VIDEO_MAX_TOL),
        ("big.webm", {"min_pixels": 16 * 28 * 28, "max_pixels": 30 * 28 * 28}, VIDEO_MEAN_TOL, VIDEO_MAX_TOL),
        ("jpeg", {}, JPEG_MEAN_TOL, JPEG_MAX_TOL),
        ("odd", {"min_pixels": 16 * 28 * 28, "max_pixels": 30 * 28 * 28}, JPEG_MEAN_TOL, JPEG_MAX_TOL),
    ],
)
def test_pixels_match_decode_cpu(sources, key, budget, mean_tol, max_tol):
    frames, plan = load_video_sample(FrameRequest(sources[key], **budget), device="cpu")
    reference, reference_plan = decode_cpu.load_video_sample(FrameRequest(sources[key], **budget))
    assert plan == reference_plan
    difference = (frames.float() - reference.float()).abs()
    assert difference.mean() <= mean_tol
    assert difference.max() <= max_tol


@needs_dali
@pytest.mark.parametrize(
    "key,budget,box",
    [
        ("odd", {"min_pixels": 16 * 28 * 28, "max_pixels": 30 * 28 * 28}, RegionCaptionInfo(6, (5.0, 8.0, 90.0, 60.0))),
        ("jpeg", {}, RegionCaptionInfo(3, (0.0, 0.0, 50.0, 40.0))),
        ("webm", {"nframes": 6}, RegionCaptionInfo(7, (10.0, 10.0, 70.0, 50.0))),
    ],
)
def test_region_box_matches_decode_cpu(sources, key, budget, box):
    """The box is drawn where decode_cpu draws it (after the presize / before the resize), then resized alike."""
    frames, plan = load_video_sample(FrameRequest(sources[key], region_box=box, **budget), device="cpu")
    reference, reference_plan = decode_cpu.load_video_sample(FrameRequest(sources[key], region_box=box, **budget))
    plain, _ = load_video_sample(FrameRequest(sources[key], **budget), device="cpu")
    assert plan == reference_plan
    difference = (frames.float() - reference.float()).abs()
    assert difference.mean() <= VIDEO_MEAN_TOL and difference.max() <= 2 * VIDEO_MAX_TOL
    changed = (frames.to(torch.int16) - plain.to(torch.int16)).abs().amax(dim=(1, 2, 3)) > 32
    boxed = {i for i, index in enumerate(plan.indices) if index == plan.indices[changed.nonzero()[0, 0]]}
    assert set(changed.nonzero().flatten().tolist()) == boxed  # the box frame (and its padded copy) only


@needs_dali
def test_resize_matches_torch_bicubic_antialias():
    """Same uint8 frames into DALI's resize and decode.resize_frames: the resize alone."""
    dali = decode_dali._import_dali()
    pipe = dali.Pipeline(batch_size=1, num_threads=1, device_id=None, prefetch_queue_depth=1, exec_dynamic=True)
    with pipe:
        frames = dali.fn.external_source(name="frames", dtype=dali.types.UINT8, ndim=4, layout="FHWC")
        size = dali.fn.external_source(name="size", dtype=dali.types.FLOAT, ndim=1)
        pipe.set_outputs(decode_dali._resize(dali, frames, size))
    pipe.build()
    smooth = torch.nn.functional.interpolate(torch.rand(2, 3, 10, 14) * 255, size=(160, 224), mode="bilinear")
    inputs = {
        "smooth": smooth.round().to(torch.uint8).permute(0, 2, 3, 1).contiguous(),
        "noise": torch.randint(0, 256, (2, 160, 224, 3), dtype=torch.uint8),
    }
    for name, source in inputs.items():
        for height, width in [(112, 168), (56, 84), (168, 252), (160, 224)]:
            pipe.feed_input("frames", [source.numpy()])
            pipe.feed_input("size", [np.array([height, width], np.float32)])
            (out,) = pipe.run()
            ours = torch.from_numpy(np.array(out[0])).float()
            difference = (ours - decode.resize_frames(source, height, width).float()).abs()
            if name == "noise":
                assert difference.mean() <= NOISE_MEAN_TOL and difference.max() <= NOISE_MAX_TOL
            else:
                assert difference.max() <= RESIZE_MAX_TOL
    del pipe


def _plans(sources: dict, keys: list[str]) -> tuple[list, list[sampling.FramePlan]]:
    chosen, plans = [], []
    for key in keys:
        source = sources[key]
        if decode.is_frame_source(source):
            paths = source if isinstance(source, list) else decode.list_frame_files(source)
            height, width = decode_cpu.decode_frames(paths, [0]).shape[1:3]
            plans.append(sampling.plan_frame_list(len(paths), height, width, sample_fps=FPS))
        else:
            total, fps, height, width = decode.video_info(source)
            plans.append(sampling.plan_frames(total, fps, height, width, fps=2.0, nframes=4 + 2 * (len(plans) % 3)))
        chosen.append(source)
    return chosen, plans


MIXED = ["webm", "jpeg", "big.webm", "avi", "odd", "mkv", "webm", "big.webm"]


@needs_dali
def test_loader_mixed_batches(sources):
    chosen, plans = _plans(sources, MIXED)
    with DaliVideoLoader(chosen, plans, batch_size=3, device="cpu", num_threads=2) as loader:
        assert len(loader) == 3
        batches = list(loader)
    assert [len(batch) for batch in batches] == [3, 3, 2]
    seen = []
    for batch in batches:
        for frames, plan, index in batch:
            assert plan == plans[index]
            assert tuple(frames.shape) == (plan.num_frames, plan.height, plan.width, 3)
            assert _barcodes(frames) == list(plan.indices)
            seen.append(index)
    assert seen == list(range(len(MIXED)))
    assert loader.skipped == 0


@needs_dali
@pytest.mark.parametrize("world_size", [1, 2, 3, 5])
def test_sharding_covers_every_source_once(sources, world_size):
    chosen, plans = _plans(sources, MIXED[:7])
    seen: list[int] = []
    for rank in range(world_size):
        with DaliVideoLoader(chosen, plans, rank=rank, world_size=world_size, batch_size=2, device="cpu") as loader:
            indices = [index for batch in loader for _, _, index in batch]
        assert indices == list(range(rank, len(chosen), world_size))
        seen.extend(indices)
    assert sorted(seen) == list(range(len(chosen)))


@needs_dali
@pytest.mark.parametrize(
    "key,match",
    [
        ("junk", "junk.webm.*cannot read video"),  # PyAV, reading the frame count for the plan
        ("truncated_jpeg", "frame_00002.jpg.*truncated JPEG"),
        ("garbage_jpeg", "garbage.jpg.*cannot read image"),
    ],
)
def test_bad_input_raises_video_decode_error(bad, key, match):
    with pytest.raises(VideoDecodeError, match=match):
        load_video_sample(FrameRequest(bad[key]), device="cpu")


@needs_dali
def test_more_bad_input(sources, bad):
    with pytest.raises(VideoDecodeError, match="empty frame list"):
        load_video_sample(FrameRequest([]), device="cpu")
    with pytest.raises(VideoDecodeError, match="clip.mp4.*cannot read h264"):
        load_video_sample(FrameRequest(sources["h264"]), device="cpu")
    # A truncated WebM opens and decodes its first frames: an index past them is an error, not a black frame.
    plan = sampling.FramePlan((0, N - 1), 84, 140, 2.0)
    with pytest.raises(VideoDecodeError, match="cut.webm.*out-of-bounds frame index 23"):
        next(iter(DaliVideoLoader([bad["cut"]], [plan], device="cpu", on_error="raise")))
    with pytest.raises(VideoDecodeError, match="junk.webm.*cannot decode video"):
        next(iter(DaliVideoLoader([bad["junk"]], [plan], device="cpu", on_error="raise")))
    with pytest.raises(VideoDecodeError, match="clip.webm.*out-of-bounds frame index 24"):
        next(
            iter(
                DaliVideoLoader(
                    [sources["webm"]], [sampling.FramePlan((0, N), 84, 140, 2.0)], device="cpu", on_error="raise"
                )
            )
        )


def _with_bad_sources(sources: dict, bad: dict) -> tuple[list, list[sampling.FramePlan], set[int]]:
    chosen, plans = _plans(sources, ["webm", "jpeg", "avi", "odd"])
    broken = [bad["junk"], bad["missing"], bad["truncated_jpeg"], bad["cut"], sources["h264"]]
    broken_plans = [plans[0], plans[0], sampling.plan_frame_list(4, SIZE[1], SIZE[0]), plans[0], plans[0]]
    broken_plans[3] = sampling.FramePlan((0, N - 1), plans[0].height, plans[0].width, 2.0)
    order = [0, 4, 1, 5, 6, 2, 7, 3, 8]  # good and bad interleaved
    everything = chosen + broken
    return [everything[i] for i in order], [(plans + broken_plans)[i] for i in order], {1, 3, 4, 6, 8}


@needs_dali
def test_loader_skips_and_counts_bad_sources(sources, bad, caplog):
    chosen, plans, broken = _with_bad_sources(sources, bad)
    with caplog.at_level(logging.WARNING, logger="medgrpo.data.decode_dali"):
        with DaliVideoLoader(chosen, plans, batch_size=4, device="cpu") as loader:
            batches = list(loader)
    indices = [index for batch in batches for _, _, index in batch]
    assert indices == [i for i in range(len(chosen)) if i not in broken]
    for batch in batches:
        for frames, plan, _ in batch:
            assert _barcodes(frames) == list(plan.indices)
    assert loader.skipped == len(broken)
    assert {index for index, _, _ in loader.skipped_sources} == broken
    assert sum("skips source" in record.message for record in caplog.records) == len(broken)
    with pytest.raises(VideoDecodeError):
        list(DaliVideoLoader(chosen, plans, batch_size=4, device="cpu", on_error="raise"))


@needs_dali
def test_no_leaked_threads_or_file_descriptors(sources, bad):
    chosen, plans, broken = _with_bad_sources(sources, bad)
    loader = DaliVideoLoader(chosen, plans, batch_size=3, device="cpu", num_threads=2)
    list(loader)  # warm-up epoch: pipelines built, lazy libraries loaded
    loader.close()
    list(loader)
    threads, tasks, fds = threading.active_count(), _tasks(), _fds()
    for _ in range(20):
        assert sum(len(batch) for batch in loader) == len(chosen) - len(broken)
        assert (threading.active_count(), _tasks(), _fds()) == (threads, tasks, fds)
    loader.close()
    assert loader.skipped == 22 * len(broken)
    for _ in range(3):  # one-off loads build and free a pipeline each time
        load_video_sample(FrameRequest(sources["webm"], nframes=4), device="cpu")
        with pytest.raises(VideoDecodeError):
            load_video_sample(FrameRequest(bad["junk"]), device="cpu")
    assert threading.active_count() == threads and _fds() == fds
    assert _tasks() <= tasks


def test_loader_argument_checks():
    plan = sampling.FramePlan((0, 1), 28, 28, 2.0)
    with pytest.raises(ValueError, match="plans"):
        DaliVideoLoader(["a.webm"], [], device="cpu")
    with pytest.raises(ValueError, match="rank"):
        DaliVideoLoader(["a.webm"], [plan], rank=2, world_size=2, device="cpu")
    with pytest.raises(ValueError, match="device"):
        DaliVideoLoader(["a.webm"], [plan], device="cuda")


# ------------------------------------------------------------------------------------------------
# GPU: nvJPEG and NVDEC through the mixed decoders, frames left on the GPU.


@needs_dali
@pytest.mark.gpu
@pytest.mark.parametrize("key", ["h264", "webm", "avi", "jpeg", "odd"])
def test_gpu_decoders_exact_and_on_device(sources, key):
    frames, plan = load_video_sample(FrameRequest(sources[key]), device="gpu")
    assert frames.device.type == "cuda"
    assert tuple(frames.shape) == (plan.num_frames, plan.height, plan.width, 3)
    assert _barcodes(frames) == list(plan.indices)
    reference, reference_plan = decode_cpu.load_video_sample(FrameRequest(sources[key]))
    assert plan == reference_plan
    difference = (frames.cpu().float() - reference.float()).abs()
    assert difference.mean() <= VIDEO_MEAN_TOL and difference.max() <= 2 * VIDEO_MAX_TOL


@needs_dali
@pytest.mark.gpu
def test_gpu_loader_mixed_batches_zero_copy(sources):
    chosen, plans = _plans(sources, MIXED + ["h264"])
    with DaliVideoLoader(chosen, plans, batch_size=4, device="gpu") as loader:
        for batch in loader:
            for frames, plan, _ in batch:
                assert frames.is_cuda and frames.device.index == torch.cuda.current_device()
                assert _barcodes(frames) == list(plan.indices)
