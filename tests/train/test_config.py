"""Trainer config: YAML + dotted overrides, typed, unknown fields refused."""

from __future__ import annotations

import pytest

from medgrpo.train.config import ConfigError, TrainConfig, config_fields, load_config


def test_defaults_are_the_papers_grpo_settings():
    config = load_config()
    assert isinstance(config, TrainConfig)
    g = config.grpo
    settings = (g.rollout.group_size, g.loss.epsilon_low, g.loss.epsilon_high, g.loss.beta, g.k, g.loss.loss_type)
    assert settings == (8, 0.2, 0.3, 0.0, 3.0, "dapo")


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    text = "mode: sft\nseed: 3\ngrpo:\n  rollout:\n    group_size: 4\noptim:\n  lr: 2\n"
    path.write_text(text + "data:\n  sampler_weights: {AVOS: 2}\n")
    config = load_config(path, ["grpo.rollout.temperature=0.7", "optim.warmup_steps=5", "data.decode.max_pixels=null"])
    assert config.mode == "sft" and config.seed == 3 and config.grpo.rollout.group_size == 4
    assert config.optim.lr == 2.0 and isinstance(config.optim.lr, float)
    rollout, decode = config.grpo.rollout, config.data.decode
    assert rollout.temperature == 0.7 and config.optim.warmup_steps == 5 and decode.max_pixels is None
    assert config.data.sampler_weights == {"AVOS": 2.0}


@pytest.mark.parametrize(
    "text,overrides,match",
    [
        ("grpo:\n  grop_size: 4\n", [], "unknown field"),
        ("", ["grpo.rollout.group_size=four"], "grpo.rollout.group_size: expected int"),
        ("", ["grpo.group_size"], "section.field=value"),
        ("mode: rl\n", [], "mode must be"),
        ("- 1\n- 2\n", [], "mapping"),
        ("", ["model.dtype.x=1"], "model.dtype: expected str"),
        ("model: 3\n", ["model.dtype=x"], "not a section"),
        ("", ["resume=3"], "expected bool"),
    ],
)
def test_bad_configs_name_the_field(tmp_path, text, overrides, match):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_config(path, overrides)


@pytest.mark.parametrize("name", ["demo_cpu.yaml", "sft_qwen2_5_vl_7b.yaml", "medgrpo_qwen2_5_vl_7b.yaml"])
def test_shipped_configs_load(name):
    from pathlib import Path

    config = load_config(Path(__file__).resolve().parents[2] / "configs" / name)
    if config.mode == "grpo":
        g = config.grpo
        assert (g.rollout.group_size, g.loss.epsilon_low, g.loss.epsilon_high, g.loss.beta, g.k) == (
            8,
            0.2,
            0.3,
            0.0,
            3.0,
        )


def test_sections_are_the_components_configs():
    from medgrpo.data.loader import DecodeOptions
    from medgrpo.ops.policy_loss import PolicyLossConfig
    from medgrpo.rewards.judge import JudgeConfig
    from medgrpo.rewards.task_rewards import RewardConfig
    from medgrpo.train.model import ModelConfig
    from medgrpo.train.rollout import RolloutConfig

    overrides = [
        "model.compile=true",
        "model.compute_dtype=bfloat16",
        "grpo.rollout.top_k=50",
        "rewards.judge.base_url=http://127.0.0.1:9/v1",
        "rewards.judge.model=judge",
    ]
    config = load_config(None, overrides)
    assert isinstance(config.model, ModelConfig) and config.model.compile and config.model.compute_dtype == "bfloat16"
    assert isinstance(config.grpo.rollout, RolloutConfig) and config.grpo.rollout.top_k == 50
    assert isinstance(config.grpo.loss, PolicyLossConfig) and isinstance(config.data.decode, DecodeOptions)
    assert isinstance(config.rewards, RewardConfig) and config.rewards.judge == JudgeConfig(
        "http://127.0.0.1:9/v1", "judge"
    )
    assert load_config(None, ["rewards.judge=null"]).rewards.judge is None
    with pytest.raises(ConfigError, match=r"rewards.judge: missing field\(s\) \['model'\]"):
        load_config(None, ["rewards.judge.base_url=http://127.0.0.1:9/v1"])


def test_sft_needs_no_grpo_section(tmp_path):
    path = tmp_path / "sft.yaml"
    path.write_text("mode: sft\nsft:\n  batch_size: 4\n  micro_batch_size: 2\n")
    config = load_config(path)
    assert (config.sft.batch_size, config.sft.micro_batch_size) == (4, 2)


def test_help_lists_every_field_with_default_and_help():
    fields = {name: (default, text) for name, default, text in config_fields()}
    assert all(text for _, text in fields.values()), [name for name, (_, text) in fields.items() if not text]
    assert fields["grpo.rollout.top_k"][0] == "0" and fields["rewards.judge.base_url"][0] == "(required)"
    assert {"model.compile", "model.compute_dtype", "sft.micro_batch_size", "data.decode.fps"} <= fields.keys()


def test_help_is_plain_text(capsys):
    from medgrpo.cli import main

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    assert "grpo.loss.epsilon_high = 0.3" in text and "model.activation_checkpointing = true" in text
    assert "``" not in text and ":func:" not in text and ":class:" not in text and ":mod:" not in text
