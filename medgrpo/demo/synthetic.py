"""The synthetic MedVidBench dataset of ``medgrpo demo``: rendered procedures, known answers.

Two rendered procedures (``SynthCholec``, ``SynthNurse``) cut into short videos, with questions
whose rewards sit at very different levels, as MedVidBench's do: next_action and cvs_assessment
(classification), tal (temporal localization) on SynthCholec; stg (grounding a small instrument on a
coarse grid) and video_summary (a caption scored by sentence similarity) on SynthNurse. Answers are in
the authors' formats and ``struc_info`` is what the official evaluator reads; the same seed gives the
same bytes. What each phase looks like, the questions, time and box conventions, the files and the
decoding budget: docs/design-demo.md.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from medgrpo.data.loader import DecodeOptions
from medgrpo.data.records import RecordDataset, VideoRecord
from medgrpo.rewards.parsers import CVS_COMPONENTS

GENERATOR_VERSION = 3
FRAME_SIZE = (112, 112)
FRAMES_PER_VIDEO = 8
FPS = 1.0
NUM_VIDEOS = 40
SPLIT_FRACTIONS = (0.6, 0.2, 0.2)
SPLITS = ("train", "val", "test")
DECODE_SIDE = 56
JPEG_QUALITY = 92
STG_TIMES = 1
STG_GRID = 8  # a still instrument's box lies on a grid of frame_size / STG_GRID pixels
MANIFEST = "manifest.json"
Box = tuple[int, int, int, int]
RGB = tuple[int, int, int]


@dataclass(frozen=True)
class Instrument:
    """A flat bar: body colour, tip colour (at its leading end), size as fractions of the frame,
    and the band of the frame its top edge stays in (fractions of the free height), which
    keeps instruments of one phase from hiding each other. A ``still`` instrument does not
    move: it sits on the :data:`STG_GRID` grid anywhere in the frame, drawn over the others
    (the stg questions ask where it is)."""

    name: str
    color: RGB
    tip: RGB
    width: float
    height: float
    band: tuple[float, float] = (0.0, 1.0)
    still: bool = False


@dataclass(frozen=True)
class Procedure:
    """One synthetic data source: its phases in order, their background tints and instruments."""

    data_source: str
    phases: tuple[str, ...]
    tints: tuple[RGB, ...]
    instruments: tuple[Instrument, ...]
    tools: tuple[tuple[str, ...], ...]  # instrument names visible in each phase
    qa_types: tuple[str, ...]
    has_cvs: bool = False
    summaries: tuple[str, ...] = ()  # the video summary's sentence for each phase

    def instrument(self, name: str) -> Instrument:
        return next(i for i in self.instruments if i.name == name)


SYNTH_CHOLEC = Procedure(
    data_source="SynthCholec",
    phases=("preparation", "dissection", "clipping", "retraction"),
    tints=((205, 125, 115), (165, 45, 40), (200, 170, 80), (115, 60, 125)),
    instruments=(
        Instrument("grasper", (165, 165, 170), (60, 60, 65), 0.36, 0.10, (0.0, 0.4)),
        Instrument("hook", (45, 80, 215), (235, 235, 240), 0.10, 0.34, (0.6, 1.0)),
        Instrument("clipper", (50, 175, 80), (20, 90, 40), 0.30, 0.12, (0.6, 1.0)),
    ),
    tools=(("grasper",), ("grasper", "hook"), ("grasper", "clipper"), ("grasper",)),
    qa_types=("tal", "next_action", "cvs_assessment"),
    has_cvs=True,
)
SYNTH_NURSE = Procedure(
    data_source="SynthNurse",
    phases=("handwashing", "injection", "dressing"),
    # Handwashing's tint is far from the others; injection and dressing have close tints (14 levels apart)
    # and are told apart mostly by their instrument (a thin white syringe, a cream gauze patch).
    tints=((105, 150, 195), (188, 178, 150), (178, 188, 150)),
    instruments=(
        Instrument("glove", (150, 80, 200), (95, 40, 140), 0.375, 0.375, still=True),
        Instrument("syringe", (245, 245, 245), (210, 30, 30), 0.34, 0.08, (0.6, 1.0)),
        Instrument("gauze", (250, 245, 215), (215, 205, 170), 0.26, 0.20, (0.6, 1.0)),
    ),
    tools=(("glove",), ("syringe", "glove"), ("gauze", "glove")),
    qa_types=("stg", "video_summary"),
    summaries=("Hands are scrubbed with soap.", "A needle enters the arm.", "Gauze covers the wound."),
)
PROCEDURES = (SYNTH_CHOLEC, SYNTH_NURSE)


@dataclass(frozen=True)
class Scene:
    """Everything random about one video, drawn before any pixel is rendered.

    ``phase_of_frame[i]`` is the phase index of window frame ``i``; ``boxes[name][i]`` the
    box of that instrument on frame ``i`` (drawn only where the phase shows it); ``cvs``
    the three CVS component scores (SynthCholec) or None.
    """

    procedure: Procedure
    video_id: str
    start_frame: int
    phase_of_frame: tuple[int, ...]
    boxes: Mapping[str, tuple[Box, ...]]
    cvs: tuple[int, int, int] | None
    texture: tuple[float, float, float, float]  # x frequency, y frequency, phase, brightness

    def visible(self, name: str) -> list[int]:
        """Window frames on which instrument ``name`` is drawn."""
        tools = self.procedure.tools
        return [i for i, p in enumerate(self.phase_of_frame) if name in tools[p]]


@dataclass(frozen=True)
class DemoDataset:
    """A generated demo dataset: its ``root`` and the JSON-lines file of each split."""

    root: Path
    train: Path
    val: Path
    test: Path

    @classmethod
    def at(cls, root: str | os.PathLike[str]) -> DemoDataset:
        """The dataset written by :func:`generate_dataset` under ``root`` (files must exist)."""
        root = Path(root)
        dataset = cls(root, *(root / f"{split}.jsonl" for split in SPLITS))
        missing = [str(p) for p in (root / MANIFEST, dataset.train, dataset.val, dataset.test) if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"not a generated demo dataset, missing: {', '.join(missing)}")
        return dataset

    @property
    def splits(self) -> dict[str, Path]:
        return {"train": self.train, "val": self.val, "test": self.test}

    def records(self, split: str) -> RecordDataset:
        """The records of ``split`` ("train", "val" or "test"), paths resolved against ``root``."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return RecordDataset(self.splits[split], root=self.root)

    def manifest(self) -> dict[str, Any]:
        """The generation parameters and record counts written beside the splits."""
        return json.loads((self.root / MANIFEST).read_text())


