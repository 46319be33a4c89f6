"""decode_cpu: every backend returns exactly the requested frames, sized as the sampling plan says.

Frames carry their own index as a barcode (medgrpo.testing.video_fixtures), so a decoder
returning a neighbouring frame (seek or B-frame reordering bugs) is caught exactly.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from medgrpo.data import sampling
from medgrpo.data.decode_cpu import (
    VideoDecodeError,
    decode_frames,
    load_video_sample,
    resize_frames,
    video_info,
)
from medgrpo.testing.video_fixtures import barcode_frame, read_barcode, write_jpeg_folder, write_video

N = 40
FPS = 10
SIZE = (160, 96)  # (width, height)
BACKENDS = [
    ("jpeg", None),
    ("libx264", "mp4"),
    ("libvpx-vp9", "webm"),
    ("mjpeg", "avi"),
    ("mjpeg", "mkv"),
]
INDEX_SETS = [
    [0],
    [N - 1],
    [0, N - 1],
    list(range(N)),
    [3, 3, 3],
    [17, 2, 39, 0, 17],  # unsorted, with repeats
    [1, 2, 3, 20, 21, 22],
]


def _barcodes(frames: torch.Tensor) -> list[int]:
    return [read_barcode(frame.numpy()) for frame in frames]


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("videos")
    out = {"jpeg": str(root / "frames")}
    write_jpeg_folder(out["jpeg"], N, SIZE)
    for codec, ext in BACKENDS[1:]:
        out[f"{codec}.{ext}"] = write_video(root / f"clip_{codec}.{ext}", N, FPS, SIZE, codec)
    return out


def _key(codec: str, ext: str | None) -> str:
    return codec if ext is None else f"{codec}.{ext}"


def test_fixture_barcode_roundtrip():
    for i in (0, 1, 2, 255, 1000, 65535):
        assert read_barcode(barcode_frame(i, SIZE)) == i


@pytest.mark.parametrize("codec,ext", BACKENDS)
@pytest.mark.parametrize("indices", INDEX_SETS, ids=lambda ix: ",".join(map(str, ix[:6])))
def test_decode_exact_indices(sources, codec, ext, indices):
    frames = decode_frames(sources[_key(codec, ext)], indices)
    assert frames.dtype == torch.uint8
    assert tuple(frames.shape) == (len(indices), SIZE[1], SIZE[0], 3)
    assert _barcodes(frames) == indices


def test_frame_list_source(sources):
    paths = sorted(os.path.join(sources["jpeg"], name) for name in os.listdir(sources["jpeg"]))
    assert _barcodes(decode_frames(paths, [5, 0, 39])) == [5, 0, 39]


@pytest.mark.parametrize("codec,ext", BACKENDS[1:])
def test_video_info(sources, codec, ext):
    total, fps, height, width = video_info(sources[_key(codec, ext)])
    assert (total, height, width) == (N, SIZE[1], SIZE[0])
    assert fps == pytest.approx(FPS)


@pytest.mark.parametrize("codec,ext", BACKENDS[1:])
def test_pixels_agree_across_backends(sources, codec, ext):
    indices = [0, 7, 21, N - 1]
    reference = decode_frames(sources["jpeg"], indices).float()
    decoded = decode_frames(sources[_key(codec, ext)], indices).float()
    exact = torch.from_numpy(np.stack([barcode_frame(i, SIZE) for i in indices])).float()
    # Tolerance: mean absolute difference under 8 levels (of 255) per frame.
    assert (decoded - reference).abs().mean(dim=(1, 2, 3)).max() < 8
    assert (decoded - exact).abs().mean(dim=(1, 2, 3)).max() < 8


@pytest.mark.parametrize(
    "codec,ext,nframes", [("jpeg", None, None)] + [(c, e, n) for c, e in BACKENDS[1:] for n in (None, 6)]
)
def test_load_video_sample_follows_plan(sources, codec, ext, nframes):
    source = sources[_key(codec, ext)]
    if ext is None:  # a frame folder: every frame, nframes does not apply
        frames, plan = load_video_sample(source, fps=FPS)
        assert plan == sampling.plan_frame_list(N, SIZE[1], SIZE[0], sample_fps=FPS)
    else:
        frames, plan = load_video_sample(source, fps=2.0, nframes=nframes)
        assert plan == sampling.plan_frames(N, FPS, SIZE[1], SIZE[0], fps=2.0, nframes=nframes)
    assert frames.dtype == torch.uint8
    assert tuple(frames.shape) == (plan.num_frames, plan.height, plan.width, 3)
    assert plan.num_frames % 2 == 0
    # 160 px wide -> plan width 140 or more: bars stay >= 8 px wide, so the barcode survives the resize.
    assert _barcodes(frames) == list(plan.indices)


def test_load_video_sample_clip_and_odd_frame_list(sources, tmp_path):
    frames, plan = load_video_sample(sources["libx264.mp4"], nframes=4, start_frame=10, end_frame=30)
    assert plan.indices == (10, 17, 23, 30)
    assert _barcodes(frames) == [10, 17, 23, 30]
    paths = write_jpeg_folder(tmp_path / "odd", 5, SIZE)
    frames, plan = load_video_sample(paths)
    assert plan.indices == (0, 1, 2, 3, 4, 4)
    assert _barcodes(frames) == [0, 1, 2, 3, 4, 4]
    with pytest.raises(ValueError, match="frame lists"):
        load_video_sample(paths, start_frame=1)


def test_large_source_resized_matches_plan(tmp_path):
    size = (448, 256)  # 28-px bars
    path = write_video(tmp_path / "big.mp4", 12, 4, size, "libx264")
    frames, plan = load_video_sample(path, fps=2.0, max_pixels=128 * 28 * 28)
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
    frames, plan = load_video_sample(video, nframes=4)
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


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.mp4"
    with pytest.raises(VideoDecodeError, match="nope.mp4.*no such file") as info:
        decode_frames(str(missing), [0])
    assert info.value.path == str(missing)
    with pytest.raises(VideoDecodeError, match="no such file"):
        video_info(missing)
    with pytest.raises(VideoDecodeError, match="no such file"):
        load_video_sample(str(missing))
    with pytest.raises(VideoDecodeError, match="missing.jpg.*no such file"):
        decode_frames([str(tmp_path / "missing.jpg")], [0])


def test_truncated_mp4(tmp_path, sources):
    data = open(sources["libx264.mp4"], "rb").read()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(VideoDecodeError, match="cut.mp4"):
        video_info(cut)
    with pytest.raises(VideoDecodeError, match="cut.mp4"):
        decode_frames(str(cut), [0])


def test_truncated_webm_index_beyond_decoded(tmp_path, sources):
    # Matroska has no index at the end: a cut file opens and decodes its first frames only.
    data = open(sources["libvpx-vp9.webm"], "rb").read()
    cut = tmp_path / "cut.webm"
    cut.write_bytes(data[: len(data) // 2])
    total = video_info(cut)[0]
    assert 0 < total < N
    assert _barcodes(decode_frames(str(cut), [0])) == [0]
    with pytest.raises(VideoDecodeError, match="cut.webm.*beyond the video"):
        decode_frames(str(cut), [N - 1])


def test_garbage_bytes(tmp_path):
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(VideoDecodeError, match="junk.mp4"):
        decode_frames(str(junk), [0])
    with pytest.raises(VideoDecodeError, match="junk.mp4"):
        video_info(junk)
    bad_jpeg = tmp_path / "bad.jpg"
    bad_jpeg.write_bytes(b"not a jpeg at all")
    with pytest.raises(VideoDecodeError, match="bad.jpg.*cannot read image"):
        decode_frames([str(bad_jpeg)], [0])


def test_index_beyond_video(sources):
    for key in ("libx264.mp4", "mjpeg.mkv", "jpeg"):
        with pytest.raises(VideoDecodeError, match="beyond"):
            decode_frames(sources[key], [0, N])
    with pytest.raises(VideoDecodeError, match="negative"):
        decode_frames(sources["libx264.mp4"], [-1])
    with pytest.raises(VideoDecodeError, match="no frame indices"):
        decode_frames(sources["libx264.mp4"], [])


def test_empty_frame_list(tmp_path):
    with pytest.raises(VideoDecodeError, match="empty frame list"):
        decode_frames([], [0])
    with pytest.raises(VideoDecodeError, match="empty frame list"):
        load_video_sample([])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(VideoDecodeError, match="no images"):
        load_video_sample(str(empty))


def test_no_leaked_file_descriptors(sources, tmp_path):
    garbage = tmp_path / "junk.webm"
    garbage.write_bytes(b"\x1aE\xdf\xa3" + b"\x00" * 100)
    # Warm up (lazy imports, codec init) before counting.
    decode_frames(sources["libx264.mp4"], [0])
    decode_frames(sources["jpeg"], [0])
    before = len(os.listdir("/proc/self/fd"))
    for i in range(50):
        key = [_key(c, e) for c, e in BACKENDS][i % len(BACKENDS)]
        decode_frames(sources[key], [i % N, 0])
        if i % 10 == 0:
            video_info(sources["libvpx-vp9.webm"])
            with pytest.raises(VideoDecodeError):
                decode_frames(str(garbage), [0])
            with pytest.raises(VideoDecodeError):
                decode_frames(sources["libx264.mp4"], [N + 5])
    assert len(os.listdir("/proc/self/fd")) == before


def test_region_box_on_frame_list_is_drawn_after_the_first_resize(sources):
    from medgrpo.data.records import RegionCaptionInfo

    paths = sorted(os.path.join(sources["jpeg"], name) for name in os.listdir(sources["jpeg"]))[:6]
    box = RegionCaptionInfo(frame_index=2, bbox=(20.0, 10.0, 120.0, 70.0))
    plain, plan = load_video_sample(paths, fps=2.0)
    boxed, boxed_plan = load_video_sample(paths, fps=2.0, region_box=box)
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


def test_region_box_on_video_goes_on_the_nearest_sampled_frame(sources):
    from medgrpo.data.records import RegionCaptionInfo

    path = sources["libvpx-vp9.webm"]
    plain, plan = load_video_sample(path, fps=1.0)
    target = plan.indices[1] + 1  # not sampled itself: the box goes on sampled frame 1
    boxed, _ = load_video_sample(path, fps=1.0, region_box=RegionCaptionInfo(target, (0.0, 0.0, 80.0, 60.0)))
    changed = (boxed.to(torch.int16) - plain.to(torch.int16)).abs().amax(dim=(1, 2, 3))
    assert changed.nonzero().flatten().tolist() == [1]
    assert boxed[1, 2, 2].tolist() == [0, 255, 0]
