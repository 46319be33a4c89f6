"""Answer parsers for the eight MedVidBench task types.

Every parser takes the model's raw answer and returns a :class:`Parsed`: the value the
official MedVidBench evaluator would extract from that text, and ``follows_format``,
whether the answer is written exactly in the task's one-shot format (DESIGN.md §2)::

    tal               "22.0-78.0, 89.0-94.0 seconds."
    stg               "1.0 seconds: [x1, y1, x2, y2] 5.0 seconds: [x1, y1, x2, y2]"
    dense_captioning  one line per event: "36.0-49.0 seconds: <label>: <caption>"
    next_action       one label of the list in the question
    cvs_assessment    "Two structures: 2, Cystic plate: 1, Hepatocystic triangle: 0"
    skill_assessment  "Respect for tissue: 2/5, ..., Quality of final product: 3/5" (6 aspects)
    video_summary, region_caption: free text

The extracted value is tolerant: it is found inside surrounding prose with the same
patterns the official evaluator (MedVidBench leaderboard, ``evaluation/eval_*.py``) uses,
so :mod:`medgrpo.rewards.metrics` gives its numbers. ``follows_format`` is strict: prose
around the answer makes it False (the format penalty of the tal/stg rewards uses it).

No parser raises on any input: a non-string answer is read as the empty string.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from medgrpo.data.task_key import normalize_qa_type

T = TypeVar("T")

TimeSpan = tuple[float, float]
Box = tuple[float, float, float, float]

CVS_COMPONENTS = ("two_structures", "cystic_plate", "hepatocystic_triangle")
SKILL_ASPECTS = (
    "Respect for tissue",
    "Suture/needle handling",
    "Time and motion",
    "Flow of operation",
    "Overall performance",
    "Quality of final product",
)


@dataclass(frozen=True)
class Parsed(Generic[T]):
    """A parsed answer: ``value`` as the official evaluator reads it, and whether the
    answer is written exactly in the task's format."""

    value: T
    follows_format: bool


@dataclass(frozen=True)
class DenseEvent:
    """One dense-captioning event: [start, end] in seconds and its caption."""

    start: float
    end: float
    caption: str


@dataclass(frozen=True)
class StgBoxes:
    """Boxes of a spatio-temporal grounding answer.

    Attributes:
        keyed: True when the answer had ``"<t> seconds: [...]"`` entries (then ``timed``
            holds them), False when the official fallback read bare ``[[x1, y1, x2, y2]]``
            boxes (then ``untimed`` holds them, in order).
        timed: time key -> box. Keys are ``str(float(t))`` as the official code writes
            them (``"5" -> "5.0"``), so only one-decimal times meet the ground truth's keys.
        untimed: the bare boxes (integers).
    """

    keyed: bool
    timed: Mapping[str, Box] = field(default_factory=dict)
    untimed: tuple[tuple[int, int, int, int], ...] = ()


@dataclass(frozen=True)
class SkillScores:
    """A skill answer: ``aspects`` (name -> score) and every ``N/5`` score in the text."""

    aspects: Mapping[str, int]
    scores: tuple[int, ...]

    @property
    def mean(self) -> float | None:
        """Mean of all ``N/5`` scores (the official skill-level input), None without any."""
        return _int_to_float(sum(self.scores)) / len(self.scores) if self.scores else None  # inf past float range


def _text(answer: Any) -> str:
    return answer if isinstance(answer, str) else ""


def _int_to_float(value: int) -> float:
    try:
        return float(value)
    except OverflowError:  # a clock time with hundreds of digits
        return math.inf


def _float(text: str) -> float | None:
    try:
        return float(text)
    except (ValueError, OverflowError):
        return None


# --- tal ---------------------------------------------------------------------------------

