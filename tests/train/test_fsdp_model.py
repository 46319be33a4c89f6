"""The tiny Qwen2.5-VL under FSDP2 (gloo, 2 CPU ranks): one training step equals one process, DCP round trip, export.

Each rank holds a different sample; the loss is the local token sum over the global token count
(reduced on device) and the gradients are summed over ranks (``gradient_divide_factor=1``), so the
sharded step must equal a one-process step on both samples.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import medgrpo
from medgrpo.data.collate import VideoCollator
from medgrpo.data.loader import VideoDataset
from medgrpo.testing.distributed import GLOO, run_gloo

WORLD_SIZE = 2
LR = 1e-3


def make_batches(dataset: VideoDataset, tokenizer) -> list[dict[str, torch.Tensor]]:
    """One single-sample batch per rank (4- and 6-frame clips at 56×56), as plain tensors."""
    collate = VideoCollator(tokenizer, with_answers=True)
    batches = []
    for i in range(len(dataset)):
        batch = collate([dataset[i]]).to("cpu")
        batches.append(batch.model_inputs() | {"labels": batch.labels})
    return batches


def local_loss(model, batch: dict[str, torch.Tensor], global_tokens: torch.Tensor) -> torch.Tensor:
    """Negative answer log-likelihood through the fused head, summed, over the global token count."""
    from medgrpo.train.model import final_hidden_states
    from medgrpo.train.qwen import lm_head_weight

    inputs = {k: v for k, v in batch.items() if k != "labels"}
    hidden = final_hidden_states(model, **inputs)
    labels = batch["labels"][:, 1:]
    logp, _ = medgrpo.linear_logprob(hidden[:, :-1], lm_head_weight(model), labels.clamp(min=0))
    return -(logp * (labels != -100)).sum() / global_tokens


def token_count(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return (batch["labels"][:, 1:] != -100).sum().float()


def single_process_step(model_dir: str, batches) -> dict[str, dict[str, torch.Tensor]]:
    from medgrpo.train.model import ModelConfig, load_model

    model = load_model(ModelConfig(model_dir, dtype="float32"))
    total = sum(token_count(b) for b in batches)
    sum(local_loss(model, b, total) for b in batches).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    torch.optim.AdamW(model.parameters(), lr=LR).step()
    return {"grads": grads, "params": {name: p.detach().clone() for name, p in model.named_parameters()}}


def sharded_model(model_dir: str):
    from medgrpo.train.model import ModelConfig, load_model, shard_model

    model = load_model(ModelConfig(model_dir, dtype="float32"))
    return shard_model(model, param_dtype=None, reduce_dtype=None, gradient_divide_factor=1.0)


def full_params(model) -> dict[str, torch.Tensor]:
    return {name: p.full_tensor().detach() for name, p in model.named_parameters()}


def max_error(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> float:
    assert got.keys() == expected.keys()
    return max(float((got[k] - expected[k]).abs().max()) for k in got)


def train_step(model, optimizer, batch) -> None:
    global_tokens = token_count(batch)
    dist.all_reduce(global_tokens)
    local_loss(model, batch, global_tokens).backward()
    optimizer.step()
    optimizer.zero_grad()


def worker(rank: int, paths: dict, batches, expected) -> dict[str, float]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    from medgrpo.train.checkpoint import export_hf, latest_checkpoint, load_checkpoint, save_checkpoint
    from medgrpo.train.model import decoder_layers, vision_tower
    from medgrpo.train.qwen import lm_head_weight

    out = {}
    model = sharded_model(paths["model"])
    units = [*decoder_layers(model), vision_tower(model), model]
    out["fsdp_units"] = float(sum(isinstance(m, FSDPModule) for m in model.modules()) == len(units))
    out["sharded_outside_forward"] = float(isinstance(model.lm_head.weight, DTensor))
    # One step on this rank's sample; the lm-head weight the fused head sees is the gathered one.
    batch = batches[rank]
    global_tokens = token_count(batch)
    dist.all_reduce(global_tokens)
    loss = local_loss(model, batch, global_tokens)
    out["head_weight_gathered"] = float(not isinstance(lm_head_weight(model), DTensor))
    loss.backward()
    out["grad_error"] = max_error({n: p.grad.full_tensor() for n, p in model.named_parameters()}, expected["grads"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    optimizer.step()
    optimizer.zero_grad()
    out["param_error"] = max_error(full_params(model), expected["params"])

    # DCP round trip into a fresh sharded model and optimizer; then both take the same next step.
    save_checkpoint(paths["checkpoints"], 1, model=model, optimizer=optimizer, extra_state={"samples_seen": 2})
    fresh = sharded_model(paths["model"])
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=LR)
    extra = load_checkpoint(latest_checkpoint(paths["checkpoints"]), model=fresh, optimizer=fresh_optimizer)
    out["extra_state_ok"] = float(extra == {"samples_seen": 2})
    out["reload_error"] = max_error(full_params(fresh), full_params(model))
    train_step(model, optimizer, batches[1 - rank])
    train_step(fresh, fresh_optimizer, batches[1 - rank])
    out["resumed_step_error"] = max_error(full_params(fresh), full_params(model))

    # Export: the Hugging Face directory holds exactly the gathered weights.
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    export_hf(model, AutoTokenizer.from_pretrained(paths["tokenizer"]), paths["export"])
    if rank == 0:
        loaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(paths["export"], local_files_only=True)
        out["export_error"] = max_error(dict(loaded.state_dict()), full)
        architectures = json.loads((Path(paths["export"]) / "config.json").read_text())["architectures"]
        out["export_architecture_ok"] = float(architectures == ["Qwen2_5_VLForConditionalGeneration"])
    return out


@pytest.mark.slow
@pytest.mark.skipif(not GLOO, reason="needs torch.distributed gloo")
def test_fsdp2_tiny_qwen_step_checkpoint_and_export(tiny_model_dir, tokenizer, clip_dataset, tmp_path):
    batches = make_batches(clip_dataset(tmp_path, ("1.0-2.0 seconds.", "clipping and cutting")), tokenizer)
    expected = single_process_step(str(tiny_model_dir), batches)
    paths = {"model": str(tiny_model_dir), "tokenizer": str(tiny_model_dir)}
    paths |= {name: str(tmp_path / name) for name in ("checkpoints", "export")}
    results = run_gloo(worker, paths, batches, expected, world_size=WORLD_SIZE)
    for rank in range(WORLD_SIZE):
        out = results[rank]
        assert out["fsdp_units"] == 1.0 and out["sharded_outside_forward"] == 1.0, out
        assert out["head_weight_gathered"] == 1.0 and out["extra_state_ok"] == 1.0, out
        assert out["grad_error"] < 1e-5 and out["param_error"] < 1e-5, out
        assert out["reload_error"] == 0.0 and out["resumed_step_error"] == 0.0, out
    assert results[0]["export_error"] == 0.0 and results[0]["export_architecture_ok"] == 1.0
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000001"]
