"""sampling: the same frames, sizes and rates as qwen-vl-utils' own code, corner cases and errors.

qwen-vl-utils is run for real: ``fetch_video`` on a stand-in ``decord`` whose frames are
zero-stride arrays (a two-hour 1080p video costs no memory), and on lists of PIL images.
Its final resize is replaced by a function that records the size it is asked for, and, when
torchvision is not installed, torchvision (imported by qwen-vl-utils, unused by the code
compared here) is a stub module.
"""

from __future__ import annotations

import importlib.util
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

from medgrpo.data import sampling
from medgrpo.data.sampling import (
    FramePlan,
    frame_list_presize,
    frame_range,
    pad_to_even,
    plan_frame_list,
    plan_frames,
    second_per_grid_ts,
    smart_nframes,
    smart_resize,
    video_max_pixels,
)

AUTHORS_PIXELS = {"min_pixels": 8 * 28 * 28, "max_pixels": 48 * 28 * 28}  # the MedGRPO authors' inference


def _torchvision_stub() -> dict[str, types.ModuleType]:
    torchvision = types.ModuleType("torchvision")
    torchvision.__version__ = "0.0.0+stub"
    io = types.ModuleType("torchvision.io")

    def read_video(*args, **kwargs):
        raise RuntimeError("torchvision is a stub in these tests")

    io.read_video = read_video
    transforms = types.ModuleType("torchvision.transforms")
    transforms.InterpolationMode = types.SimpleNamespace(BICUBIC="bicubic")
    transforms.functional = types.SimpleNamespace(resize=read_video)
    torchvision.io, torchvision.transforms = io, transforms
    return {"torchvision": torchvision, "torchvision.io": io, "torchvision.transforms": transforms}


@pytest.fixture(scope="module")
def vp():
    """qwen_vl_utils.vision_process, imported without leaving stubs in sys.modules."""
    packages = ("torchvision", "qwen_vl_utils")
    saved = {name: module for name, module in sys.modules.items() if name.split(".")[0] in packages}
    stubs = {} if importlib.util.find_spec("torchvision") else _torchvision_stub()
    sys.modules.update(stubs)
    try:
        module = pytest.importorskip("qwen_vl_utils.vision_process")
    finally:
        for name in [name for name in sys.modules if name.split(".")[0] in packages]:
            del sys.modules[name]
        sys.modules.update(saved)
    return module


class _TorchWithoutCopy:
    """torch, except that torch.tensor(array) wraps the array instead of copying it."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def tensor(data):
        return torch.from_numpy(data)


def _fake_decord(total_frames: int, video_fps: float, height: int, width: int) -> types.ModuleType:
    """A decord module whose one video has these properties and zero-stride (free) frames."""

    class Batch:
        def __init__(self, count: int):
            self.count = count

        def asnumpy(self) -> np.ndarray:
            pixel = np.zeros(3, dtype=np.uint8)
            return np.lib.stride_tricks.as_strided(pixel, (self.count, height, width, 3), (0, 0, 0, 1), writeable=True)

    class VideoReader:
        def __init__(self, path: str):
            pass

        def __len__(self) -> int:
            return total_frames

        def get_avg_fps(self) -> float:
            return video_fps

        def get_batch(self, indices: list[int]) -> Batch:
            return Batch(len(indices))

    module = types.ModuleType("decord")
    module.VideoReader = VideoReader
    return module


@pytest.fixture
def qwen(vp, monkeypatch):
    """qwen-vl-utils' fetch_video, its resize recorded instead of run."""
    seen = {}

    def resize(video, size, interpolation, antialias):
        assert interpolation == vp.InterpolationMode.BICUBIC and antialias
        seen["video"], seen["size"] = video, tuple(size)
        return torch.empty(1).expand(*video.shape[:2], *size)

    monkeypatch.setattr(vp, "transforms", types.SimpleNamespace(functional=types.SimpleNamespace(resize=resize)))
    monkeypatch.setattr(vp, "torch", _TorchWithoutCopy())
    monkeypatch.setattr(vp, "get_video_reader_backend", lambda: "decord")

    class Qwen:
        def video(self, total_frames, video_fps, height, width, **options):
            """(indices, height, width, sample_fps) that qwen-vl-utils picks for a video file."""
            monkeypatch.setitem(sys.modules, "decord", _fake_decord(total_frames, video_fps, height, width))
            ele = {"type": "video", "video": "file:///fake.mp4", **options}
            (_, metadata), sample_fps = vp.fetch_video(ele, return_video_sample_fps=True, return_video_metadata=True)
            return (tuple(metadata["frames_indices"]), *seen["size"], sample_fps)

        def video_raises(self, total_frames, video_fps, height, width, **options) -> bool:
            """Whether qwen-vl-utils refuses the request (reader and resize, without its fallback)."""
            monkeypatch.setitem(sys.modules, "decord", _fake_decord(total_frames, video_fps, height, width))
            ele = {"video": "fake.mp4", **options}
            try:
                vp._read_video_decord(ele)
                self.video(total_frames, video_fps, height, width, **options)
            except (ValueError, AssertionError):
                return True
            return False

        def frame_list(self, images, **options):
            """(source frame of each output frame, height, width, sample_fps) for a list of images."""
            ele = {"type": "video", "video": images, **options}
            _, sample_fps = vp.fetch_video(ele, return_video_sample_fps=True)
            sources = tuple(int(round((int(v) - 5) / 10)) for v in seen["video"][:, 0, 0, 0])
            return (sources, *seen["size"], sample_fps)

    return Qwen()


