"""MedVidBench records: the SFT-style JSON of the MedGRPO authors, validated on access.

One record (a JSON object; a file holds a JSON list of them, or one per line)::

    {"conversations": [{"from": "human", "value": "<video>\\nQuestion?"},
                       {"from": "gpt", "value": "Answer."}],          # answer optional
     "video": ["clip/000001.jpg", "clip/000005.jpg"],                 # or "clip.mp4"
     "metadata": {"fps": "1.0", "video_id": "clip",
                  "input_video_start_frame": "0", "input_video_end_frame": "100"},
     "qa_type": "dense_captioning_gpt", "data_source": "AVOS",
     "struc_info": {...}, "is_RC": false, "RC_info": {}}

:class:`RecordDataset` keeps the file's raw JSON list (or, for JSON lines, the byte range
of each line) and builds a :class:`VideoRecord` only when one is accessed, so opening a
file of 500k records neither validates them all nor touches a video file. A malformed
record raises :class:`RecordError` naming the record and the field.
"""

from __future__ import annotations

import json
import math
import operator
import os
from array import array
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from functools import partial
from pathlib import Path
from types import MappingProxyType
from typing import Any, NamedTuple

from medgrpo.data.task_key import TaskKey, normalize_qa_type

VIDEO_TAG = "<video>"
START_FRAME_KEYS = ("input_video_start_frame", "start_frame")
END_FRAME_KEYS = ("input_video_end_frame", "end_frame")


class RecordError(ValueError):
    """A malformed record: ``index``, ``record_id`` and ``field`` say which and where."""

    def __init__(self, message: str, *, index: int, record_id: str | None = None, field: str | None = None):
        self.index = index
        self.record_id = record_id
        self.field = field
        where = f"record {index}" + (f" (id {record_id!r})" if record_id is not None else "")
        if field is not None:
            where += f", field {field!r}"
        super().__init__(f"{where}: {message}")


class _FieldError(Exception):
    """Raised by the field parsers; parse_record turns it into a RecordError."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class RegionCaptionInfo:
    """The box a region-caption question asks about, drawn on one frame (green, width 8).

    Attributes:
        frame_index: the frame the box is drawn on: its position in the record's frame
            list, or its frame number in the record's video file.
        bbox: (x1, y1, x2, y2) in pixels of that frame as stored on disk.
        start_frame: resolved path of that frame (frame-list records), else None.
    """

    frame_index: int
    bbox: tuple[float, float, float, float]
    start_frame: Path | None = None


@dataclass(frozen=True)
class VideoRecord:
    """One validated MedVidBench sample.

    Attributes:
        index: position in its file.
        id: the record's ``id`` field, if it has one.
        question: the human turn without its ``<video>`` tag.
        answer: the gpt turn (the reference answer), or None for test data.
        qa_type: one of :data:`~medgrpo.data.task_key.QA_TYPES` (caption variants mapped to their task);
            ``qa_type_raw`` keeps the file's spelling (e.g. ``"video_summary_gemini"``).
        data_source: the source dataset (``data_source``, else ``dataset_name``).
        video: frame image paths (a tuple) or one video file path, resolved inside the
            dataset root.
        fps: ``metadata.fps``: the frame rate of the frame list (or of the file).
        video_id, start_frame, end_frame: where the clip comes from (start/end inclusive
            frame numbers of the source video, when the record says).
        struc_info: the task's structured ground truth, as stored (not validated).
        is_rc, rc_info: whether a box is drawn, and which (region captions).
        metadata: the raw ``metadata`` object.
    """

    index: int
    id: str | None
    question: str
    answer: str | None
    qa_type: str
    qa_type_raw: str
    data_source: str
    video: tuple[Path, ...] | Path
    fps: float
    video_id: str | None = None
    start_frame: int | None = None
    end_frame: int | None = None
    struc_info: Any = field(default=None, compare=False, hash=False, repr=False)
    is_rc: bool = False
    rc_info: RegionCaptionInfo | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False, repr=False)

    def __reduce__(self):
        # MappingProxyType does not pickle; DataLoader workers send records back to the
        # main process, so pickle a plain copy of ``metadata`` and freeze it again on load.
        state = {f.name: getattr(self, f.name) for f in fields(self)}
        state["metadata"] = dict(self.metadata)
        return _unpickle_record, (state,)

    @property
    def is_frame_list(self) -> bool:
        return isinstance(self.video, tuple)

    @property
    def submission_id(self) -> str:
        """The leaderboard's id of this clip: ``{video_id}&&{start}&&{end}&&{fps}`` as stored."""
        meta = self.metadata
        start = meta.get(START_FRAME_KEYS[0], "") or meta.get(START_FRAME_KEYS[1], "")
        end = meta.get(END_FRAME_KEYS[0], "") or meta.get(END_FRAME_KEYS[1], "")
        return f"{meta.get('video_id', '')}&&{start}&&{end}&&{meta.get('fps', '')}"


