"""decode_cpu (PyAV, PIL) and the shared decode steps it is made of: pixels, resize, image modes, region boxes.

The checks every backend passes (exact frames, plans, errors, leaks) are in test_decoders.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from medgrpo.data import sampling
from medgrpo.data.decode import FrameRequest, VideoDecodeError, list_frame_files, resize_frames
from medgrpo.data.decode_cpu import decode_frames, load_video_sample
from medgrpo.data.records import RegionCaptionInfo
from medgrpo.testing.video_fixtures import CLIP_FRAMES as N
from medgrpo.testing.video_fixtures import CLIP_SIZE as SIZE
from medgrpo.testing.video_fixtures import barcode_frame, read_barcode, write_jpeg_folder, write_video

VIDEOS = ["mp4", "webm", "avi", "mkv"]


def _barcodes(frames: torch.Tensor) -> list[int]:
    return [read_barcode(frame.numpy()) for frame in frames]


def test_fixture_barcode_roundtrip():
    for i in (0, 1, 2, 255, 1000, 65535):
        assert read_barcode(barcode_frame(i, SIZE)) == i


@pytest.mark.parametrize("key", VIDEOS)
def test_pixels_agree_across_backends(decoder_sources, key):
    indices = [0, 7, 21, N - 1]
    reference = decode_frames(decoder_sources["jpeg"], indices).float()
    decoded = decode_frames(decoder_sources[key], indices).float()
    exact = torch.from_numpy(np.stack([barcode_frame(i, SIZE) for i in indices])).float()
    # Tolerance: mean absolute difference under 8 levels (of 255) per frame.
    assert (decoded - reference).abs().mean(dim=(1, 2, 3)).max() < 8
    assert (decoded - exact).abs().mean(dim=(1, 2, 3)).max() < 8


def test_large_source_resized_matches_plan(tmp_path):
    size = (448, 256)  # 28-px bars
    path = write_video(tmp_path / "big.mp4", 12, 4, size, "libx264")
    frames, plan = load_video_sample(FrameRequest(path, fps=2.0, max_pixels=128 * 28 * 28))
    assert (plan.height, plan.width) != (size[1], size[0])
    assert tuple(frames.shape) == (plan.num_frames, plan.height, plan.width, 3)
    assert _barcodes(frames) == list(plan.indices)


def test_resize_frames_matches_float_interpolate():
    frames = torch.from_numpy(np.stack([barcode_frame(i, SIZE) for i in (1, 2)]))
    out = resize_frames(frames, 56, 84)
    assert tuple(out.shape) == (2, 56, 84, 3)
    ref = torch.nn.functional.interpolate(
        frames.permute(0, 3, 1, 2).float(), size=(56, 84), mode="bicubic", antialias=True
    )
    assert torch.equal(out, ref.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1))


def test_portrait_frames(tmp_path):
    size = (96, 160)  # width < height: 6-px bars
    video = write_video(tmp_path / "portrait.mp4", 8, 4, size, "libx264")
    folder = tmp_path / "portrait"
    write_jpeg_folder(folder, 8, size)
    for source in (video, str(folder)):
        frames = decode_frames(source, [0, 7, 3])
        assert tuple(frames.shape) == (3, 160, 96, 3)
        assert _barcodes(frames) == [0, 7, 3]
    frames, plan = load_video_sample(FrameRequest(video, nframes=4))
    assert plan.height > plan.width
    assert tuple(frames.shape) == (4, plan.height, plan.width, 3)


def test_grayscale_and_cmyk_jpegs_decode_to_rgb(tmp_path):
    rgb = barcode_frame(5, SIZE)
    grey_path, cmyk_path, palette_path = tmp_path / "a.jpg", tmp_path / "b.jpg", tmp_path / "c.png"
    Image.fromarray(rgb).convert("L").save(grey_path, quality=95)
    Image.fromarray(rgb).convert("CMYK").save(cmyk_path, quality=95)
    Image.fromarray(rgb).convert("P").save(palette_path)
    assert Image.open(grey_path).mode == "L" and Image.open(cmyk_path).mode == "CMYK"
    frames = decode_frames([str(grey_path), str(cmyk_path), str(palette_path)], [0, 1, 2])
    assert tuple(frames.shape) == (3, SIZE[1], SIZE[0], 3)
    assert _barcodes(frames) == [5, 5, 5]
    assert (frames.float() - torch.from_numpy(rgb).float()).abs().mean() < 8


def test_garbage_bytes(tmp_path):
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(VideoDecodeError, match="junk.mp4"):
        decode_frames(str(junk), [0])
    bad_jpeg = tmp_path / "bad.jpg"
    bad_jpeg.write_bytes(b"not a jpeg at all")
    with pytest.raises(VideoDecodeError, match="bad.jpg.*cannot read image"):
        decode_frames([str(bad_jpeg)], [0])


def test_region_box_on_frame_list_is_drawn_after_the_first_resize(decoder_sources):
    paths = list_frame_files(decoder_sources["jpeg"])[:6]
    box = RegionCaptionInfo(frame_index=2, bbox=(20.0, 10.0, 120.0, 70.0))
    plain, plan = load_video_sample(FrameRequest(paths, fps=2.0))
    boxed, boxed_plan = load_video_sample(FrameRequest(paths, fps=2.0, region_box=box))
    assert boxed_plan == plan
    changed = (boxed.to(torch.int16) - plain.to(torch.int16)).abs().amax(dim=(1, 2, 3))
    assert changed.nonzero().flatten().tolist() == [2]
    # The authors' order: PIL presize, PIL rectangle, then the video resize.
    pre_h, pre_w = sampling.frame_list_presize(SIZE[1], SIZE[0])
    with Image.open(paths[2]) as image:
        presized = image.convert("RGB").resize((pre_w, pre_h), Image.BICUBIC)
    from PIL import ImageDraw

    ImageDraw.Draw(presized).rectangle(box.bbox, outline=(0, 255, 0), width=8)
    expected = resize_frames(torch.from_numpy(np.array(presized))[None], plan.height, plan.width)
    assert torch.equal(boxed[2], expected[0])


def test_region_box_on_video_goes_on_the_nearest_sampled_frame(decoder_sources):
    path = decoder_sources["webm"]
    plain, plan = load_video_sample(FrameRequest(path, fps=1.0))
    target = plan.indices[1] + 1  # not sampled itself: the box goes on sampled frame 1
    box = RegionCaptionInfo(target, (0.0, 0.0, 80.0, 60.0))
    boxed, _ = load_video_sample(FrameRequest(path, fps=1.0, region_box=box))
    changed = (boxed.to(torch.int16) - plain.to(torch.int16)).abs().amax(dim=(1, 2, 3))
    assert changed.nonzero().flatten().tolist() == [1]
    assert boxed[1, 2, 2].tolist() == [0, 255, 0]