VIDEO_CASES = {
    "1080p_30fps_60s": (1800, 30.0, 1080, 1920, {}),
    "4:3_25fps": (500, 25.0, 480, 640, {}),
    "9:16_portrait": (900, 30.0, 1920, 1080, {}),
    "odd_size_29.97fps": (1000, 29.97, 405, 721, {}),
    "tiny_frames_upscaled": (120, 24.0, 37, 53, {}),
    "4k_60fps": (3000, 60.0, 2160, 3840, {}),
    "aspect_ratio_200": (100, 10.0, 10, 2000, {}),
    "short_1s_below_min_frames": (30, 30.0, 720, 1280, {}),
    "short_5_frames": (5, 30.0, 480, 640, {}),
    "short_3_frames": (3, 25.0, 480, 640, {}),
    "short_2_frames": (2, 1.0, 480, 640, {}),
    "long_400s_over_768": (10000, 25.0, 720, 1280, {}),
    "long_2h_over_768": (180000, 25.0, 1080, 1920, {}),
    "fractional_fps_23.976": (7193, 23.976, 1080, 1920, {}),
    "fps_option_1": (3000, 30.0, 480, 854, {"fps": 1.0}),
    "fps_option_above_video_fps": (100, 2.0, 480, 854, {"fps": 4.0}),
    "min_max_frames": (3000, 30.0, 480, 854, {"min_frames": 9, "max_frames": 33}),
    "nframes_16": (1000, 30.0, 480, 640, {"nframes": 16}),
    "nframes_5_rounds_to_4": (1000, 30.0, 480, 640, {"nframes": 5}),
    "nframes_7_rounds_to_8": (1000, 30.0, 480, 640, {"nframes": 7}),
    "nframes_every_frame": (100, 25.0, 480, 640, {"nframes": 100}),
    "authors_pixel_budget": (1800, 30.0, 480, 854, dict(AUTHORS_PIXELS)),
    "small_total_pixels": (18000, 30.0, 1080, 1920, {"total_pixels": 20480 * 28 * 28}),
    "max_pixels_above_dynamic_cap": (3000, 30.0, 1080, 1920, {"max_pixels": 4096 * 28 * 28}),
    "min_pixels_raised": (600, 30.0, 240, 320, {"min_pixels": 256 * 28 * 28}),
    "clip_seconds": (3000, 25.0, 720, 1280, {"video_start": 4.0, "video_end": 20.0}),
    "clip_fractional_seconds": (3000, 29.97, 720, 1280, {"video_start": 1.37, "video_end": 7.25}),
    "clip_start_only": (3000, 29.97, 720, 1280, {"video_start": 10.5}),
    "clip_end_only": (3000, 30.0, 720, 1280, {"video_end": 3.3}),
    "clip_end_past_video": (500, 25.0, 480, 640, {"video_start": 2.0, "video_end": 1000.0}),
    "clip_negative_start": (500, 25.0, 480, 640, {"video_start": -3.0, "video_end": 5.0}),
    "clip_with_nframes": (3000, 25.0, 480, 640, {"video_start": 2.0, "video_end": 6.0, "nframes": 8}),
    "clip_far_frames_float32": (400000, 30.0, 720, 1280, {"video_start": 10000.0, "video_end": 13000.0}),
}