def _unpickle_record(state: dict[str, Any]) -> VideoRecord:
    return VideoRecord(**{**state, "metadata": MappingProxyType(state["metadata"])})


def resolve_path(path: str, root: str | os.PathLike[str], *, source_root: str | None = None) -> Path:
    """``path`` resolved against the dataset ``root``, symlinks included; it must stay inside.

    Relative paths are taken from ``root``. Absolute paths must lie inside ``root``,
    unless they lie inside ``source_root`` (an absolute path: the directory the file was
    written against, e.g. ``"/root/data"``), which is then replaced by ``root``.

    Raises:
        ValueError: an empty path, a URL, or a path that resolves outside ``root``
            (``..`` or a symlink leading out, an absolute path elsewhere).
    """
    return _resolve_inside(path, os.path.realpath(root), _check_source_root(source_root))


def _check_source_root(source_root: str | None) -> str | None:
    if source_root is not None and not os.path.isabs(source_root):
        raise ValueError(f"source_root must be an absolute path, got {source_root!r}")
    return source_root


def _resolve_inside(
    path: Any, real_root: str, source_root: str | None, resolve: Callable[[str], str] = os.path.realpath
) -> Path:
    if not isinstance(path, str) or not path:
        raise ValueError(f"expected a non-empty path string, got {path!r}")
    if "://" in path or "\x00" in path:
        raise ValueError(f"expected a file path, got {path!r}")
    if source_root is not None and os.path.isabs(path):
        path = _rebase(path, source_root)
    resolved = resolve(os.path.join(real_root, path))
    if os.path.commonpath([real_root, resolved]) != real_root:
        raise ValueError(f"path {path!r} resolves to {resolved!r}, outside the dataset root {real_root!r}")
    return Path(resolved)


def _rebase(path: str, source_root: str) -> str:
    source = source_root.rstrip("/") or "/"
    relative = os.path.relpath(path, source)
    return path if relative == ".." or relative.startswith("../") else relative


def parse_record(raw: Any, *, index: int, root: str | os.PathLike[str], source_root: str | None = None) -> VideoRecord:
    """Validate one raw record and build its :class:`VideoRecord`.

    Paths resolve with :func:`resolve_path`; no file is opened or required to exist.

    Raises:
        RecordError: a missing or malformed field, naming the record and the field.
    """
    record_id = _record_id(raw, index)
    resolve = partial(_resolve_inside, real_root=os.path.realpath(root), source_root=_check_source_root(source_root))
    try:
        return _build(raw, index=index, record_id=record_id, resolve=resolve)
    except _FieldError as error:
        raise RecordError(str(error), index=index, record_id=record_id, field=error.field) from None


_Resolve = Callable[[Any], Path]


def _record_id(raw: Any, index: int) -> str | None:
    if not isinstance(raw, dict):
        raise RecordError(f"a record must be a JSON object, got {type(raw).__name__}", index=index)
    record_id = raw.get("id")
    if record_id is None or (isinstance(record_id, (str, int)) and not isinstance(record_id, bool)):
        return None if record_id is None else str(record_id)
    raise RecordError(f"must be a string or an integer, got {record_id!r}", index=index, field="id")


def _qa_type(raw: Mapping[str, Any]) -> tuple[str, str]:
    qa_type_raw = _required(raw, "qa_type", str)
    try:
        return normalize_qa_type(qa_type_raw), qa_type_raw
    except ValueError as error:
        raise _FieldError("qa_type", str(error)) from None


def task_key(raw: Any) -> TaskKey | None:
    """The :class:`~medgrpo.data.task_key.TaskKey` of a raw record, read as :func:`parse_record` reads
    it, without resolving any path (cheap enough for every record of a large file); None when invalid."""
    if not isinstance(raw, Mapping):
        return None
    try:
        return TaskKey(_data_source(raw), _qa_type(raw)[0])
    except _FieldError:
        return None


