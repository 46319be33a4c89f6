"""Rewards of MedGRPO: answer parsers, the official MedVidBench metrics, the RL rewards,
the medical LLM judge, sentence similarity and the reward normalization statistics.

* :mod:`medgrpo.rewards.parsers`: one parser per ``qa_type``; each returns a
  :class:`~medgrpo.rewards.parsers.Parsed` (the value the official evaluator reads, and
  whether the answer follows the task's format) and never raises on any text.
* :mod:`medgrpo.rewards.metrics`: the metrics of the MedVidBench leaderboard, equal to its
  evaluator's numbers on the same predictions (judge and embedder injected by the caller).
* :mod:`medgrpo.rewards.evaluate`: ``medgrpo eval``, the paper's table from a results file.
* :mod:`medgrpo.rewards.task_rewards`: the RL reward of every task (:class:`RewardFunction`).
* :mod:`medgrpo.rewards.judge`, :mod:`medgrpo.rewards.similarity`,
  :mod:`medgrpo.rewards.caption_reward`: the caption reward's judge and embeddings.
* :mod:`medgrpo.rewards.norm_stats`: ``medgrpo fit-norm`` and the stats loader.

Importing this package is light: ``openai`` and ``transformers`` are imported only when a
judge or an embedder is made. The submodule :mod:`medgrpo.rewards.similarity` is not
shadowed: its function is exported as ``semantic_similarity``; likewise the function
``caption_reward`` stays in :mod:`medgrpo.rewards.caption_reward` (exported here it would
replace the submodule attribute, and ``import medgrpo.rewards.caption_reward as m`` would
bind the function).
"""

from medgrpo.rewards.caption_reward import (
    CaptionRewards,
    normalize_judge,
    normalize_similarity,
    score_captions,
)
from medgrpo.rewards.judge import (
    DIMENSIONS,
    JUDGE_PROMPT_VERSION,
    Judge,
    JudgeConfig,
    JudgeCounters,
    JudgeScore,
    parse_judge_reply,
)
from medgrpo.rewards.metrics import (
    METRIC_KEYS,
    EvalRecord,
    JudgeRequest,
    TaskResult,
    evaluate_records,
    llm_unit,
    official_task,
)
from medgrpo.rewards.norm_stats import KeyStats, NormStats, fit_norm_stats, load_norm_stats
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
from medgrpo.rewards.similarity import SentenceEmbedder, get_embedder, nearest_label, semantic_similarity
from medgrpo.rewards.task_rewards import (
    BadReference,
    RewardBatch,
    RewardConfig,
    RewardFunction,
    TaskScore,
    cvs_reward,
    dense_captioning_reward,
    next_action_reward,
    skill_reward,
    stg_reward,
    tal_reward,
)

__all__ = [
    "BadReference",
    "CaptionRewards",
    "DIMENSIONS",
    "DenseEvent",
    "EvalRecord",
    "JUDGE_PROMPT_VERSION",
    "Judge",
    "JudgeConfig",
    "JudgeCounters",
    "JudgeRequest",
    "JudgeScore",
    "KeyStats",
    "METRIC_KEYS",
    "NormStats",
    "Parsed",
    "RewardBatch",
    "RewardConfig",
    "RewardFunction",
    "SentenceEmbedder",
    "SkillScores",
    "StgBoxes",
    "TaskResult",
    "TaskScore",
    "cvs_reward",
    "dense_captioning_reward",
    "evaluate_records",
    "fit_norm_stats",
    "get_embedder",
    "llm_unit",
    "load_norm_stats",
    "nearest_label",
    "next_action_reward",
    "normalize_judge",
    "normalize_similarity",
    "official_task",
    "parse_answer",
    "parse_caption",
    "parse_cvs",
    "parse_dense_captioning",
    "parse_judge_reply",
    "parse_next_action",
    "parse_skill",
    "parse_stg",
    "parse_tal",
    "score_captions",
    "semantic_similarity",
    "skill_reward",
    "stg_reward",
    "tal_reward",
]