# "a-b" pairs anywhere in the text: the official TAL extractor's first pattern.
_TAL_DASH = re.compile(r"(\d+(?:\.\d+)?)\s*-\s*(\d+(?:\.\d+)?)")
# Its zero-shot fallbacks, tried only when no "a-b" pair is found: "[from] a[s] to b[s]"
# (values rounded to 2 decimals) and "hh:mm:ss to hh:mm:ss".
_TAL_TO = re.compile(
    r"(?:from|is from|takes place from)?\s*(\d+(?:\.\d+)?)(?:s| seconds?)?\s*to\s*(\d+(?:\.\d+)?)(?:s| seconds?)?",
    re.IGNORECASE,
)
_TAL_CLOCK = re.compile(r"(\d+):(\d+):(\d+)\s+to\s+(\d+):(\d+):(\d+)", re.IGNORECASE)
_NUM = r"\d+(?:\.\d+)?"
_TAL_FORMAT = re.compile(rf"\s*{_NUM}\s*-\s*{_NUM}(?:\s*,\s*{_NUM}\s*-\s*{_NUM})*\s+seconds?\.?\s*")


def tal_spans(text: str) -> tuple[TimeSpan, ...]:
    """The (start, end) spans in seconds the official TAL evaluator reads from ``text``."""
    spans = [(float(a), float(b)) for a, b in _TAL_DASH.findall(text)]
    if spans:
        return tuple(spans)
    # Quirk of the official fallback: both patterns run, "to" matches come first, and the
    # "to" pattern also fires inside clock times ("00:00:00 to 00:01:08" adds (0, 0)).
    spans = [(round(float(a), 2), round(float(b), 2)) for a, b in _TAL_TO.findall(text)]
    for h1, m1, s1, h2, m2, s2 in _TAL_CLOCK.findall(text):
        start = int(h1) * 3600 + int(m1) * 60 + int(s1)
        end = int(h2) * 3600 + int(m2) * 60 + int(s2)
        spans.append((_int_to_float(start), _int_to_float(end)))
    return tuple(spans)


def parse_tal(answer: Any) -> Parsed[tuple[TimeSpan, ...]]:
    """Temporal action localization: ``"22.0-78.0, 89.0-94.0 seconds."``.

    ``follows_format`` needs the whole answer to be that list with start <= end everywhere.
    """
    text = _text(answer)
    spans = tal_spans(text)
    follows = bool(_TAL_FORMAT.fullmatch(text)) and all(a <= b for a, b in spans)
    return Parsed(spans, follows)


# --- stg ---------------------------------------------------------------------------------

_STG_ENTRY = re.compile(r"(\d+(?:\.\d+)?)\s+seconds:\s*\[([^\]]+)\]")
_STG_BARE = re.compile(r"\[\[([\d\s,]+)\]\]")
_SNUM = r"-?\d+(?:\.\d+)?"
_STG_ITEM = rf"{_NUM}\s+seconds:\s*\[\s*{_SNUM}\s*,\s*{_SNUM}\s*,\s*{_SNUM}\s*,\s*{_SNUM}\s*\]"
_STG_FORMAT = re.compile(rf"\s*{_STG_ITEM}(?:\s*[,;]?\s*{_STG_ITEM})*\s*\.?\s*")


def _stg_box(body: str) -> Box | None:
    values = [_float(part.strip().lstrip("[").rstrip("]")) for part in body.split(",")]
    if len(values) != 4 or any(v is None for v in values):
        return None
    return tuple(values)  # type: ignore[return-value]


def _stg_key(time: str) -> str | None:
    value = _float(time)
    return None if value is None else str(value)


def stg_boxes(text: str) -> StgBoxes:
    """The boxes the official STG evaluator reads from ``text``.

    Entries ``"<t> seconds: [x1, y1, x2, y2]"``; an entry whose box is not 4 numbers takes
    the last good box (official rule; dropped when there is none yet). Without any such
    entry, bare ``[[x1, y1, x2, y2]]`` boxes are read instead.
    """
    entries = _STG_ENTRY.findall(text)
    if not entries:
        bare = []
        for body in _STG_BARE.findall(text):
            try:
                box = tuple(int(part.strip()) for part in body.split(","))
            except ValueError:
                continue
            if len(box) == 4:
                bare.append(box)
        return StgBoxes(keyed=False, untimed=tuple(bare))  # type: ignore[arg-type]
    timed: dict[str, Box] = {}
    last: Box | None = None
    for time, body in entries:
        key = _stg_key(time)
        box = _stg_box(body)
        if box is not None:
            last = box
        elif last is not None:
            box = last
        if key is not None and box is not None:
            timed[key] = box
    return StgBoxes(keyed=True, timed=timed)


