"""Every decoder backend installed here (PyAV, decord, DALI's CPU operators) against the same checks:
exactly the planned frames, the plan's size, the same errors for the same bad input, no leaks.

Frames carry their own index as a barcode (medgrpo.testing.video_fixtures), so a decoder
returning a neighbouring frame (seek or B-frame reordering bugs) is caught exactly. What one
backend does differently (pixels, DALI's loader, decord's seeking) is tested in its own file.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch

from medgrpo.data import sampling
from medgrpo.data.decode import FrameRequest, VideoDecodeError, check_same_size, list_frame_files
from medgrpo.testing.video_fixtures import CLIP_FPS as FPS
from medgrpo.testing.video_fixtures import CLIP_FRAMES as N
from medgrpo.testing.video_fixtures import CLIP_SIZE as SIZE
from medgrpo.testing.video_fixtures import read_barcode, write_jpeg_folder

# The video containers each backend reads (DALI's CPU video decoder reads VP8/VP9/MJPEG, not H.264).
VIDEOS = {
    "pyav": ("mp4", "webm", "avi", "mkv"),
    "decord": ("mp4", "webm", "avi", "mkv"),
    "dali": ("webm", "avi", "mkv"),
}
FRAME_READERS = ("pyav", "decord")  # backends with decode_frames / video_info
INDEX_SETS = [
    [0],
    [N - 1],
    [0, N - 1],
    list(range(N)),
    [3, 3, 3],
    [17, 2, 39, 0, 17],  # unsorted, with repeats
    [1, 2, 3, 20, 21, 22],
]


@dataclass(frozen=True)
class Backend:
    name: str
    load: Callable  # FrameRequest -> (frames, plan)
    decode_frames: Callable | None = None
    video_info: Callable | None = None


def _backend(name: str) -> Backend:
    if name == "pyav":
        from medgrpo.data import decode_cpu as module
    elif name == "decord":
        # Found, not imported: decord imported before PyAV breaks PyAV's VP9 encoder (decode_decord imports PyAV first).
        if importlib.util.find_spec("decord") is None:
            pytest.skip("decord is not installed")
        from medgrpo.data import decode_decord as module
    else:
        from medgrpo.data import decode_dali

        if not decode_dali.dali_available():
            pytest.skip("NVIDIA DALI is not installed")
        return Backend(name, partial(decode_dali.load_video_sample, device="cpu"))
    return Backend(name, module.load_video_sample, module.decode_frames, module.video_info)


@pytest.fixture
def backend(request) -> Backend:
    return _backend(request.param)


def _barcodes(frames: torch.Tensor) -> list[int]:
    return [read_barcode(frame.cpu().numpy()) for frame in frames]


def _pairs(backends, sources: Callable[[str], tuple[str, ...]]) -> list:
    return [pytest.param(b, s, id=f"{b}-{s}") for b in backends for s in sources(b)]


# --------------------------------------------------------------------------- frames and plans


@pytest.mark.parametrize("backend,key", _pairs(FRAME_READERS, lambda b: ("jpeg", *VIDEOS[b])), indirect=["backend"])
@pytest.mark.parametrize("indices", INDEX_SETS, ids=lambda ix: ",".join(map(str, ix[:6])))
def test_decode_exact_indices(decoder_sources, backend, key, indices):
    frames = backend.decode_frames(decoder_sources[key], indices)
    assert frames.dtype == torch.uint8
    assert tuple(frames.shape) == (len(indices), SIZE[1], SIZE[0], 3)
    assert _barcodes(frames) == indices


@pytest.mark.parametrize("backend", FRAME_READERS, indirect=True)
def test_frame_list_source(decoder_sources, backend):
    paths = list_frame_files(decoder_sources["jpeg"])
    assert _barcodes(backend.decode_frames(paths, [5, 0, 39])) == [5, 0, 39]


@pytest.mark.parametrize("backend,key", _pairs(FRAME_READERS, lambda b: VIDEOS[b]), indirect=["backend"])
def test_video_info(decoder_sources, backend, key):
    total, fps, height, width = backend.video_info(decoder_sources[key])
    assert (total, height, width) == (N, SIZE[1], SIZE[0])
    assert fps == pytest.approx(FPS)


@pytest.mark.parametrize(
    "backend,key,nframes",
    [pytest.param(b, s, None, id=f"{b}-{s}") for b in VIDEOS for s in ("jpeg", "jpeg_list")]
    + [pytest.param(b, s, n, id=f"{b}-{s}-{n}") for b in VIDEOS for s in VIDEOS[b] for n in (None, 6)],
    indirect=["backend"],
)
def test_load_video_sample_follows_plan(decoder_sources, backend, key, nframes):
    if key.startswith("jpeg"):  # a frame folder or list: every frame, nframes does not apply
        source = decoder_sources["jpeg"]
        frames, plan = backend.load(FrameRequest(list_frame_files(source) if key == "jpeg_list" else source, fps=FPS))
        assert plan == sampling.plan_frame_list(N, SIZE[1], SIZE[0], sample_fps=FPS)
    else:
        frames, plan = backend.load(FrameRequest(decoder_sources[key], fps=2.0, nframes=nframes))
        assert plan == sampling.plan_frames(N, FPS, SIZE[1], SIZE[0], fps=2.0, nframes=nframes)
    assert frames.dtype == torch.uint8
    assert tuple(frames.shape) == (plan.num_frames, plan.height, plan.width, 3)
    assert plan.num_frames % 2 == 0
    # 160 px wide -> plan width 140 or more: bars stay >= 8 px wide, so the barcode survives the resize.
    assert _barcodes(frames) == list(plan.indices)


@pytest.mark.parametrize("backend", VIDEOS, indirect=True)
def test_clip_start_end_frame(decoder_sources, backend):
    video = decoder_sources[VIDEOS[backend.name][0]]
    frames, plan = backend.load(FrameRequest(video, nframes=4, start_frame=10, end_frame=30))
    assert plan.indices == (10, 17, 23, 30)
    assert _barcodes(frames) == [10, 17, 23, 30]
    frames, plan = backend.load(FrameRequest(video, fps=2.0, start_frame=5, end_frame=100))  # end clamped
    assert plan == sampling.plan_frames(N, FPS, SIZE[1], SIZE[0], fps=2.0, start_frame=5, end_frame=100)
    assert _barcodes(frames) == list(plan.indices)


@pytest.mark.parametrize("backend", VIDEOS, indirect=True)
def test_odd_frame_list_padded_with_last_frame(tmp_path, backend):
    paths = write_jpeg_folder(tmp_path / "odd", 5, SIZE)
    frames, plan = backend.load(FrameRequest(paths))
    assert plan.indices == (0, 1, 2, 3, 4, 4)
    assert _barcodes(frames) == [0, 1, 2, 3, 4, 4]
    assert torch.equal(frames[4], frames[5])
    for clip in ({"start_frame": 1}, {"nframes": 4}):
        with pytest.raises(ValueError, match="frame lists"):
            backend.load(FrameRequest(paths, **clip))


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("backend", VIDEOS, indirect=True)
def test_missing_file(tmp_path, backend):
    missing = str(tmp_path / "nope.webm")
    calls = [lambda: backend.load(FrameRequest(missing))]
    if backend.decode_frames is not None:
        calls += [lambda: backend.decode_frames(missing, [0]), lambda: backend.video_info(missing)]
    for call in calls:
        with pytest.raises(VideoDecodeError, match="nope.webm.*no such file") as info:
            call()
        assert info.value.path == missing
    with pytest.raises(VideoDecodeError, match="missing.jpg.*no such file"):
        backend.load(FrameRequest([str(tmp_path / "missing.jpg")]))


@pytest.mark.parametrize("backend", VIDEOS, indirect=True)
def test_empty_frame_list(tmp_path, backend):
    with pytest.raises(VideoDecodeError, match="empty frame list"):
        backend.load(FrameRequest([]))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(VideoDecodeError, match="no images"):
        backend.load(FrameRequest(str(empty)))
    if backend.decode_frames is not None:
        with pytest.raises(VideoDecodeError, match="empty frame list"):
            backend.decode_frames([], [0])


@pytest.mark.parametrize("backend", VIDEOS, indirect=True)
@pytest.mark.parametrize("odd", [0, 3, 5])
def test_frame_size_mismatch_names_the_odd_frame(tmp_path, backend, odd):
    paths = write_jpeg_folder(tmp_path / "frames", 6, SIZE)
    write_jpeg_folder(tmp_path / "small", 6, (SIZE[0] // 2, SIZE[1] // 2))
    paths[odd] = str(tmp_path / "small" / Path(paths[odd]).name)
    expected = f"frame is {SIZE[0] // 2}x{SIZE[1] // 2}, the other frames are {SIZE[0]}x{SIZE[1]}$"
    with pytest.raises(VideoDecodeError, match=expected) as info:
        backend.load(FrameRequest(paths))
    assert info.value.path == paths[odd]
    if backend.decode_frames is not None:
        with pytest.raises(VideoDecodeError) as info:
            backend.decode_frames(paths, [5, 0, 3])
        assert info.value.path == paths[odd]


def test_check_same_size_names_the_frame_inside_a_video():
    sizes = [(64, 48), (64, 48), (32, 24), (64, 48), (16, 12)]
    with pytest.raises(
        VideoDecodeError, match=r"clip.mp4: frame 2 is 32x24, the other frames are 64x48 \(1 more"
    ) as info:
        check_same_size(sizes, [f"frame {i}" for i in range(5)], source="clip.mp4")
    assert info.value.path == "clip.mp4"
    assert check_same_size([(64, 48)] * 3, ["a", "b", "c"]) == (64, 48)


@pytest.mark.parametrize("backend", FRAME_READERS, indirect=True)
def test_corrupt_and_truncated(tmp_path, decoder_sources, backend):
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    data = open(decoder_sources["mp4"], "rb").read()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) // 2])
    for bad in (junk, cut):
        with pytest.raises(VideoDecodeError, match=bad.name):
            backend.video_info(bad)
        with pytest.raises(VideoDecodeError, match=bad.name):
            backend.decode_frames(str(bad), [0])


@pytest.mark.parametrize("backend", FRAME_READERS, indirect=True)
def test_truncated_webm_index_beyond_decoded(tmp_path, decoder_sources, backend):
    # Matroska has no index at the end: a cut file opens and decodes its first frames only.
    data = open(decoder_sources["webm"], "rb").read()
    cut = tmp_path / "cut.webm"
    cut.write_bytes(data[: len(data) // 2])
    total = backend.video_info(cut)[0]
    assert 0 < total < N
    assert _barcodes(backend.decode_frames(str(cut), [0])) == [0]
    with pytest.raises(VideoDecodeError, match="cut.webm.*beyond the video"):
        backend.decode_frames(str(cut), [N - 1])


@pytest.mark.parametrize("backend", FRAME_READERS, indirect=True)
def test_bad_indices(decoder_sources, backend):
    for key in ("mp4", "mkv", "jpeg"):
        with pytest.raises(VideoDecodeError, match="beyond"):
            backend.decode_frames(decoder_sources[key], [0, N])
    with pytest.raises(VideoDecodeError, match="negative"):
        backend.decode_frames(decoder_sources["mp4"], [-1])
    with pytest.raises(VideoDecodeError, match="no frame indices"):
        backend.decode_frames(decoder_sources["mp4"], [])


@pytest.mark.parametrize("backend", FRAME_READERS, indirect=True)
def test_no_leaked_file_descriptors(decoder_sources, tmp_path, backend):
    garbage = tmp_path / "junk.webm"
    garbage.write_bytes(b"\x1aE\xdf\xa3" + b"\x00" * 100)
    keys = ["jpeg", *VIDEOS[backend.name]]
    # Warm up (lazy imports, codec init) before counting.
    backend.decode_frames(decoder_sources["mp4"], [0])
    backend.load(FrameRequest(decoder_sources["mp4"], nframes=4))
    backend.decode_frames(decoder_sources["jpeg"], [0])
    before = len(os.listdir("/proc/self/fd"))
    for i in range(50):
        source = decoder_sources[keys[i % len(keys)]]
        backend.decode_frames(source, [i % N, 0])
        if source != decoder_sources["jpeg"]:
            backend.load(FrameRequest(source, nframes=4))
        if i % 10 == 0:
            backend.video_info(decoder_sources["webm"])
            with pytest.raises(VideoDecodeError):
                backend.decode_frames(str(garbage), [0])
            with pytest.raises(VideoDecodeError):
                backend.decode_frames(decoder_sources["mp4"], [N + 5])
    assert len(os.listdir("/proc/self/fd")) == before