# --- scene planning ------------------------------------------------------------------------


def _phase_lengths(num_phases: int, frames: int, rng: np.random.Generator) -> list[int]:
    """Phase durations in frames, each 30-60% of a window (at least 2)."""
    low = max(2, round(0.3 * frames))
    high = max(low, round(0.6 * frames))
    return [int(n) for n in rng.integers(low, high + 1, size=num_phases)]


def _window(lengths: list[int], frames: int, last_phase: int, rng: np.random.Generator) -> tuple[list[int], int]:
    """The procedure's phase per frame and the first frame of the video's window.

    The window's last frame falls in phase ``last_phase``, at a uniform frame of it; the
    first phase is lengthened when the window would otherwise start before the procedure does.
    """
    end = sum(lengths[:last_phase]) + int(rng.integers(lengths[last_phase]))
    lengths = [lengths[0] + max(0, frames - 1 - end), *lengths[1:]]
    end += max(0, frames - 1 - end)
    timeline = [p for p, n in enumerate(lengths) for _ in range(n)]
    return timeline, end - frames + 1


def _still_box(instrument: Instrument, size: tuple[int, int], rng: np.random.Generator) -> Box:
    """A still instrument's box: its size rounded to whole grid cells, at a uniform cell of the grid."""
    cells = []
    for extent, fraction in zip(size, (instrument.width, instrument.height)):
        cell = extent / STG_GRID
        span = min(max(1, round(fraction * STG_GRID)), STG_GRID)
        start = int(rng.integers(STG_GRID - span + 1))
        cells.append((round(start * cell), round((start + span) * cell)))
    (x1, x2), (y1, y2) = cells
    return x1, y1, x2, y2


