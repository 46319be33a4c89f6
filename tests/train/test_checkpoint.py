"""Checkpoints: exact resume (model, AdamW, LR schedule, RNG), crash-safe saves, keep-last-N, Hugging Face export."""

from __future__ import annotations

import errno
import hashlib
import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from medgrpo.testing.corrupt import flip_middle_bytes
from medgrpo.testing.distributed import GLOO, run_gloo
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


# --------------------------------------------------------------------------- integrity
def small_trainer(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(4, 64)).sum().backward()
    optimizer.step()
    return model, optimizer


def largest_shard(path):
    return max(path.glob("*.distcp"), key=lambda p: p.stat().st_size)


def test_manifest_holds_every_file_and_verifies(tmp_path):
    model, optimizer = small_trainer()
    path = save_checkpoint(tmp_path, 3, model=model, optimizer=optimizer, extra_state={"x": 1})
    manifest = json.loads((path / ckpt.MANIFEST).read_text())
    files = ckpt.checkpoint_files(path)
    assert sorted(manifest["files"]) == files and {"trainer_state.pt", "rng/rank_00000.pt", ".metadata"} <= set(files)
    for name, entry in manifest["files"].items():
        data = (path / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert ckpt.verify_checkpoint(path) == []
    assert ckpt.latest_valid_checkpoint(tmp_path) == (path, [])


def test_a_corrupted_shard_is_named_and_resume_falls_back(tmp_path):
    first, optimizer = small_trainer(0)
    save_checkpoint(tmp_path, 1, model=first, optimizer=optimizer)
    second, optimizer = small_trainer(1)
    newest = save_checkpoint(tmp_path, 2, model=second, optimizer=optimizer)
    shard = largest_shard(newest)
    size = shard.stat().st_size
    flip_middle_bytes(shard)
    assert shard.stat().st_size == size and shard.stat().st_size >= 4096
    expected = f"{shard.name}: SHA-256 differs from the manifest (corrupted)"
    assert ckpt.verify_checkpoint(newest) == [expected]
    path, problems = ckpt.latest_valid_checkpoint(tmp_path)
    assert path == tmp_path / "step_000001" and problems == [f"step_000002/{expected}"]
    fresh, fresh_optimizer = small_trainer(2)
    with pytest.raises(ckpt.CheckpointError, match=f"step_000002 fails verification: {re.escape(expected)}"):
        load_checkpoint(newest, model=fresh, optimizer=fresh_optimizer)
    load_checkpoint(path, model=fresh, optimizer=fresh_optimizer, verify=False)
    for a, b in zip(fresh.parameters(), first.parameters()):
        assert torch.equal(a, b)  # the weights of step 1, not garbage


@pytest.mark.parametrize("name", ["trainer_state.pt", "rng/rank_00000.pt", "shard"])
def test_a_truncated_file_is_named(tmp_path, name):
    model, optimizer = small_trainer()
    path = save_checkpoint(tmp_path, 1, model=model, optimizer=optimizer)
    file = largest_shard(path) if name == "shard" else path / name
    written = file.stat().st_size
    file.write_bytes(file.read_bytes()[: written // 2])
    relative = file.relative_to(path).as_posix()
    expected = f"{relative}: {written // 2} bytes, {written} written (truncated)"
    assert ckpt.verify_checkpoint(path) == [expected]
    assert ckpt.latest_valid_checkpoint(tmp_path) == (None, [f"step_000001/{expected}"])
    with pytest.raises(ckpt.CheckpointError) as info:
        load_checkpoint(path, model=model, optimizer=optimizer)
    assert relative in str(info.value) and "\n" not in str(info.value)


def test_a_checkpoint_without_manifest_loads_unverified_and_names_a_cut_file(tmp_path, caplog):
    model, optimizer = small_trainer()
    path = save_checkpoint(tmp_path, 1, model=model, optimizer=optimizer, extra_state={"x": 1})
    (path / ckpt.MANIFEST).unlink()  # as written before manifests existed
    assert ckpt.verify_checkpoint(path) == [] and "is not verified" in caplog.text
    assert load_checkpoint(path, model=model, optimizer=optimizer) == {"x": 1}
    state = path / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[:100])
    with pytest.raises(ckpt.CheckpointError, match=r"checkpoint file .*trainer_state.pt cannot be read: \w+") as info:
        load_checkpoint(path, model=model, optimizer=optimizer)
    assert "\n" not in str(info.value)  # one line, not the zip reader's trace
    flip_middle_bytes(largest_shard(path))
    state.write_bytes(b"")
    with pytest.raises(ckpt.CheckpointError, match="cannot read the model/optimizer shards|cannot be read"):
        load_checkpoint(path, model=model, optimizer=optimizer)


def test_an_unreadable_manifest_fails_verification(tmp_path):
    model, optimizer = small_trainer()
    path = save_checkpoint(tmp_path, 1, model=model, optimizer=optimizer)
    (path / ckpt.MANIFEST).write_text("{not json")
    (problem,) = ckpt.verify_checkpoint(path)
    assert problem.startswith("MANIFEST.json: unreadable")


FULL_DISK = {
    "ENOSPC from the shard writer": OSError(errno.ENOSPC, "No space left on device"),
    "torch.save's zip writer": RuntimeError(
        "[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file data/0: file write failed"
    ),
}


@pytest.mark.parametrize("where", ["shards", "trainer_state"])
@pytest.mark.parametrize("failure", FULL_DISK)
def test_a_full_disk_says_so_with_the_path(tmp_path, monkeypatch, where, failure):
    import torch.distributed.checkpoint.filesystem as dcp_filesystem

    model, optimizer = small_trainer()
    save_checkpoint(tmp_path, 1, model=model, optimizer=optimizer)

    def no_space(*args, **kwargs):
        raise FULL_DISK[failure]

    if where == "shards":
        monkeypatch.setattr(dcp_filesystem, "_write_item", no_space)
    else:
        real = ckpt._save_file
        monkeypatch.setattr(
            ckpt, "_save_file", lambda obj, path: no_space() if path.name == "trainer_state.pt" else real(obj, path)
        )
    with pytest.raises(ckpt.CheckpointWriteError) as info:
        save_checkpoint(tmp_path, 2, model=model, optimizer=optimizer)
    error = info.value
    assert error.errno == errno.ENOSPC and isinstance(error, OSError)
    assert str(error).startswith("[Errno 28] no space left on device: cannot write the checkpoint (")
    assert error.filename == str(tmp_path / "step_000002.tmp")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000001"]  # the partial save is removed
    assert latest_checkpoint(tmp_path).name == "step_000001"


def _two_rank_worker(rank: int, directory: str) -> dict:
    import torch.distributed as dist

    root = Path(directory)
    model, optimizer = small_trainer(0)
    save_checkpoint(root, 1, model=model, optimizer=optimizer)
    newest = save_checkpoint(root, 2, model=model, optimizer=optimizer)
    shares = sorted(json.loads((newest / ckpt.MANIFEST).read_text())["files"])
    if rank == 0:
        flip_middle_bytes(newest / shares[1])  # a file that rank 1 hashes, not rank 0
    dist.barrier()
    path, problems = ckpt.latest_valid_checkpoint(root)
    outcome = {"latest": path.name if path else None, "problems": problems}
    # A full disk on rank 1 alone: every rank raises, none waits forever in a collective.
    real = ckpt._save_file
    if rank == 1:
        ckpt._save_file = lambda obj, p: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device"))
    try:
        save_checkpoint(root, 3, model=model, optimizer=optimizer)
    except ckpt.CheckpointWriteError as error:
        outcome["save_error"] = error.errno
    finally:
        ckpt._save_file = real
    outcome["left"] = sorted(p.name for p in root.iterdir())
    return outcome


@pytest.mark.skipif(not GLOO, reason="needs torch.distributed gloo")
def test_every_rank_takes_the_same_decision(tmp_path):
    try:
        results = run_gloo(_two_rank_worker, str(tmp_path), timeout=240)
    except TimeoutError:
        pytest.fail("a rank is stuck in a collective")
    assert results[0] == results[1]
    problem = results[0]["problems"]
    assert results[0]["latest"] == "step_000001" and len(problem) == 1 and "SHA-256 differs" in problem[0]
    assert results[0]["save_error"] == errno.ENOSPC and results[0]["left"] == ["step_000001", "step_000002"]
