"""The task key ``(data_source, qa_type)``: the one reading of a record's task type and its key.

MedVidBench has 8 task types; the caption tasks come in ``_gpt`` / ``_gemini`` variants of one
type (annotations written with GPT or Gemini). Everything that groups by task reads the type
here: record validation (strict), the rewards (unknown = no reward), the normalization
statistics and the sampler (unknown types keep their spelling), and the ``"data_source/qa_type"``
string of configs and logs. The official evaluator routes records its own way
(:func:`medgrpo.rewards.metrics.official_task`), on purpose.
"""

from __future__ import annotations

from typing import NamedTuple

QA_TYPES = (
    "tal",
    "stg",
    "next_action",
    "dense_captioning",
    "video_summary",
    "region_caption",
    "skill_assessment",
    "cvs_assessment",
)
CAPTION_QA_TYPES = ("dense_captioning", "video_summary", "region_caption")
# Caption tasks come in two variants (annotations written with GPT or with Gemini) of one task.
CAPTION_VARIANTS = ("gpt", "gemini")
_QA_TYPE_ALIASES = {
    **{qa_type: qa_type for qa_type in QA_TYPES},
    **{f"{base}_{variant}": base for base in CAPTION_QA_TYPES for variant in CAPTION_VARIANTS},
    "dc": "dense_captioning",  # the authors' evaluation accepts this short name
}
SEPARATOR = "/"


def task_of(qa_type: object) -> str | None:
    """The task a ``qa_type`` names (caption variants map to their base type), or None."""
    return _QA_TYPE_ALIASES.get(qa_type) if isinstance(qa_type, str) else None


def normalize_qa_type(qa_type: str) -> str:
    """The task of a ``qa_type``: caption variants (``_gpt``, ``_gemini``) map to their base.

    Raises:
        ValueError: not one of the 8 tasks or their caption variants.
    """
    task = task_of(qa_type)
    if task is None:
        raise ValueError(f"unknown qa_type {qa_type!r}; expected one of {', '.join(QA_TYPES)}")
    return task


class TaskKey(NamedTuple):
    """A ``(data_source, qa_type)`` key; ``str(key)`` is its ``"data_source/qa_type"`` spelling."""

    data_source: str
    qa_type: str

    @classmethod
    def of(cls, data_source: str, qa_type: str) -> TaskKey:
        """The key of a pair: ``qa_type`` normalized where it names a task, kept as written otherwise."""
        return cls(data_source, task_of(qa_type) or qa_type)

    @classmethod
    def parse(cls, text: str) -> TaskKey:
        """The key spelled ``"data_source/qa_type"`` (the data source may itself hold a ``/``).

        Raises:
            ValueError: no ``/`` in ``text``.
        """
        data_source, separator, qa_type = text.rpartition(SEPARATOR)
        if not separator:
            raise ValueError(f"a task key reads 'data_source{SEPARATOR}qa_type', got {text!r}")
        return cls(data_source, qa_type)

    def __str__(self) -> str:
        return f"{self.data_source}{SEPARATOR}{self.qa_type}"


def format_task_key(data_source: str, qa_type: str) -> str:
    """``"data_source/qa_type"`` of a pair, ``qa_type`` normalized as :meth:`TaskKey.of` does."""
    return str(TaskKey.of(data_source, qa_type))


__all__ = [
    "CAPTION_QA_TYPES",
    "CAPTION_VARIANTS",
    "QA_TYPES",
    "TaskKey",
    "format_task_key",
    "normalize_qa_type",
    "task_of",
]