def _track(instrument: Instrument, size: tuple[int, int], frames: int, rng: np.random.Generator) -> tuple[Box, ...]:
    """Boxes of a bar moving on a straight line across the frame, one per window frame (the same box
    on every frame for a still instrument)."""
    if instrument.still:
        return (_still_box(instrument, size, rng),) * frames
    width, height = size
    w = max(2, round(instrument.width * width))
    h = max(2, round(instrument.height * height))
    span_x, span_y = width - w, height - h
    x0 = rng.uniform(0, 0.35) * span_x
    x1 = rng.uniform(0.65, 1.0) * span_x
    if rng.random() < 0.5:  # right to left as often as left to right
        x0, x1 = x1, x0
    y0, y1 = rng.uniform(*instrument.band, size=2) * span_y
    boxes = []
    for i in range(frames):
        s = i / max(frames - 1, 1)
        x, y = round(x0 + (x1 - x0) * s), round(y0 + (y1 - y0) * s)
        boxes.append((x, y, x + w, y + h))
    return tuple(boxes)


def plan_scene(
    procedure: Procedure,
    video_id: str,
    *,
    size: tuple[int, int],
    frames: int,
    rng: np.random.Generator,
    last_phase: int | None = None,
) -> Scene:
    """Draw one video's random choices: phase durations, window, instrument paths, CVS cues.

    ``last_phase``: the phase of the window's last frame (drawn uniformly when None). It
    decides the next_action answer; :func:`generate_dataset` cycles it over the phases so
    that the next_action labels are balanced.
    """
    if last_phase is None:
        last_phase = int(rng.integers(len(procedure.phases)))
    if not 0 <= last_phase < len(procedure.phases):
        raise ValueError(f"last_phase must index one of {procedure.phases}, got {last_phase}")
    timeline, start = _window(_phase_lengths(len(procedure.phases), frames, rng), frames, last_phase, rng)
    boxes = {i.name: _track(i, size, frames, rng) for i in procedure.instruments}
    cvs = tuple(int(v) for v in rng.integers(0, 3, size=3)) if procedure.has_cvs else None
    texture = (
        float(rng.uniform(1.0, 3.0)),
        float(rng.uniform(1.0, 3.0)),
        float(rng.uniform(0, 2 * math.pi)),
        float(rng.uniform(-8.0, 8.0)),
    )
    return Scene(procedure, video_id, start, tuple(timeline[start : start + frames]), boxes, cvs, texture)  # type: ignore[arg-type]


# --- rendering -----------------------------------------------------------------------------


def _ripples(scene: Scene, size: tuple[int, int]) -> np.ndarray:
    """The video's (H, W) tissue texture, the same on every frame: a diagonal ripple of +-10 levels."""
    width, height = size
    ys = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None]
    xs = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :]
    fx, fy, phase, _ = scene.texture
    return np.sin(2 * np.pi * (fx * xs + fy * ys) + phase) * 10.0


def _draw_cvs(image: np.ndarray, cvs: tuple[int, int, int]) -> None:
    """The CVS cues: ``cvs[0]`` yellow ducts, a pale patch of size ``cvs[1]``, a dark triangle of size
    ``cvs[2]``, each in its own region (ducts in the lower middle, patch bottom left, triangle top right)."""
    height, width, _ = image.shape
    duct = max(2, round(width * 0.09))
    for k in range(cvs[0]):
        x = round(width * (0.45 + 0.17 * k))
        image[round(height * 0.45) : round(height * 0.95), x : x + duct] = (245, 225, 90)
    if cvs[1]:
        pw, ph = round(width * 0.2 * cvs[1]), round(height * 0.16 * cvs[1])
        image[height - ph - 2 : height - 2, 2 : 2 + pw] = (240, 215, 205)
    if cvs[2]:
        side = round(min(width, height) * 0.2 * cvs[2])
        rows, cols = np.mgrid[0:side, 0:side]
        mask = cols >= rows  # upper-right half of the square: a right triangle in the top-right corner
        image[2 : 2 + side, width - side - 2 : width - 2][mask] = (45, 20, 25)


