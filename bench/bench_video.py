"""Video input: frames per second from file to ``pixel_values_videos`` on the device.

Inputs (generated once per session, barcode frames): 1080p H.264 clips of 10 s sampled at
2 fps (20 frames each; 4 s, 8 frames with ``MEDGRPO_BENCH_SIZE=small``, the CPU default)
and JPEG frame folders of 32 frames (640x480, the frame list used whole, at
``metadata.fps`` = 1), every frame resized to about 448x448 (``max_pixels = 448 * 448``), as
a MedGRPO prompt sees them. One batch = ``BATCH`` samples (8; small: 2); the reported rate
is sampled frames delivered per second.

Providers, side by side in one run:

* ``medgrpo``: the production path for the device. On CUDA with DALI installed: DALI
  (NVDEC / nvJPEG, resize on the GPU) and the patchify kernel. Elsewhere: the CPU
  fallback in ``N`` DataLoader worker processes (``N`` = the cores), uint8 frames copied to
  the device and patchified there.
* ``cpu_workers_<N>`` (GPU machines): the CPU fallback, as above, next to DALI.
* ``cpu_inline``: the CPU fallback in the calling process (no workers).
* ``qwen_vl_utils``: ``qwen_vl_utils.process_vision_info`` (decode, torchvision resize) then
  the Hugging Face ``Qwen2VLVideoProcessor`` (normalize + patch on the CPU), float pixels
  copied to the device. Needs torchvision; where it is missing (the CPU CI machine) the same
  steps run through their equivalents (PyAV decode of the same frames, torch bicubic
  antialias = torchvision's tensor resize, the processor's rescale/normalize/patch order in
  float32 on the CPU), reported as ``qwen_vl_utils_emulated``.

What a GRPO step needs (printed and stored with the results): 8 GPUs x ``prompts_per_gpu``
prompts x ``frames_per_prompt`` frames per step, over the step time. With the paper's
setting (G = 8 completions share one prompt's video) and a 7B step of ~20 s for 8 prompts
per GPU at 32 frames: 8 x 8 x 32 / 20 s = ~102 frames/s for the node.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from conftest import sized

from medgrpo.data.decode import FrameRequest
from medgrpo.data.decode_cpu import load_video_sample
from medgrpo.ops import reference
from medgrpo.ops.patchify import patchify
from medgrpo.testing.video_fixtures import write_jpeg_folder, write_video

MAX_PIXELS = 448 * 448
BATCH = int(os.environ.get("MEDGRPO_BENCH_VIDEO_BATCH", sized(small=2, full=8)))
H264_SECONDS, H264_FPS, SAMPLE_FPS = sized(small=4, full=10), 30, 2.0
ROUNDS = sized(small=3, full=None)  # a small run times 3 batches; a full one lets pytest-benchmark calibrate
JPEG_FRAMES, JPEG_SIZE = 32, (640, 480)
WORKERS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
NEEDED = {"gpus": 8, "prompts_per_gpu": 8, "frames_per_prompt": 32, "step_seconds": 20.0}


def needed_frames_per_second() -> float:
    """Frames/s a MedGRPO node consumes at the stated step (see the module docstring)."""
    n = NEEDED
    return n["gpus"] * n["prompts_per_gpu"] * n["frames_per_prompt"] / n["step_seconds"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, list]:
    root = tmp_path_factory.mktemp("bench_video")
    clips = [
        write_video(root / f"clip{i}.mp4", H264_SECONDS * H264_FPS, H264_FPS, (1920, 1080), "libx264") for i in range(2)
    ]
    folders = [write_jpeg_folder(root / f"frames{i}", JPEG_FRAMES, JPEG_SIZE) for i in range(2)]
    return {"h264_1080p": [clips[i % 2] for i in range(BATCH)], "jpeg_folder": [folders[i % 2] for i in range(BATCH)]}


def _options(kind: str) -> dict:
    if kind == "h264_1080p":
        return {"fps": SAMPLE_FPS, "max_pixels": MAX_PIXELS}
    return {"fps": 1.0, "max_pixels": MAX_PIXELS}


def _inline(sources: list, kind: str, device: str) -> int:
    frames = 0
    for source in sources:
        clip, _ = load_video_sample(FrameRequest(source, **_options(kind)))
        patchify(clip.to(device))
        frames += clip.shape[0]
    return frames


def _worker_load(job: tuple) -> torch.Tensor:
    source, kind = job
    return load_video_sample(FrameRequest(source, **_options(kind)))[0]


def _worker_init() -> None:
    # As DataLoader workers do: one intra-op thread per process. A forked child must not use the
    # parent's OpenMP pool (it would hang), and N processes x N threads oversubscribes the cores.
    torch.set_num_threads(1)


class _Workers:
    """A persistent pool of decoder processes (the DataLoader's workers, minus the batching)."""

    def __init__(self, count: int):
        import multiprocessing

        self.pool = multiprocessing.get_context("fork").Pool(count, initializer=_worker_init)

    def run(self, sources: list, kind: str, device: str) -> int:
        frames = 0
        for clip in self.pool.imap(_worker_load, [(s, kind) for s in sources]):
            patchify(clip.to(device, non_blocking=True))
            frames += clip.shape[0]
        return frames

    def close(self) -> None:
        self.pool.close()
        self.pool.join()


def _qwen_vl_utils_available() -> bool:
    try:
        import qwen_vl_utils  # noqa: F401
        import torchvision  # noqa: F401
    except Exception:  # noqa: BLE001 - torchvision may be missing or built for another torch
        return False
    return True


def _qwen_vl_utils(sources: list, kind: str, device: str) -> int:
    from qwen_vl_utils import process_vision_info
    from transformers import Qwen2VLVideoProcessor

    processor = Qwen2VLVideoProcessor(do_resize=False)
    frames = 0
    for source in sources:
        video = {
            "type": "video",
            "video": source if kind == "h264_1080p" else sorted(Path(source).iterdir()),
            "max_pixels": MAX_PIXELS,
            "fps": SAMPLE_FPS,
        }
        if kind != "h264_1080p":
            video["video"] = [str(p) for p in video["video"]]
            video["sample_fps"] = 1.0
        _, videos, _ = process_vision_info([{"role": "user", "content": [video]}], return_video_kwargs=True)
        out = processor(videos=videos, return_tensors="pt")
        out["pixel_values_videos"].to(device)
        frames += int(out["video_grid_thw"][0, 0]) * 2
    return frames


def _qwen_vl_utils_emulated(sources: list, kind: str, device: str) -> int:
    frames = 0
    for source in sources:
        clip, _ = load_video_sample(
            FrameRequest(source, **_options(kind))
        )  # same frames, resize = torch bicubic antialias
        pixels, _ = reference.patchify(clip)  # float32 rescale, normalize and patch on the CPU
        pixels.to(device)  # float32 rows: 4x the bytes of uint8 frames
        frames += clip.shape[0]
    return frames


def _dali_available() -> bool:
    if not torch.cuda.is_available():
        return False
    from medgrpo.data.decode_dali import dali_available

    return dali_available()


def _dali(sources: list, kind: str, device: str) -> int:
    from medgrpo.data import sampling
    from medgrpo.data.decode import list_frame_files, video_info
    from medgrpo.data.decode_dali import DaliVideoLoader

    plans = []
    for source in sources:
        if kind == "h264_1080p":
            total, fps, height, width = video_info(source)
            plans.append(sampling.plan_frames(total, fps, height, width, fps=SAMPLE_FPS, max_pixels=MAX_PIXELS))
        else:
            plans.append(
                sampling.plan_frame_list(
                    len(list_frame_files(source)), JPEG_SIZE[1], JPEG_SIZE[0], sample_fps=1.0, max_pixels=MAX_PIXELS
                )
            )
    frames = 0
    with DaliVideoLoader(
        sources, plans, batch_size=len(sources), device="gpu", num_threads=8, max_pixels=MAX_PIXELS
    ) as loader:
        for batch in loader:
            for clip, _, _ in batch:
                patchify(clip)
                frames += clip.shape[0]
    return frames


def _record(benchmark, frames: int, kind: str) -> None:
    rate = frames / benchmark.stats.stats.median if benchmark.stats is not None else None
    benchmark.extra_info.update(
        frames_per_batch=frames,
        frames_per_second=rate,
        needed_frames_per_second=needed_frames_per_second(),
        needed_setting=NEEDED,
    )
    if rate is not None:
        print(
            f"\n{kind} {benchmark.extra_info['provider']}: {rate:.1f} frames/s "
            f"(a node needs {needed_frames_per_second():.0f} frames/s)"
        )


PROVIDERS = ["medgrpo", "cpu_inline", "qwen_vl_utils"] + (["cpu_workers"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("kind", ["h264_1080p", "jpeg_folder"])
@pytest.mark.parametrize("provider", PROVIDERS)
def bench_video_to_pixels(measure, benchmark, inputs, device, kind, provider):
    sources = inputs[kind]
    params = {"kind": kind, "batch": BATCH, "max_pixels": MAX_PIXELS, "workers": WORKERS}
    workers = None
    name = provider
    if provider == "medgrpo" and _dali_available():
        fn = lambda: _dali(sources, kind, device)  # noqa: E731
        params["medgrpo_path"] = "dali"
    elif provider in ("medgrpo", "cpu_workers"):
        workers = _Workers(WORKERS)
        fn = lambda: workers.run(sources, kind, device)  # noqa: E731
        params["medgrpo_path"] = f"cpu fallback, {WORKERS} worker processes"
        name = provider if provider == "medgrpo" else f"cpu_workers_{WORKERS}"
    elif provider == "cpu_inline":
        fn = lambda: _inline(sources, kind, device)  # noqa: E731
    elif _qwen_vl_utils_available():
        fn = lambda: _qwen_vl_utils(sources, kind, device)  # noqa: E731
    else:
        fn = lambda: _qwen_vl_utils_emulated(sources, kind, device)  # noqa: E731
        name = "qwen_vl_utils_emulated"
    frames = fn()
    try:
        measure(fn, group=f"video_to_pixels[{kind}]", provider=name, params=params, warmup=1, rounds=ROUNDS)
    finally:
        if workers is not None:
            workers.close()
    _record(benchmark, frames, kind)