class RecordOutline(NamedTuple):
    """What :func:`outline_record` reads of a raw record.

    Attributes:
        index: its position in its file. id: its ``id`` field, if any.
        key: its data source and task type.
        question, answer: the human turn without its ``<video>`` tag, and the gpt turn (None if absent).
        num_frames: the length of its frame list; None for a video file.
        first_path: the video file, or the first frame, joined to the root without following links.
    """

    index: int
    id: str | None
    key: TaskKey
    question: str
    answer: str | None
    num_frames: int | None
    first_path: Path


def outline_record(
    raw: Any, *, index: int, root: str | os.PathLike[str], source_root: str | None = None
) -> RecordOutline:
    """The task key, texts and frame count of a raw record, checked as :func:`parse_record` checks them,
    at a cost independent of the number of frames: one path (the file, or the first frame) is joined
    to ``root`` and normalized, none is resolved on the file system, and the other fields (metadata,
    region box, the other frames) wait for :func:`parse_record` on access. Cheap enough to screen
    every record of a large file before training.

    Raises:
        RecordError: a missing or malformed field among those read, naming the record and the field.
    """
    record_id = _record_id(raw, index)
    root = os.path.normpath(os.path.abspath(root))
    resolve = partial(
        _resolve_inside, real_root=root, source_root=_check_source_root(source_root), resolve=os.path.normpath
    )
    try:
        question, answer = _conversation(raw)
        key = TaskKey(_data_source(raw), _qa_type(raw)[0])
        video = _present(raw, "video")
        if isinstance(video, list) and video:
            first = _path(video[0], "video[0]", resolve)
            return RecordOutline(index, record_id, key, question, answer, len(video), first)
        return RecordOutline(index, record_id, key, question, answer, None, _video(raw, resolve))
    except _FieldError as error:
        raise RecordError(str(error), index=index, record_id=record_id, field=error.field) from None


def _build(raw: dict[str, Any], *, index: int, record_id: str | None, resolve: _Resolve) -> VideoRecord:
    question, answer = _conversation(raw)
    qa_type, qa_type_raw = _qa_type(raw)
    metadata = _required(raw, "metadata", dict)
    video = _video(raw, resolve)
    is_rc = _optional(raw, "is_RC", bool, default=False)
    start_frame, end_frame = _clip(metadata)
    return VideoRecord(
        index=index,
        id=record_id,
        question=question,
        answer=answer,
        qa_type=qa_type,
        qa_type_raw=qa_type_raw,
        data_source=_data_source(raw),
        video=video,
        fps=_positive_number(metadata, "fps"),
        video_id=_video_id(metadata),
        start_frame=start_frame,
        end_frame=end_frame,
        struc_info=raw.get("struc_info"),
        is_rc=is_rc,
        rc_info=_rc_info(raw, video, resolve) if is_rc else None,
        metadata=MappingProxyType(dict(metadata)),
    )


def _present(raw: Mapping[str, Any], key: str, prefix: str = "") -> Any:
    if raw.get(key) is None:
        raise _FieldError(prefix + key, "is missing")
    return raw[key]


def _required(raw: Mapping[str, Any], key: str, kind: type, prefix: str = "") -> Any:
    return _typed(_present(raw, key, prefix), kind, prefix + key)


def _optional(raw: Mapping[str, Any], key: str, kind: type, *, default: Any) -> Any:
    return default if raw.get(key) is None else _typed(raw[key], kind, key)


_JSON_NAMES = {str: "string", dict: "JSON object", list: "JSON list", bool: "boolean"}


def _typed(value: Any, kind: type, name: str) -> Any:
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise _FieldError(name, f"must be a {_JSON_NAMES.get(kind, kind.__name__)}, got {value!r}")
    return value


def _conversation(raw: Mapping[str, Any]) -> tuple[str, str | None]:
    turns = _required(raw, "conversations", list)
    if not 1 <= len(turns) <= 2:
        raise _FieldError("conversations", f"expected a human turn and at most one gpt turn, got {len(turns)} turns")
    human = _turn(turns[0], "conversations[0]", "human")
    if human.count(VIDEO_TAG) != 1:
        raise _FieldError(
            "conversations[0].value", f"must hold exactly one {VIDEO_TAG} tag, found {human.count(VIDEO_TAG)}"
        )
    # The authors strip "<video>\n"; a tag without the newline goes too.
    question = human.replace(VIDEO_TAG + "\n", "").replace(VIDEO_TAG, "")
    if not question.strip():
        raise _FieldError("conversations[0].value", "holds no question besides the video tag")
    answer = _turn(turns[1], "conversations[1]", "gpt") if len(turns) == 2 else None
    return question, answer