@pytest.mark.parametrize("case", VIDEO_CASES.values(), ids=VIDEO_CASES.keys())
def test_plan_frames_equals_qwen_fetch_video(qwen, case):
    total_frames, video_fps, height, width, options = case
    plan = plan_frames(total_frames, video_fps, height, width, **options)
    indices, want_height, want_width, want_fps = qwen.video(total_frames, video_fps, height, width, **options)
    assert plan.indices == indices
    assert (plan.height, plan.width) == (want_height, want_width)
    assert plan.sample_fps == want_fps


def test_corner_cases_do_what_the_table_says(qwen):
    assert plan_frames(*VIDEO_CASES["short_1s_below_min_frames"][:4]).num_frames == 4
    assert plan_frames(*VIDEO_CASES["short_3_frames"][:4]).indices == (0, 2)
    assert plan_frames(*VIDEO_CASES["long_2h_over_768"][:4]).num_frames == 768
    assert plan_frames(1000, 30.0, 480, 640, nframes=5).num_frames == 4


@pytest.mark.parametrize(
    ("frames", "seconds"),
    [
        ({"start_frame": 100, "end_frame": 500}, {"video_start": 4.0, "video_end": 20.0}),
        ({"start_frame": 250}, {"video_start": 10.0}),
        ({"end_frame": 75}, {"video_end": 3.0}),
        ({"start_frame": 50, "end_frame": 10**6}, {"video_start": 2.0, "video_end": 10**6}),
    ],
)
def test_clip_in_frames_equals_qwen_clip_in_seconds(qwen, frames, seconds):
    # At 25 fps whole seconds are exact frame numbers, so both clips are the same frames.
    plan = plan_frames(3000, 25.0, 720, 1280, **frames)
    assert plan == plan_frames(3000, 25.0, 720, 1280, **seconds)
    indices, height, width, sample_fps = qwen.video(3000, 25.0, 720, 1280, **seconds)
    assert plan == FramePlan(indices, height, width, sample_fps)


IMPOSSIBLE_VIDEOS = {
    "one_frame": (1, 30.0, 480, 640, {}),
    "nframes_above_total": (100, 25.0, 480, 640, {"nframes": 200}),
    "nframes_1_rounds_to_0": (100, 25.0, 480, 640, {"nframes": 1}),
    "clip_start_after_end": (3000, 25.0, 480, 640, {"video_start": 10.0, "video_end": 5.0}),
    "clip_start_past_video": (500, 25.0, 480, 640, {"video_start": 1000.0}),
    "clip_one_frame": (500, 25.0, 480, 640, {"video_start": 2.0, "video_end": 2.0}),
    "zero_fps": (500, 0.0, 480, 640, {}),
    "aspect_ratio_above_200": (100, 10.0, 10, 2010, {}),
    "max_pixels_below_min_pixels": (500, 25.0, 480, 640, {"min_pixels": 256 * 784, "max_pixels": 64 * 784}),
}