def _draw_instrument(image: np.ndarray, instrument: Instrument, box: Box, leading_right: bool) -> None:
    """A bar filling ``box`` exactly: body shaded across its short side, tip at its leading end."""
    x1, y1, x2, y2 = box
    w, h = x2 - x1, y2 - y1
    across = np.linspace(0.85, 1.1, h if w >= h else w, dtype=np.float32)
    shade = across[:, None] if w >= h else across[None, :]
    image[y1:y2, x1:x2] = np.asarray(instrument.color, np.float32) * shade[..., None]
    if w >= h:
        tip = max(1, w // 4)
        xs = slice(x2 - tip, x2) if leading_right else slice(x1, x1 + tip)
        image[y1:y2, xs] = instrument.tip
    else:
        image[y2 - max(1, h // 4) : y2, x1:x2] = instrument.tip


def render_frames(scene: Scene, size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """The video's frames as uint8 (T, H, W, 3): tinted tissue, CVS cues, instruments, sensor noise."""
    width, height = size
    procedure = scene.procedure
    ys = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    light = 1.08 - 0.22 * ys  # brighter at the top, as under an endoscope's light
    ripple = _ripples(scene, size)[..., None]
    frames = np.empty((len(scene.phase_of_frame), height, width, 3), np.uint8)
    for i, phase in enumerate(scene.phase_of_frame):
        image = np.asarray(procedure.tints[phase], np.float32) * light + ripple + scene.texture[3]
        image = np.broadcast_to(image, (height, width, 3)).copy()
        if scene.cvs is not None:
            _draw_cvs(image, scene.cvs)
        for name in procedure.tools[phase]:
            track = scene.boxes[name]
            _draw_instrument(image, procedure.instrument(name), track[i], track[-1][0] >= track[0][0])
        image += rng.normal(0.0, 5.0, size=image.shape).astype(np.float32)
        frames[i] = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    return frames


# --- questions and answers -----------------------------------------------------------------


@dataclass(frozen=True)
class QA:
    """One question about a scene, with its reference answer and structured ground truth."""

    qa_type: str
    question: str
    answer: str
    struc_info: Any


def _seconds(value: float) -> str:
    return f"{value:.1f}"


def tal_qa(scene: Scene, fps: float, rng: np.random.Generator) -> QA:
    """When a visible phase happens: one span, end exclusive."""
    phases = scene.procedure.phases
    visible = sorted(set(scene.phase_of_frame))
    phase = visible[int(rng.integers(len(visible)))]
    frames = [i for i, p in enumerate(scene.phase_of_frame) if p == phase]
    start, end = _seconds(frames[0] / fps), _seconds((frames[-1] + 1) / fps)
    question = (
        f"When does the {phases[phase]} phase happen in this video? "
        'Answer with start-end seconds, e.g. "1.0-3.0 seconds."'
    )
    struc = [{"label": phases[phase], "spans": [{"start": float(start), "end": float(end)}]}]
    return QA("tal", question, f"{start}-{end} seconds.", struc)


def stg_qa(scene: Scene, fps: float, size: tuple[int, int], rng: np.random.Generator) -> QA | None:
    """Where the procedure's still instrument is at the first :data:`STG_TIMES` seconds it is visible
    (None when the procedure has no still instrument). The times are the first ones, not random: the
    tiny demo model learns to copy a time from the question too slowly for its RL groups to carry signal."""
    names = [i.name for i in scene.procedure.instruments if i.still and scene.visible(i.name)]
    if not names:
        return None
    name = names[int(rng.integers(len(names)))]
    picked = scene.visible(name)[:STG_TIMES]
    times = [_seconds(f / fps) for f in picked]
    boxes = {t: list(scene.boxes[name][f]) for t, f in zip(times, picked)}
    listed = ", ".join(times[:-1]) + f" and {times[-1]}" if len(times) > 1 else times[0]
    question = (
        f"Where is the {name} at {listed} seconds? Answer with its box in pixels of the "
        f'{size[0]}x{size[1]} frame at each time: "<t> seconds: [x1, y1, x2, y2]".'
    )
    answer = " ".join(f"{t} seconds: [{', '.join(str(v) for v in box)}]" for t, box in boxes.items())
    return QA("stg", question, answer, [{"instrument": name, "bbox_dict": boxes}])


def next_action_qa(scene: Scene) -> QA | None:
    """The phase after the last frame's phase; None when the window ends in the last phase."""
    phases = scene.procedure.phases
    last = scene.phase_of_frame[-1]
    if last + 1 >= len(phases):
        return None
    question = f"Which phase comes next after this video? Choose one of: {', '.join(phases)}."
    return QA("next_action", question, phases[last + 1], [{"label": phases[last + 1], "options": list(phases)}])


def cvs_qa(scene: Scene) -> QA:
    """The critical view of safety from the cues (two structures, cystic plate, hepatocystic triangle)."""
    if scene.cvs is None:
        raise ValueError(f"{scene.procedure.data_source} scenes have no CVS cues")
    two, plate, triangle = scene.cvs
    question = (
        "Assess the critical view of safety in this video. Answer as "
        '"Two structures: <0-2>, Cystic plate: <0-2>, Hepatocystic triangle: <0-2>".'
    )
    answer = f"Two structures: {two}, Cystic plate: {plate}, Hepatocystic triangle: {triangle}"
    return QA("cvs_assessment", question, answer, [{"cvs_scores": dict(zip(CVS_COMPONENTS, scene.cvs))}])


def summary_qa(scene: Scene) -> QA:
    """What happens at the end of the video, in one sentence: the sentence of the last frame's phase
    (balanced across phases, as the window's last phase cycles). A caption task: without a judge its
    reward is the sentence similarity of answer and reference, high for the right sentence and low
    for another phase's."""
    procedure = scene.procedure
    if not procedure.summaries:
        raise ValueError(f"{procedure.data_source} has no sentences for a video summary")
    last = scene.phase_of_frame[-1]
    question = "What is happening at the end of this video? Answer in one sentence."
    return QA("video_summary", question, procedure.summaries[last], [{"phase": procedure.phases[last]}])


def scene_questions(scene: Scene, *, fps: float, size: tuple[int, int], rng: np.random.Generator) -> list[QA]:
    """The questions of a scene, one per task of its procedure (next_action only when defined)."""
    makers = {
        "tal": lambda: tal_qa(scene, fps, rng),
        "stg": lambda: stg_qa(scene, fps, size, rng),
        "next_action": lambda: next_action_qa(scene),
        "cvs_assessment": lambda: cvs_qa(scene),
        "video_summary": lambda: summary_qa(scene),
    }
    return [qa for qa in (makers[t]() for t in scene.procedure.qa_types) if qa is not None]


# --- files ---------------------------------------------------------------------------------


def _record(scene: Scene, qa: QA, frame_paths: list[str], fps: float) -> dict[str, Any]:
    return {
        "id": f"{scene.video_id}_{qa.qa_type}",
        "conversations": [
            {"from": "human", "value": "<video>\n" + qa.question},
            {"from": "gpt", "value": qa.answer},
        ],
        "video": frame_paths,
        "metadata": {
            "fps": str(float(fps)),
            "video_id": scene.video_id,
            "input_video_start_frame": str(scene.start_frame),
            "input_video_end_frame": str(scene.start_frame + len(frame_paths) - 1),
        },
        "qa_type": qa.qa_type,
        "data_source": scene.procedure.data_source,
        "struc_info": qa.struc_info,
        "is_RC": False,
        "RC_info": {},
    }


def _write_frames(root: Path, scene: Scene, frames: np.ndarray) -> list[str]:
    folder = root / "frames" / scene.video_id
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, frame in enumerate(frames):
        relative = f"frames/{scene.video_id}/{scene.start_frame + i:06d}.jpg"
        Image.fromarray(frame).save(root / relative, quality=JPEG_QUALITY)
        paths.append(relative)
    return paths


def split_counts(n: int, fractions: Sequence[float]) -> list[int]:
    """``n`` items divided by ``fractions`` (largest remainder; ties go to the earlier split)."""
    exact = [n * f for f in fractions]
    counts = [math.floor(e) for e in exact]
    order = sorted(range(len(exact)), key=lambda k: (-(exact[k] - counts[k]), k))
    for k in order[: n - sum(counts)]:
        counts[k] += 1
    return counts


def _assign_splits(num_videos: int, fractions: Sequence[float], seed: int) -> list[str]:
    """Split name of each video index: per data source, a seeded permutation cut by ``fractions``."""
    assignment = [""] * num_videos
    rng = np.random.default_rng([seed, 1])
    for s, _ in enumerate(PROCEDURES):
        members = [i for i in range(num_videos) if i % len(PROCEDURES) == s]
        members = [members[k] for k in rng.permutation(len(members))]
        counts = split_counts(len(members), fractions)
        names = [name for name, c in zip(SPLITS, counts) for _ in range(c)]
        for video, name in zip(members, names):
            assignment[video] = name
    return assignment


def _check_arguments(
    num_videos: int, frame_size: tuple[int, int], frames_per_video: int, fps: float, split_fractions: Sequence[float]
) -> None:
    if num_videos < len(PROCEDURES):
        raise ValueError(f"num_videos must be at least {len(PROCEDURES)} (one per data source), got {num_videos}")
    if len(frame_size) != 2 or min(frame_size) < 32:
        raise ValueError(f"frame_size must be (width, height) of at least 32 pixels each, got {frame_size}")
    if frames_per_video < 4:
        raise ValueError(f"frames_per_video must be at least 4, got {frames_per_video}")
    if not 0 < fps <= 10:
        # Times are written with one decimal (the official stg keys): above 10 fps two frames could share a key.
        raise ValueError(f"fps must be in (0, 10], got {fps}")
    if len(split_fractions) != 3 or min(split_fractions) < 0 or not math.isclose(sum(split_fractions), 1.0):
        raise ValueError(f"split_fractions must be 3 non-negative numbers summing to 1, got {split_fractions}")


def _prepare_root(root: Path, overwrite: bool) -> None:
    ours = [root / "frames", root / MANIFEST, *(root / f"{s}.jsonl" for s in SPLITS)]
    present = [p for p in ours if p.exists()]
    if present and not overwrite:
        raise FileExistsError(f"{root} already holds a demo dataset ({present[0].name}); pass overwrite=True")
    for path in present:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    root.mkdir(parents=True, exist_ok=True)


def generate_dataset(
    root: str | os.PathLike[str],
    *,
    num_videos: int = NUM_VIDEOS,
    seed: int = 0,
    frame_size: tuple[int, int] = FRAME_SIZE,
    frames_per_video: int = FRAMES_PER_VIDEO,
    fps: float = FPS,
    split_fractions: Sequence[float] = SPLIT_FRACTIONS,
    overwrite: bool = False,
) -> DemoDataset:
    """Render the synthetic dataset under ``root`` and write its train/val/test records.

    Video ``i`` belongs to ``PROCEDURES[i % 2]`` (SynthCholec, SynthNurse); videos are split
    per data source by ``split_fractions`` (train, val, test). With the defaults: 40 videos
    of 8 frames at 112x112, 1 fps, 55 train / 20 val / 20 test records, generated in well
    under a second.

    Args:
        root: output directory (created; frames and records are written inside it).
        num_videos: number of videos (each gives 2-3 records).
        seed: everything random derives from it; equal arguments give identical files.
        frame_size: (width, height) of the stored frames.
        frames_per_video: frames per video (one window of its procedure).
        fps: frame rate of the frame lists (``metadata.fps``), at most 10.
        split_fractions: fractions of each data source's videos in train, val and test.
        overwrite: replace a dataset already generated under ``root`` (otherwise refused).

    Returns:
        The :class:`DemoDataset` (root and split files).

    Raises:
        ValueError: an argument out of range.
        FileExistsError: ``root`` already holds a generated dataset and ``overwrite`` is False.
    """
    size = (int(frame_size[0]), int(frame_size[1]))
    _check_arguments(num_videos, size, frames_per_video, fps, split_fractions)
    root = Path(root)
    _prepare_root(root, overwrite)
    assignment = _assign_splits(num_videos, split_fractions, seed)
    lines: dict[str, list[str]] = {s: [] for s in SPLITS}
    for index in range(num_videos):
        procedure = PROCEDURES[index % len(PROCEDURES)]
        rng = np.random.default_rng([seed, 2, index])
        video_id = f"{procedure.data_source.lower()}_{index:03d}"
        last_phase = (index // len(PROCEDURES)) % len(procedure.phases)
        scene = plan_scene(procedure, video_id, size=size, frames=frames_per_video, rng=rng, last_phase=last_phase)
        paths = _write_frames(root, scene, render_frames(scene, size, rng))
        for qa in scene_questions(scene, fps=fps, size=size, rng=rng):
            lines[assignment[index]].append(json.dumps(_record(scene, qa, paths, fps)))
    for split, split_lines in lines.items():
        (root / f"{split}.jsonl").write_text("".join(line + "\n" for line in split_lines))
    manifest = {
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "num_videos": num_videos,
        "frame_size": list(size),
        "frames_per_video": frames_per_video,
        "fps": fps,
        "split_fractions": list(split_fractions),
        "records": {s: len(v) for s, v in lines.items()},
    }
    (root / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return DemoDataset.at(root)


# --- helpers for the demo ------------------------------------------------------------------


def decode_options(side: int = DECODE_SIDE) -> DecodeOptions:
    """Decode options for the demo's frame lists: every frame resized to ``side`` x ``side``.

    ``min_pixels = max_pixels = side**2`` pins both qwen-vl-utils resize steps (the
    per-image presize to multiples of 56, then the video resize to multiples of 28) to that
    size for square frames of at least ``side`` pixels. 56 gives 2x2 merged tokens per
    temporal patch; 112 the stored resolution of the default frames (4x4 tokens).
    """
    if side < 28 or side % 28:
        raise ValueError(f"side must be a positive multiple of 28, got {side}")
    return DecodeOptions(min_pixels=side * side, max_pixels=side * side)


def dataset_fingerprint(root: str | os.PathLike[str]) -> str:
    """SHA-256 over every file under ``root`` (relative path and bytes, in sorted order)."""
    root = Path(root)
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()


def demo_tokenizer_corpus(dataset: DemoDataset) -> list[str]:
    """Every question and reference answer of every split, in file order: the training text of
    the demo's BPE tokenizer (``medgrpo.demo.tiny_model.build_tokenizer(dir, corpus=...)``)."""
    corpus = []
    for split in SPLITS:
        for record in dataset.records(split):
            corpus.append(record.question)
            if record.answer is not None:
                corpus.append(record.answer)
    return corpus


@dataclass(frozen=True)
class LabelStats:
    """How often each label occurs; ``majority`` is the most common (first in sorted order on ties)."""

    counts: Mapping[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def majority(self) -> str | None:
        if not self.counts:
            return None
        return min(self.counts, key=lambda label: (-self.counts[label], label))

    def fraction(self, label: str | None) -> float:
        """Share of the records whose label is ``label`` (0.0 when there are none)."""
        return self.counts.get(label, 0) / self.total if self.total and label is not None else 0.0


def _labels(record: VideoRecord) -> dict[str, str]:
    """The labels of one record: its answer, and for cvs each component's score."""
    labels = {"answer": record.answer or ""}
    if record.qa_type == "cvs_assessment":
        scores = record.struc_info[0]["cvs_scores"]
        labels.update({name: str(scores[name]) for name in CVS_COMPONENTS})
    return labels


def answer_stats(records: Iterable[VideoRecord]) -> dict[tuple[str, str, str], LabelStats]:
    """Label distribution per ``(data_source, qa_type, part)``.

    ``part`` is ``"answer"`` (the reference answer as a whole: for next_action the class
    label) or, for cvs, a component name (its 0/1/2 score). tal and stg answers are nearly
    all distinct, so their majority share is small: they have no useful constant answer.
    """
    counters: dict[tuple[str, str, str], Counter[str]] = {}
    for record in records:
        for part, label in _labels(record).items():
            counters.setdefault((record.data_source, record.qa_type, part), Counter())[label] += 1
    return {key: LabelStats(dict(sorted(counter.items()))) for key, counter in sorted(counters.items())}


def majority_baseline(
    train: Iterable[VideoRecord], held_out: Iterable[VideoRecord]
) -> dict[tuple[str, str, str], float]:
    """Accuracy on ``held_out`` of always answering the train majority label, per
    :func:`answer_stats` key (keys absent from train score 0). For next_action this is the
    majority-class ``nap_acc``; the mean over the three cvs components is the baseline ``cvs_acc``."""
    train_stats = answer_stats(train)
    return {
        key: stats.fraction(train_stats[key].majority if key in train_stats else None)
        for key, stats in answer_stats(held_out).items()
    }


__all__ = [
    "DECODE_SIDE",
    "FPS",
    "FRAMES_PER_VIDEO",
    "FRAME_SIZE",
    "NUM_VIDEOS",
    "PROCEDURES",
    "SPLITS",
    "SPLIT_FRACTIONS",
    "SYNTH_CHOLEC",
    "SYNTH_NURSE",
    "DemoDataset",
    "LabelStats",
    "Procedure",
    "Scene",
    "answer_stats",
    "dataset_fingerprint",
    "decode_options",
    "demo_tokenizer_corpus",
    "generate_dataset",
    "majority_baseline",
    "plan_scene",
    "render_frames",
    "scene_questions",
    "split_counts",
]