def _turn(turn: Any, name: str, speaker: str) -> str:
    turn = _typed(turn, dict, name)
    if turn.get("from") != speaker:
        raise _FieldError(name + ".from", f"must be {speaker!r}, got {turn.get('from')!r}")
    return _required(turn, "value", str, prefix=name + ".")


def _data_source(raw: Mapping[str, Any]) -> str:
    key = "data_source" if raw.get("data_source") is not None else "dataset_name"
    if raw.get(key) is None:
        raise _FieldError("data_source", "is missing (neither data_source nor dataset_name is set)")
    source = _typed(raw[key], str, key)
    if not source:
        raise _FieldError(key, "is empty")
    return source


def _video(raw: Mapping[str, Any], resolve: _Resolve) -> tuple[Path, ...] | Path:
    video = _present(raw, "video")
    if isinstance(video, str):
        return _path(video, "video", resolve)
    if not isinstance(video, list):
        raise _FieldError("video", f"must be a list of frame paths or one video path, got {video!r}")
    if not video:
        raise _FieldError("video", "the frame list is empty")
    return tuple(_path(frame, f"video[{i}]", resolve) for i, frame in enumerate(video))


def _path(path: Any, name: str, resolve: _Resolve) -> Path:
    try:
        return resolve(path)
    except ValueError as error:
        raise _FieldError(name, str(error)) from None


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise _FieldError(name, f"must be a number, got {value!r}")
    try:
        number = float(value)
    except ValueError:
        raise _FieldError(name, f"must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise _FieldError(name, f"must be finite, got {value!r}")
    return number


def _positive_number(metadata: Mapping[str, Any], key: str) -> float:
    name = "metadata." + key
    number = _number(_present(metadata, key, "metadata."), name)
    if number <= 0:
        raise _FieldError(name, f"must be positive, got {metadata[key]!r}")
    return number


def _frame_number(metadata: Mapping[str, Any], keys: tuple[str, ...]) -> tuple[str, int | None]:
    key = next((k for k in keys if metadata.get(k) not in (None, "")), keys[0])
    if metadata.get(key) in (None, ""):
        return key, None
    number = _number(metadata[key], "metadata." + key)
    if number < 0 or not number.is_integer():
        raise _FieldError("metadata." + key, f"must be a frame number (an integer >= 0), got {metadata[key]!r}")
    return key, int(number)


def _clip(metadata: Mapping[str, Any]) -> tuple[int | None, int | None]:
    start_key, start = _frame_number(metadata, START_FRAME_KEYS)
    end_key, end = _frame_number(metadata, END_FRAME_KEYS)
    if start is not None and end is not None and start > end:
        raise _FieldError("metadata." + start_key, f"start frame {start} is after end frame {end} ({end_key})")
    return start, end


def _video_id(metadata: Mapping[str, Any]) -> str | None:
    video_id = metadata.get("video_id")
    if video_id is None:
        return None
    if isinstance(video_id, bool) or not isinstance(video_id, (str, int)):
        raise _FieldError("metadata.video_id", f"must be a string, got {video_id!r}")
    return str(video_id)


def _rc_info(raw: Mapping[str, Any], video: tuple[Path, ...] | Path, resolve: _Resolve) -> RegionCaptionInfo:
    info = _required(raw, "RC_info", dict)
    bbox = _bbox(_required(info, "start_frame_bbox", list, prefix="RC_info."))
    start = _present(info, "start_frame", "RC_info.")
    if isinstance(video, Path):
        if isinstance(start, bool) or not isinstance(start, int) or start < 0:
            raise _FieldError("RC_info.start_frame", f"must be a frame number of the video file, got {start!r}")
        return RegionCaptionInfo(frame_index=start, bbox=bbox)
    path = _path(start, "RC_info.start_frame", resolve)
    if path not in video:
        raise _FieldError("RC_info.start_frame", f"{start!r} is not one of the record's frames")
    return RegionCaptionInfo(frame_index=video.index(path), bbox=bbox, start_frame=path)


def _bbox(values: list[Any]) -> tuple[float, float, float, float]:
    if len(values) != 4:
        raise _FieldError("RC_info.start_frame_bbox", f"must be [x1, y1, x2, y2], got {values!r}")
    x1, y1, x2, y2 = (_number(v, "RC_info.start_frame_bbox") for v in values)
    if x1 > x2 or y1 > y2:
        raise _FieldError("RC_info.start_frame_bbox", f"must have x1 <= x2 and y1 <= y2, got {values!r}")
    return x1, y1, x2, y2


class RecordDataset:
    """The records of a MedVidBench JSON file, each parsed and validated when accessed.

    A file whose first non-blank character is ``[`` is a JSON list: it is decoded once
    into raw objects. Otherwise it is JSON lines, one object per line (blank lines are
    skipped; a ``.json`` file holding one object is refused): only each line's byte range
    is kept, and a line is decoded when accessed. Either way no record is validated and
    no video path is resolved until it is accessed, and the dataset pickles cheaply for
    DataLoader workers (no open file handle).

    Args:
        path: the records file.
        root: the dataset root that video paths resolve against and may not leave
            (default: the file's directory).
        source_root: the directory the file's absolute paths were written against; they
            are re-rooted under ``root`` (see :func:`resolve_path`).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        root: str | os.PathLike[str] | None = None,
        source_root: str | None = None,
    ):
        self.path = Path(path)
        self.root = Path(os.path.realpath(self.path.parent if root is None else root))
        self.source_root = _check_source_root(source_root)
        if not self.root.is_dir():
            raise ValueError(f"dataset root {self.root} is not a directory")
        self._items: list[Any] | None = None
        self._starts = array("q")
        self._ends = array("q")
        first = _first_char(self.path)
        if first == b"[":
            self._items = _load_json_list(self.path)
        elif first == b"{" and self.path.suffix == ".json":
            raise ValueError(f"{self.path}: expected a JSON list of records (JSON lines files end in .jsonl)")
        else:
            self._starts, self._ends = _index_lines(self.path)

    def __len__(self) -> int:
        return len(self._items) if self._items is not None else len(self._starts)

    def __getitem__(self, index: int) -> VideoRecord:
        position = self._position(index)
        return parse_record(self._raw(position), index=position, root=self.root, source_root=self.source_root)

    def __iter__(self) -> Iterator[VideoRecord]:
        for position in range(len(self)):
            yield self[position]

    def outline(self, index: int) -> RecordOutline:
        """:func:`outline_record` of the record at ``index`` (RecordError when it is malformed or not JSON)."""
        position = self._position(index)
        return outline_record(self._raw(position), index=position, root=self.root, source_root=self.source_root)

    def raw(self, index: int) -> Any:
        """The record at ``index`` as decoded from the file, not validated."""
        return self._raw(self._position(index))

    def _position(self, index: int) -> int:
        position = operator.index(index)
        size = len(self)
        if position < 0:
            position += size
        if not 0 <= position < size:
            raise IndexError(f"record index {index} out of range for {size} records")
        return position

    def _raw(self, position: int) -> Any:
        if self._items is not None:
            return self._items[position]
        start, end = self._starts[position], self._ends[position]
        with open(self.path, "rb") as handle:
            handle.seek(start)
            line = handle.read(end - start)
        return _decode_line(line, position=position, offset=start)


def _first_char(path: Path) -> bytes:
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 16):
            stripped = chunk.lstrip(b" \t\r\n\xef\xbb\xbf")
            if stripped:
                return stripped[:1]
    return b""


def _load_json_list(path: Path) -> list[Any]:
    with open(path, encoding="utf-8-sig") as handle:
        items = json.load(handle)
    if not isinstance(items, list):
        raise ValueError(f"{path}: expected a JSON list of records, got a JSON {type(items).__name__}")
    return items


def _index_lines(path: Path) -> tuple[array, array]:
    starts, ends = array("q"), array("q")
    offset = 0
    with open(path, "rb") as handle:
        for line in handle:
            if line.strip():
                starts.append(offset)
                ends.append(offset + len(line))
            offset += len(line)
    return starts, ends


def _decode_line(line: bytes, *, position: int, offset: int) -> Any:
    try:
        return json.loads(line.decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RecordError(f"line at byte {offset} is not valid JSON: {error}", index=position) from None
