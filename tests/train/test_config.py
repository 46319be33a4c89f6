"""Trainer config: YAML + dotted overrides, typed, unknown fields refused."""

from __future__ import annotations

import pytest

from medgrpo.train.config import ConfigError, TrainConfig, load_config


def test_defaults_are_the_papers_grpo_settings():
    config = load_config()
    assert isinstance(config, TrainConfig)
    g = config.grpo
    assert (g.group_size, g.epsilon_low, g.epsilon_high, g.beta, g.k, g.loss_type) == (8, 0.2, 0.3, 0.0, 3.0, "dapo")


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    text = "mode: sft\nseed: 3\ngrpo:\n  group_size: 4\noptim:\n  lr: 2\ndata:\n  sampler_weights: {AVOS: 2}\n"
    path.write_text(text)
    config = load_config(path, ["grpo.temperature=0.7", "optim.warmup_steps=5", "data.max_pixels=null"])
    assert config.mode == "sft" and config.seed == 3 and config.grpo.group_size == 4
    assert config.optim.lr == 2.0 and isinstance(config.optim.lr, float)
    assert config.grpo.temperature == 0.7 and config.optim.warmup_steps == 5 and config.data.max_pixels is None
    assert config.data.sampler_weights == {"AVOS": 2.0}


@pytest.mark.parametrize(
    "text,overrides,match",
    [
        ("grpo:\n  grop_size: 4\n", [], "unknown field"),
        ("", ["grpo.group_size=four"], "grpo.group_size: expected int"),
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
        assert (g.group_size, g.epsilon_low, g.epsilon_high, g.beta, g.k) == (8, 0.2, 0.3, 0.0, 3.0)
