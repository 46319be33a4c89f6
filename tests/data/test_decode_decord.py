"""decode_decord: decord's frames agree with PyAV's, pixel for pixel within tolerance.

The checks every backend passes (exact frames, plans, errors, leaks) are in test_decoders.py.
"""

from __future__ import annotations

import pytest
import torch

# PyAV first: decord imported before it breaks PyAV's VP9 encoder (used by the fixtures of
# this and later test modules) in the whole process; see medgrpo.data.decode_decord.
pytest.importorskip("av")
pytest.importorskip("decord")

from medgrpo.data import decode_cpu  # noqa: E402
from medgrpo.data.decode import FrameRequest  # noqa: E402
from medgrpo.data.decode_decord import decode_frames, load_video_sample  # noqa: E402
from medgrpo.data.records import RegionCaptionInfo  # noqa: E402
from medgrpo.testing.video_fixtures import CLIP_FRAMES as N  # noqa: E402
from medgrpo.testing.video_fixtures import CLIP_SIZE as SIZE  # noqa: E402
from medgrpo.testing.video_fixtures import write_jpeg_folder  # noqa: E402

VIDEOS = ["mp4", "webm", "avi"]
# decord and PyAV both convert FFmpeg's YUV frames to RGB, with different swscale settings:
# measured max |decord - PyAV| = 0 levels on these fixtures (mean 0.0); allowed: mean 1, max 8.
PIXEL_MEAN_TOL = 1.0
PIXEL_MAX_TOL = 8


@pytest.mark.parametrize("key", VIDEOS)
def test_pixels_agree_with_pyav(decoder_sources, key):
    indices = [0, 7, 21, N - 1]
    ours = decode_frames(decoder_sources[key], indices).float()
    reference = decode_cpu.decode_frames(decoder_sources[key], indices).float()
    difference = (ours - reference).abs()
    assert difference.mean() <= PIXEL_MEAN_TOL
    assert difference.max() <= PIXEL_MAX_TOL


@pytest.mark.parametrize("key,nframes", [(key, n) for key in VIDEOS for n in (None, 6)])
def test_load_video_sample_same_as_pyav(decoder_sources, key, nframes):
    request = FrameRequest(decoder_sources[key], fps=2.0, nframes=nframes)
    frames, plan = load_video_sample(request)
    reference, reference_plan = decode_cpu.load_video_sample(request)
    assert plan == reference_plan
    assert (frames.float() - reference.float()).abs().max() <= PIXEL_MAX_TOL


def test_region_box_drawn_as_decode_cpu_draws_it(decoder_sources, tmp_path):
    box = RegionCaptionInfo(frame_index=11, bbox=(20.0, 10.0, 120.0, 70.0))
    boxed = FrameRequest(decoder_sources["mp4"], nframes=4, region_box=box)
    frames, plan = load_video_sample(boxed)
    reference, _ = decode_cpu.load_video_sample(boxed)
    plain, _ = load_video_sample(FrameRequest(decoder_sources["mp4"], nframes=4))
    assert (frames.float() - reference.float()).abs().max() <= PIXEL_MAX_TOL
    assert not torch.equal(frames, plain)
    paths = write_jpeg_folder(tmp_path / "boxed", 4, SIZE)
    request = FrameRequest(paths, region_box=RegionCaptionInfo(frame_index=1, bbox=(20.0, 10.0, 120.0, 70.0)))
    assert torch.equal(load_video_sample(request)[0], decode_cpu.load_video_sample(request)[0])
