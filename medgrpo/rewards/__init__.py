"""Answer parsers and the official MedVidBench task metrics.

* :mod:`medgrpo.rewards.parsers`: one parser per ``qa_type``; each returns a
  :class:`~medgrpo.rewards.parsers.Parsed` (the value the official evaluator reads, and
  whether the answer follows the task's format) and never raises on any text.
* :mod:`medgrpo.rewards.metrics`: the metrics of the MedVidBench leaderboard, equal to its
  evaluator's numbers on the same predictions (judge and embedder injected by the caller).
* :mod:`medgrpo.rewards.evaluate`: ``medgrpo eval``, the paper's table from a results file.
"""

from medgrpo.rewards.metrics import (
    METRIC_KEYS,
    EvalRecord,
    JudgeRequest,
    TaskResult,
    evaluate_records,
    llm_unit,
    official_task,
)
from medgrpo.rewards.parsers import (
    DenseEvent,
    Parsed,
    SkillScores,
    StgBoxes,
    parse_answer,
    parse_caption,
    parse_cvs,
    parse_dense_captioning,
    parse_next_action,
    parse_skill,
    parse_stg,
    parse_tal,
)

__all__ = [
    "METRIC_KEYS",
    "DenseEvent",
    "EvalRecord",
    "JudgeRequest",
    "Parsed",
    "SkillScores",
    "StgBoxes",
    "TaskResult",
    "evaluate_records",
    "llm_unit",
    "official_task",
    "parse_answer",
    "parse_caption",
    "parse_cvs",
    "parse_dense_captioning",
    "parse_next_action",
    "parse_skill",
    "parse_stg",
    "parse_tal",
]