def parse_stg(answer: Any) -> Parsed[StgBoxes]:
    """Spatio-temporal grounding: ``"1.0 seconds: [x1, y1, x2, y2] 5.0 seconds: [...]"``.

    ``follows_format`` needs the whole answer to be such entries, every box with
    x1 <= x2 and y1 <= y2.
    """
    text = _text(answer)
    boxes = stg_boxes(text)
    follows = bool(_STG_FORMAT.fullmatch(text)) and all(b[0] <= b[2] and b[1] <= b[3] for b in boxes.timed.values())
    return Parsed(boxes, follows)


# --- dense captioning --------------------------------------------------------------------

# One event per "a-b seconds: text", the text running to the next event line or the end.
_DVC_EVENT = re.compile(
    r"(\d+(?:\.\d+)?)-(\d+(?:\.\d+)?)\s+seconds?:\s+(.*?)(?=\n\d+(?:\.\d+)?-\d+(?:\.\d+)?\s+seconds?:|\Z)",
    re.DOTALL,
)
# The official zero-shot fallback, applied line by line when no event is found above.
_DVC_LOOSE = re.compile(
    r"(?:\*\*Start Time:\*\*|Start\s*\(?Time\)?|Time\s*Range:|Time\s*Interval:|^|\n)\s*(\d+\.?\d*)\s*[-–]\s*"
    r"(\d+\.?\d*)\s*seconds?.*?(?:\*\*Description:\*\*|-)\s*(.+?)(?=\n\d|$)",
    re.DOTALL,
)
_DVC_LINE = re.compile(rf"\s*{_NUM}\s*-\s*{_NUM}\s+seconds?:\s*\S.*")


def _loose_events(text: str) -> list[DenseEvent]:
    events = []
    for line in text.strip().split("\n"):
        for start, end, caption in _DVC_LOOSE.findall(line):
            a, b = _float(start), _float(end)
            if a is not None and b is not None:
                events.append(DenseEvent(a, b, caption.strip().rstrip(".")))
    return events


def dense_events(text: str) -> tuple[DenseEvent, ...]:
    """The events the official dense-captioning evaluator reads from ``text``: repeated
    (start, end) pairs keep their first caption; the zero-shot fallback otherwise."""
    seen: set[tuple[float, float]] = set()
    events = []
    for start, end, caption in _DVC_EVENT.findall(text):
        key = (float(start), float(end))
        if key not in seen:
            seen.add(key)
            events.append(DenseEvent(key[0], key[1], caption.strip().replace("\n", " ")))
    return tuple(events) if events else tuple(_loose_events(text))


def parse_dense_captioning(answer: Any) -> Parsed[tuple[DenseEvent, ...]]:
    """Dense captioning: one ``"36.0-49.0 seconds: <label>: <caption>"`` line per event.

    ``follows_format`` needs every non-empty line to be such an event, start <= end.
    """
    text = _text(answer)
    events = dense_events(text)
    lines = [line for line in text.split("\n") if line.strip()]
    follows = bool(lines) and all(_DVC_LINE.fullmatch(line) for line in lines)
    follows = follows and all(e.start <= e.end for e in events)
    return Parsed(events, follows)


# --- next action -------------------------------------------------------------------------

_LABEL_NOISE = re.compile(r"[\s\"'`*.:;,!]+")


def label_key(text: str) -> str:
    """A label compared loosely: casefolded, quotes/punctuation/extra spaces dropped."""
    return _LABEL_NOISE.sub(" ", text.casefold()).strip()


def parse_next_action(answer: Any, options: Sequence[str] | None = None) -> Parsed[str]:
    """Next action: one label of the list in the question.

    The value is the stripped answer, as the official evaluator compares it. With
    ``options``, a prose answer that names exactly one option (loosely, :func:`label_key`)
    yields that option; ``follows_format`` needs the answer to be one option (loosely). Without
    options it needs a single line of at most 12 words.
    """
    text = _text(answer).strip()
    if options is None:
        follows = bool(text) and "\n" not in text and len(text.split()) <= 12
        return Parsed(text, follows)
    keys = {label_key(option): option for option in options}
    key = label_key(text)
    if key in keys:
        return Parsed(keys[key], True)
    named = [option for k, option in keys.items() if k and re.search(rf"\b{re.escape(k)}\b", key)]
    return Parsed(named[0] if len(named) == 1 else text, False)