@pytest.mark.parametrize("case", IMPOSSIBLE_VIDEOS.values(), ids=IMPOSSIBLE_VIDEOS.keys())
def test_impossible_requests_raise_like_qwen(qwen, case):
    total_frames, video_fps, height, width, options = case
    assert qwen.video_raises(total_frames, video_fps, height, width, **options)
    with pytest.raises(ValueError):
        plan_frames(total_frames, video_fps, height, width, **options)


def test_impossible_frame_clips_raise():
    with pytest.raises(ValueError, match="not before"):
        plan_frames(500, 25.0, 480, 640, start_frame=300, end_frame=300)
    with pytest.raises(ValueError, match="not before"):
        plan_frames(500, 25.0, 480, 640, start_frame=600)
    with pytest.raises(ValueError, match=">= 0"):
        plan_frames(500, 25.0, 480, 640, start_frame=-1, end_frame=10)
    with pytest.raises(ValueError, match="not both"):
        plan_frames(500, 25.0, 480, 640, start_frame=1, video_end=3.0)


def _result_or_error(function, *args, **kwargs):
    try:
        return function(*args, **kwargs)
    except (ValueError, AssertionError):
        return "error"


@pytest.mark.parametrize("video_fps", [1.0, 2.5, 23.976, 25.0, 29.97, 60.0])
def test_smart_nframes_equals_qwen_on_a_grid(vp, video_fps):
    totals = [1, 2, 3, 4, 5, 6, 7, 8, 9, 15, 16, 30, 59, 61, 100, 767, 768, 769, 1535, 1537, 10000, 200000]
    options = [{}, {"fps": 1.0}, {"fps": 0.5}, {"fps": 4.0, "min_frames": 3, "max_frames": 17}, {"max_frames": 64}]
    options += [{"nframes": n} for n in (1, 2, 3, 4, 5, 7, 8, 9, 100, 768)]
    for total in totals:
        for option in options:
            want = _result_or_error(vp.smart_nframes, option, total, video_fps)
            got = _result_or_error(smart_nframes, total, video_fps, **option)
            assert got == want, (total, video_fps, option)


@pytest.mark.parametrize("factor", [28, 56])
def test_smart_resize_equals_qwen_on_a_grid(vp, factor):
    sides = [1, 10, 14, 27, 28, 29, 37, 42, 53, 70, 98, 224, 405, 480, 721, 854, 1080, 1920, 2001, 2010, 3840]
    budgets = [{}, {"min_pixels": 128 * 784, "max_pixels": 768 * 784}, AUTHORS_PIXELS, {"max_pixels": 300.0}]
    for height in sides:
        for width in sides:
            for budget in budgets:
                want = _result_or_error(vp.smart_resize, height, width, factor, **budget)
                got = _result_or_error(smart_resize, height, width, factor, **budget)
                assert got == want, (height, width, factor, budget)


def test_frame_range_in_seconds_equals_qwen(vp):
    for total, fps in [(3000, 25.0), (1798, 29.97), (100, 23.976), (7, 2.5)]:
        for start in (None, -1.0, 0.0, 0.04, 1.37, 2.0, 50.0, 1e6):
            for end in (None, -1.0, 0.5, 3.0, 7.25, 40.0, 1e6):
                ele = {k: v for k, v in (("video_start", start), ("video_end", end)) if v is not None}
                want = _result_or_error(vp.calculate_video_frame_range, ele, total, fps)
                got = _result_or_error(frame_range, total, fps, **ele)
                if want != "error":
                    want = want[:2]
                assert got == want, (total, fps, ele)


def _solid_frames(count: int, height: int, width: int) -> list[Image.Image]:
    return [Image.new("RGB", (width, height), (10 * i + 5, 0, 0)) for i in range(count)]


FRAME_LIST_CASES = {
    "one_frame_padded": (1, 480, 640, {}),
    "odd_count_authors_budget": (3, 480, 854, {"sample_fps": 1.0, **AUTHORS_PIXELS}),
    "odd_size_half_fps": (5, 405, 721, {"sample_fps": 0.5}),
    "portrait_max_pixels_only": (6, 1280, 720, {"sample_fps": 1.0, "max_pixels": 256 * 784}),
    "tiny_upscaled": (4, 37, 53, {}),
    "small_total_pixels": (7, 300, 400, {"sample_fps": 3.0, "total_pixels": 2 * 128 * 784}),
    "1080p": (2, 1080, 1920, {"sample_fps": 2.0}),
}


