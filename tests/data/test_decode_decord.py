"""decode_decord: decord returns exactly the frames the sampling plan asks for, like decode_cpu (PyAV).

Frames carry their own index as a barcode (medgrpo.testing.video_fixtures), so a seek that
lands on a neighbouring frame is caught exactly.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

# PyAV first: decord imported before it breaks PyAV's VP9 encoder (used by the fixtures of
# this and later test modules) in the whole process; see medgrpo.data.decode_decord.
pytest.importorskip("av")
pytest.importorskip("decord")

from medgrpo.data import decode_cpu, sampling  # noqa: E402
from medgrpo.data.decode_decord import VideoDecodeError, decode_frames, load_video_sample, video_info  # noqa: E402
from medgrpo.testing.video_fixtures import read_barcode, write_jpeg_folder, write_video  # noqa: E402

N = 40
FPS = 10
SIZE = (160, 96)  # (width, height)
VIDEOS = [("libx264", "mp4"), ("libvpx-vp9", "webm"), ("mjpeg", "avi")]
INDEX_SETS = [[0], [N - 1], list(range(N)), [17, 2, 39, 0, 17], [1, 2, 3, 20, 21, 22]]
# decord and PyAV both convert FFmpeg's YUV frames to RGB, with different swscale settings:
# measured max |decord - PyAV| = 0 levels on these fixtures (mean 0.0); allowed: mean 1, max 8.
PIXEL_MEAN_TOL = 1.0
PIXEL_MAX_TOL = 8


def _barcodes(frames: torch.Tensor) -> list[int]:
    return [read_barcode(frame.numpy()) for frame in frames]


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("decord_videos")
    return {ext: write_video(root / f"clip.{ext}", N, FPS, SIZE, codec) for codec, ext in VIDEOS}


@pytest.mark.parametrize("ext", [ext for _, ext in VIDEOS])
@pytest.mark.parametrize("indices", INDEX_SETS, ids=lambda ix: ",".join(map(str, ix[:6])))
def test_decode_exact_indices(videos, ext, indices):
    frames = decode_frames(videos[ext], indices)
    assert frames.dtype == torch.uint8
    assert tuple(frames.shape) == (len(indices), SIZE[1], SIZE[0], 3)
    assert _barcodes(frames) == indices


@pytest.mark.parametrize("ext", [ext for _, ext in VIDEOS])
def test_video_info_matches_pyav(videos, ext):
    total, fps, height, width = video_info(videos[ext])
    assert (total, height, width) == (N, SIZE[1], SIZE[0])
    assert fps == pytest.approx(FPS)
    assert (total, height, width) == tuple(decode_cpu.video_info(videos[ext])[i] for i in (0, 2, 3))


@pytest.mark.parametrize("ext", [ext for _, ext in VIDEOS])
def test_pixels_agree_with_pyav(videos, ext):
    indices = [0, 7, 21, N - 1]
    ours = decode_frames(videos[ext], indices).float()
    reference = decode_cpu.decode_frames(videos[ext], indices).float()
    difference = (ours - reference).abs()
    assert difference.mean() <= PIXEL_MEAN_TOL
    assert difference.max() <= PIXEL_MAX_TOL


@pytest.mark.parametrize("ext,nframes", [(ext, n) for _, ext in VIDEOS for n in (None, 6)])
def test_load_video_sample_same_as_pyav(videos, ext, nframes):
    frames, plan = load_video_sample(videos[ext], fps=2.0, nframes=nframes)
    assert plan == sampling.plan_frames(N, FPS, SIZE[1], SIZE[0], fps=2.0, nframes=nframes)
    reference, reference_plan = decode_cpu.load_video_sample(videos[ext], fps=2.0, nframes=nframes)
    assert plan == reference_plan
    assert tuple(frames.shape) == (plan.num_frames, plan.height, plan.width, 3)
    assert _barcodes(frames) == list(plan.indices)
    assert (frames.float() - reference.float()).abs().max() <= PIXEL_MAX_TOL


def test_clip_start_end_frame(videos):
    frames, plan = load_video_sample(videos["mp4"], nframes=4, start_frame=10, end_frame=30)
    assert plan.indices == (10, 17, 23, 30)
    assert _barcodes(frames) == [10, 17, 23, 30]
    frames, plan = load_video_sample(videos["webm"], fps=2.0, start_frame=5, end_frame=100)  # end clamped
    assert plan == sampling.plan_frames(N, FPS, SIZE[1], SIZE[0], fps=2.0, start_frame=5, end_frame=100)
    assert _barcodes(frames) == list(plan.indices)


def test_region_box_drawn_as_decode_cpu_draws_it(videos, tmp_path):
    from medgrpo.data.records import RegionCaptionInfo

    box = RegionCaptionInfo(frame_index=11, bbox=(20.0, 10.0, 120.0, 70.0))
    frames, plan = load_video_sample(videos["mp4"], nframes=4, region_box=box)
    reference, _ = decode_cpu.load_video_sample(videos["mp4"], nframes=4, region_box=box)
    plain, _ = load_video_sample(videos["mp4"], nframes=4)
    assert (frames.float() - reference.float()).abs().max() <= PIXEL_MAX_TOL
    assert not torch.equal(frames, plain)
    paths = write_jpeg_folder(tmp_path / "boxed", 4, SIZE)
    box = RegionCaptionInfo(frame_index=1, bbox=(20.0, 10.0, 120.0, 70.0))
    assert torch.equal(
        load_video_sample(paths, region_box=box)[0], decode_cpu.load_video_sample(paths, region_box=box)[0]
    )


def test_frame_lists_go_to_pil(tmp_path):
    paths = write_jpeg_folder(tmp_path / "odd", 5, SIZE)
    frames, plan = load_video_sample(paths)
    assert plan.indices == (0, 1, 2, 3, 4, 4)
    assert _barcodes(frames) == [0, 1, 2, 3, 4, 4]
    assert _barcodes(decode_frames(str(tmp_path / "odd"), [3, 1])) == [3, 1]


def test_missing_file(tmp_path):
    missing = str(tmp_path / "nope.mp4")
    for call in (lambda: decode_frames(missing, [0]), lambda: video_info(missing), lambda: load_video_sample(missing)):
        with pytest.raises(VideoDecodeError, match="nope.mp4.*no such file") as info:
            call()
        assert info.value.path == missing


def test_corrupt_and_truncated(tmp_path, videos):
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    data = open(videos["mp4"], "rb").read()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) // 2])
    for bad in (junk, cut):
        with pytest.raises(VideoDecodeError, match=bad.name):
            video_info(bad)
        with pytest.raises(VideoDecodeError, match=bad.name):
            decode_frames(str(bad), [0])


def test_truncated_webm_index_beyond_decoded(tmp_path, videos):
    data = open(videos["webm"], "rb").read()
    cut = tmp_path / "cut.webm"
    cut.write_bytes(data[: len(data) // 2])
    total = video_info(cut)[0]
    assert 0 < total < N
    assert _barcodes(decode_frames(str(cut), [0])) == [0]
    with pytest.raises(VideoDecodeError, match="cut.webm.*beyond the video"):
        decode_frames(str(cut), [N - 1])


def test_bad_indices(videos):
    with pytest.raises(VideoDecodeError, match="beyond the video"):
        decode_frames(videos["mp4"], [0, N])
    with pytest.raises(VideoDecodeError, match="negative"):
        decode_frames(videos["mp4"], [-1])
    with pytest.raises(VideoDecodeError, match="no frame indices"):
        decode_frames(videos["mp4"], [])


def test_no_leaked_file_descriptors(videos, tmp_path):
    junk = tmp_path / "junk.webm"
    junk.write_bytes(b"\x1aE\xdf\xa3" + b"\x00" * 100)
    load_video_sample(videos["mp4"], nframes=4)  # warm up decord's lazy initialisation
    before = len(os.listdir("/proc/self/fd"))
    for i in range(50):
        ext = VIDEOS[i % len(VIDEOS)][1]
        load_video_sample(videos[ext], nframes=4)
        if i % 10 == 0:
            with pytest.raises(VideoDecodeError):
                decode_frames(str(junk), [0])
            with pytest.raises(VideoDecodeError):
                decode_frames(videos["mp4"], [N + 5])
    assert len(os.listdir("/proc/self/fd")) == before
