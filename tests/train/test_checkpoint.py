"""Checkpoints: exact resume (model, AdamW, LR schedule, RNG), crash-safe saves, keep-last-N, Hugging Face export."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from medgrpo.train import checkpoint as ckpt
from medgrpo.train.checkpoint import (
    checkpoint_step,
    export_hf,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from medgrpo.train.model import ModelConfig, load_model


def trainer(tiny_model_dir):
    # Text-only steps never reach the vision tower: frozen, so every trainable parameter has optimizer state.
    model = load_model(ModelConfig(str(tiny_model_dir), dtype="float32", freeze_vision=True))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 3))
    return model, optimizer, scheduler


def train_step(model, optimizer, scheduler) -> list[float]:
    """One step whose batch depends on the torch, Python and NumPy generators."""
    length = random.randint(5, 9)
    input_ids = torch.randint(20, 500, (2, length))
    labels = torch.where(torch.from_numpy(np.random.rand(2, length) < 0.8), input_ids, -100)
    loss = model(input_ids=input_ids, labels=labels).loss
    loss.backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()
    return [loss.item(), torch.rand(()).item()]


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@pytest.mark.slow
def test_resume_continues_exactly(tiny_model_dir, tmp_path):
    seed_all(0)
    model, optimizer, scheduler = trainer(tiny_model_dir)
    uninterrupted = [train_step(model, optimizer, scheduler) for _ in range(4)]
    expected = {name: p.detach().clone() for name, p in model.named_parameters()}

    seed_all(0)
    model, optimizer, scheduler = trainer(tiny_model_dir)
    first = [train_step(model, optimizer, scheduler) for _ in range(2)]
    extra_state = {"sampler": {"epoch": 0, "position": 4}, "skipped": torch.tensor(3)}
    path = save_checkpoint(tmp_path, 2, model=model, optimizer=optimizer, scheduler=scheduler, extra_state=extra_state)
    assert path.name == "step_000002" and checkpoint_step(path) == 2

    seed_all(123)  # a fresh process: other weights, generators elsewhere
    model, optimizer, scheduler = trainer(tiny_model_dir)
    train_step(model, optimizer, scheduler)
    extra = load_checkpoint(latest_checkpoint(tmp_path), model=model, optimizer=optimizer, scheduler=scheduler)
    assert extra["sampler"] == {"epoch": 0, "position": 4} and int(extra["skipped"]) == 3
    assert scheduler.last_epoch == 2 and optimizer.param_groups[0]["lr"] == pytest.approx(1e-2)
    resumed = first + [train_step(model, optimizer, scheduler) for _ in range(2)]
    assert resumed == uninterrupted
    for name, p in model.named_parameters():
        assert torch.equal(p, expected[name]), name


def test_model_only_checkpoint(tiny_model_dir, tmp_path):
    seed_all(1)
    model, _, _ = trainer(tiny_model_dir)
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
    save_checkpoint(tmp_path, 0, model=model)
    fresh, _, _ = trainer(tiny_model_dir)
    assert load_checkpoint(tmp_path / "step_000000", model=fresh) == {}
    assert torch.equal(fresh.lm_head.weight, model.lm_head.weight)
    with pytest.raises(ValueError, match="no scheduler state"):
        load_checkpoint(
            tmp_path / "step_000000",
            model=fresh,
            scheduler=torch.optim.lr_scheduler.LambdaLR(torch.optim.SGD(fresh.parameters(), lr=0.1), lambda step: 1.0),
        )


def test_a_save_killed_midway_is_not_picked_up(tiny_model_dir, tmp_path, monkeypatch):
    model, optimizer, scheduler = trainer(tiny_model_dir)
    save_checkpoint(tmp_path, 1, model=model, optimizer=optimizer, scheduler=scheduler)
    real_save = ckpt._save_file

    def crash_on_trainer_state(obj, path):
        if path.name == ckpt.TRAINER_STATE:
            raise OSError("disk full")  # after DCP wrote the model and optimizer shards
        real_save(obj, path)

    monkeypatch.setattr(ckpt, "_save_file", crash_on_trainer_state)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, 2, model=model, optimizer=optimizer, scheduler=scheduler)
    monkeypatch.undo()
    assert (tmp_path / "step_000002.tmp" / ".metadata").is_file()  # the shards are there, the marker is not
    (tmp_path / "step_000003").mkdir()  # a directory with the right name but no marker
    (tmp_path / "step_000003" / "trainer_state.pt").write_bytes(b"")
    assert latest_checkpoint(tmp_path).name == "step_000001"
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000001"]
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        load_checkpoint(tmp_path / "step_000003", model=model)
    # Saving the step again replaces the leftovers.
    save_checkpoint(tmp_path, 2, model=model, optimizer=optimizer, scheduler=scheduler)
    assert latest_checkpoint(tmp_path).name == "step_000002" and not (tmp_path / "step_000002.tmp").exists()
    assert json.loads((tmp_path / "step_000002" / "COMPLETE").read_text()) == {"step": 2, "world_size": 1}


def test_keep_last_n(tiny_model_dir, tmp_path):
    model, optimizer, _ = trainer(tiny_model_dir)
    (tmp_path / "step_000001.tmp").mkdir(parents=True)  # a crashed save older than everything kept
    for step in (2, 4, 6, 8, 10):
        save_checkpoint(tmp_path, step, model=model, optimizer=optimizer, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000008", "step_000010"]
    with pytest.raises(ValueError, match="keep must be"):
        save_checkpoint(tmp_path, 11, model=model, keep=0)


def test_export_loads_with_from_pretrained_and_gives_the_same_logits(tiny_model_dir, tokenizer, tmp_path):
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    seed_all(2)
    model, optimizer, scheduler = trainer(tiny_model_dir)
    train_step(model, optimizer, scheduler)  # weights differ from the saved tiny model
    out = export_hf(model, tokenizer, tmp_path / "export")
    assert (out / "model.safetensors").is_file()
    assert json.loads((out / "config.json").read_text())["architectures"] == ["Qwen2_5_VLForConditionalGeneration"]
    loaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(out, local_files_only=True).eval()
    input_ids = torch.randint(20, 500, (2, 7))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=input_ids).logits, model.eval()(input_ids=input_ids).logits)
    assert AutoTokenizer.from_pretrained(out).convert_tokens_to_ids("<|video_pad|>") == model.config.video_token_id
    half = export_hf(model, None, tmp_path / "bf16", dtype=torch.bfloat16)
    loaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(half, local_files_only=True)
    assert loaded.lm_head.weight.dtype == torch.bfloat16
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight.to(torch.bfloat16))