# --- cvs ---------------------------------------------------------------------------------

_CVS_PATTERNS = (
    ("two structures", "two_structures", re.compile(r"two structures?:\s*(\d+)")),
    ("cystic plate", "cystic_plate", re.compile(r"cystic plate:\s*(\d+)")),
    ("hepatocystic triangle", "hepatocystic_triangle", re.compile(r"hepatocystic triangle:\s*(\d+)")),
)
_CVS_FORMAT = re.compile(
    r"\s*two structures:\s*[012]\s*,\s*cystic plate:\s*[012]\s*,\s*hepatocystic triangle:\s*[012]\s*\.?\s*",
    re.IGNORECASE,
)


def cvs_components(text: str) -> dict[str, int]:
    """Component scores as the official CVS evaluator reads them: comma-separated parts,
    lowercased; each part is tested for the components in a fixed order and only the
    first one it names is read (a later part naming a component again overwrites it).

    Official quirk: a part must contain "two structures" before the pattern
    "two structures?:" is tried, so the singular "Two structure: 1" is not read.
    """
    components: dict[str, int] = {}
    for part in text.split(","):
        part = part.strip().lower()
        for name, key, pattern in _CVS_PATTERNS:
            if name in part:
                match = pattern.search(part)
                if match:
                    components[key] = int(match.group(1))
                break
    return components


def parse_cvs(answer: Any) -> Parsed[dict[str, int]]:
    """CVS: ``"Two structures: 2, Cystic plate: 1, Hepatocystic triangle: 0"`` (0/1/2 each)."""
    text = _text(answer)
    return Parsed(cvs_components(text), bool(_CVS_FORMAT.fullmatch(text)))


# --- skill -------------------------------------------------------------------------------

_SKILL_SCORE = re.compile(r"(\d+)/5")
_SKILL_ASPECT = re.compile(r"([^:]+?):\s*(\d+)/5")
_SKILL_FORMAT = re.compile(
    r"\s*" + r"\s*,\s*".join(rf"{re.escape(a)}:\s*[1-5]/5" for a in SKILL_ASPECTS) + r"\s*\.?\s*",
    re.IGNORECASE,
)


def skill_aspects(text: str) -> dict[str, int]:
    """Aspect scores as the official skill evaluator reads them: in each comma-separated
    part, the first ``"<name>: N/5"`` (name case and spelling kept)."""
    aspects = {}
    for part in text.split(","):
        match = _SKILL_ASPECT.search(part.strip())
        if match:
            aspects[match.group(1).strip()] = int(match.group(2))
    return aspects


def parse_skill(answer: Any) -> Parsed[SkillScores]:
    """Skill: ``"Respect for tissue: 2/5, ..., Quality of final product: 3/5"`` (6 aspects,
    in the order of :data:`SKILL_ASPECTS`, scores 1-5)."""
    text = _text(answer)
    scores = tuple(int(s) for s in _SKILL_SCORE.findall(text))
    value = SkillScores(aspects=skill_aspects(text), scores=scores)
    return Parsed(value, bool(_SKILL_FORMAT.fullmatch(text)))


# --- free text ---------------------------------------------------------------------------


def parse_caption(answer: Any) -> Parsed[str]:
    """Video summary / region caption: free text; ``follows_format`` when it is not empty."""
    text = _text(answer).strip()
    return Parsed(text, bool(text))


_PARSERS = {
    "tal": parse_tal,
    "stg": parse_stg,
    "dense_captioning": parse_dense_captioning,
    "next_action": parse_next_action,
    "cvs_assessment": parse_cvs,
    "skill_assessment": parse_skill,
    "video_summary": parse_caption,
    "region_caption": parse_caption,
}


def parse_answer(qa_type: str, answer: Any) -> Parsed[Any]:
    """Parse ``answer`` with the parser of ``qa_type`` (caption variants such as
    ``"video_summary_gemini"`` map to their task).

    Raises:
        ValueError: ``qa_type`` is not a MedVidBench task (the answer itself never raises).
    """
    return _PARSERS[normalize_qa_type(qa_type)](answer)