@pytest.mark.parametrize("case", FRAME_LIST_CASES.values(), ids=FRAME_LIST_CASES.keys())
def test_plan_frame_list_equals_qwen_fetch_video(qwen, case):
    count, height, width, options = case
    plan = plan_frame_list(count, height, width, **options)
    sources, want_height, want_width, want_fps = qwen.frame_list(_solid_frames(count, height, width), **options)
    assert plan.indices == sources
    assert (plan.height, plan.width) == (want_height, want_width)
    assert plan.sample_fps == float(want_fps)


def test_frame_lists_are_resized_twice_like_qwen_vl_utils():
    # 480x854 with the authors' budget: first to multiples of 56 (112x224), then kept by the
    # video step; a video file of that size gets 140x252 under the same budget.
    assert frame_list_presize(480, 854, **AUTHORS_PIXELS) == (112, 224)
    frame_list = plan_frame_list(3, 480, 854, **AUTHORS_PIXELS)
    video_file = plan_frames(300, 30.0, 480, 854, **AUTHORS_PIXELS)
    assert (frame_list.height, frame_list.width) == (112, 224)
    assert (video_file.height, video_file.width) == (140, 252)


def test_frame_list_padding_and_rates():
    plan = plan_frame_list(3, 480, 640, sample_fps=1)
    assert plan.indices == (0, 1, 2, 2) and plan.sample_fps == 1.0 and plan.second_per_grid_ts == 2.0
    assert plan_frame_list(4, 480, 640).indices == (0, 1, 2, 3)
    assert pad_to_even(["a"]) == ["a", "a"] and pad_to_even([]) == [] and pad_to_even("ab") == ["a", "b"]
    with pytest.raises(ValueError):
        plan_frame_list(0, 480, 640)


def test_budget_and_rates_by_hand():
    # 768 frames share 128000 * 0.9 tokens: 300 tokens per frame, at most 768, at least 1.05 * min.
    assert video_max_pixels(768) == 90316800.0 / 768 * 2
    assert video_max_pixels(4) == sampling.VIDEO_MAX_PIXELS
    assert video_max_pixels(768, total_pixels=1000.0) == int(sampling.VIDEO_MIN_PIXELS * 1.05)
    assert video_max_pixels(4, max_pixels=48 * 784) == 48 * 784
    assert second_per_grid_ts(2.0) == 1.0 and second_per_grid_ts(0.5, temporal_patch_size=2) == 4.0
    plan = plan_frames(60, 30.0, 1080, 1920)  # 2 s at 30 fps: 4 frames, 2 per second
    assert plan.indices == (0, 20, 39, 59) and plan.sample_fps == 2.0 and plan.second_per_grid_ts == 1.0
    assert smart_resize(70, 70) == (56, 56)  # round(2.5) == 2: ties to even, as qwen-vl-utils
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(10, 2010)


def test_constants_match_qwen_vl_utils(vp):
    names = ["MAX_RATIO", "SPATIAL_MERGE_SIZE", "IMAGE_MIN_TOKEN_NUM", "IMAGE_MAX_TOKEN_NUM", "VIDEO_MIN_TOKEN_NUM"]
    names += ["VIDEO_MAX_TOKEN_NUM", "FPS", "FRAME_FACTOR", "FPS_MIN_FRAMES", "FPS_MAX_FRAMES"]
    for name in names:
        assert getattr(sampling, name) == getattr(vp, name), name
    if vp.MODEL_SEQ_LEN != sampling.MODEL_SEQ_LEN:
        pytest.skip("MODEL_SEQ_LEN is set in the environment")
    assert sampling.VIDEO_TOTAL_PIXELS == vp.MODEL_SEQ_LEN * 28 * 28 * 0.9
