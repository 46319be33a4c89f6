"""The tiny Qwen2.5-VL and model loading: built and loaded from disk, a video batch forward, attention, freezing."""

from __future__ import annotations

import pytest
import torch

import medgrpo
from medgrpo.data.collate import VideoCollator
from medgrpo.data.loader import VideoDataset
from medgrpo.demo.tiny_model import build_tiny_model
from medgrpo.train.model import (
    ModelConfig,
    compile_decoder_layers,
    decoder_layers,
    final_hidden_states,
    load_model,
    load_reference_model,
    resolve_attention,
    vision_tower,
)
from medgrpo.train.qwen import lm_head_weight

ANSWERS = ("1.0-2.0 seconds.", "clipping")


def video_batch(dataset: VideoDataset, tokenizer):
    """The dataset's records collated with their answers and patchified."""
    return VideoCollator(tokenizer, with_answers=True)([dataset[i] for i in range(len(dataset))]).to("cpu")


def test_tiny_model_matches_the_tokenizer_and_loads_from_disk(tiny_model_dir, tokenizer, tmp_path):
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model_dir, local_files_only=True)
    config = model.config
    ids = tokenizer.convert_tokens_to_ids
    assert (config.video_token_id, config.image_token_id) == (ids("<|video_pad|>"), ids("<|image_pad|>"))
    vision_ids = (config.vision_start_token_id, config.vision_end_token_id)
    assert vision_ids == (ids("<|vision_start|>"), ids("<|vision_end|>"))
    assert config.text_config.vocab_size == len(tokenizer) and config.text_config.eos_token_id == ids("<|im_end|>")
    assert model.generation_config.eos_token_id == [ids("<|im_end|>"), ids("<|endoftext|>")]
    vision = config.vision_config
    assert (vision.patch_size, vision.temporal_patch_size, vision.spatial_merge_size) == (14, 2, 2)
    assert vision.out_hidden_size == config.text_config.hidden_size and vision.fullatt_block_indexes == [1]
    head_dim = config.text_config.hidden_size // config.text_config.num_attention_heads
    assert sum(config.text_config.rope_parameters["mrope_section"]) == head_dim // 2
    # Same seed, same weights; the saved files are those weights.
    again = build_tiny_model(tmp_path / "again", tokenizer)
    for (name, saved), rebuilt in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(saved, rebuilt), name
    assert (tiny_model_dir / "model.safetensors").is_file()


def test_video_batch_forward_and_final_hidden_states(tiny_model_dir, tokenizer, clip_dataset, tmp_path):
    batch = video_batch(clip_dataset(tmp_path, ANSWERS), tokenizer)
    assert batch.video_grid_thw.tolist() == [[2, 4, 4], [3, 4, 4]]
    model = load_model(ModelConfig(str(tiny_model_dir), dtype="float32"))
    assert model.config._attn_implementation == "sdpa" and model.training
    logits = model(**batch.model_inputs()).logits
    assert logits.shape == (*batch.input_ids.shape, len(tokenizer)) and torch.isfinite(logits).all()
    hidden = final_hidden_states(model, **batch.model_inputs())
    assert hidden.shape == (*batch.input_ids.shape, 64)
    torch.testing.assert_close(hidden @ lm_head_weight(model).T, logits, rtol=1e-5, atol=1e-5)
    # The fused head on those hidden states gives the logits' log-probs of the answer tokens.
    targets = batch.labels[:, 1:].clamp(min=0)
    logp, _ = medgrpo.linear_logprob(hidden[:, :-1], lm_head_weight(model), targets)
    expected = torch.log_softmax(logits[:, :-1].double(), -1).gather(-1, targets[..., None])[..., 0]
    mask = batch.labels[:, 1:] != -100
    torch.testing.assert_close(logp[mask].double(), expected[mask], rtol=1e-4, atol=1e-4)
    # The video changes the answer: the vision tower is in the path.
    other = batch.model_inputs() | {"pixel_values_videos": batch.pixel_values_videos.flip(0)}
    assert not torch.allclose(final_hidden_states(model, **other), hidden)


def test_attention_choice():
    assert resolve_attention("auto", "cpu", torch.bfloat16) == "sdpa"
    assert resolve_attention("eager", "cpu", torch.float32) == "eager"
    with pytest.raises(ValueError, match="'flash_attention_2' needs a CUDA device"):
        resolve_attention("flash_attention_2", "cpu", torch.bfloat16)
    with pytest.raises(ValueError, match="attention must be one of"):
        ModelConfig("x", attention="flash")
    with pytest.raises(ValueError, match="dtype must be one of"):
        ModelConfig("x", dtype="float16")


def test_auto_attention_asks_transformers_and_logs_the_choice(monkeypatch, caplog):
    from medgrpo.train import compat

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(compat, "flash_attention_implementations", lambda: ("flash_attention_3", "flash_attention_2"))
    with caplog.at_level("INFO", logger="medgrpo.train.model"):
        assert resolve_attention("auto", "cuda", torch.bfloat16) == "flash_attention_3"
    assert "attention: flash_attention_3 (auto: transformers reports" in caplog.text
    assert resolve_attention("auto", "cuda", torch.float32) == "sdpa"  # no fp32 flash kernels
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert resolve_attention("auto", "cuda", torch.bfloat16) == "flash_attention_2"  # FA3 is Hopper-only
    with pytest.raises(ValueError, match="reports flash_attention_2"):
        resolve_attention("flash_attention_3", "cuda", torch.bfloat16)
    monkeypatch.setattr(compat, "flash_attention_implementations", lambda: ())
    assert resolve_attention("auto", "cuda", torch.bfloat16) == "sdpa"


def test_a_flash_attn_module_alone_does_not_select_flash_attention(tmp_path, monkeypatch):
    # The flash-attn 4 wheel installs a `flash_attn` package (flash_attn/cute) that transformers refuses
    # for flash_attention_2: importability of the module must not decide, transformers' checks do.
    (tmp_path / "flash_attn" / "cute").mkdir(parents=True)
    (tmp_path / "flash_attn" / "__init__.py").write_text("")
    (tmp_path / "flash_attn" / "cute" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    from medgrpo.train import compat

    assert "flash_attention_2" not in compat.flash_attention_implementations()
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert resolve_attention("auto", "cuda", torch.bfloat16) == "sdpa"


def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json missing"):
        load_model(ModelConfig(str(tmp_path / "nowhere")))


def test_dtype_freezing_and_activation_checkpointing(tiny_model_dir, tokenizer, clip_dataset, tmp_path):
    batch = video_batch(clip_dataset(tmp_path, ANSWERS), tokenizer)
    plain = load_model(ModelConfig(str(tiny_model_dir), dtype="float32"))
    cfg = ModelConfig(str(tiny_model_dir), dtype="float32", freeze_vision=True, activation_checkpointing=True)
    model = load_model(cfg)
    assert all(not p.requires_grad for p in vision_tower(model).parameters())
    assert all(p.requires_grad for p in decoder_layers(model).parameters()) and model.lm_head.weight.requires_grad
    assert all(layer.gradient_checkpointing for layer in decoder_layers(model))
    # Recomputation changes neither the loss nor the gradients.
    losses = []
    for m in (plain, model):
        loss = m(**batch.model_inputs(), labels=batch.labels).loss
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[0], losses[1])
    for (name, p), q in zip(plain.named_parameters(), model.parameters()):
        if q.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)
        else:
            assert q.grad is None, name
    assert load_model(ModelConfig(str(tiny_model_dir))).lm_head.weight.dtype == torch.bfloat16


def test_reference_model_is_frozen_and_equal(tiny_model_dir):
    reference = load_reference_model(ModelConfig(str(tiny_model_dir), dtype="float32"))
    policy = load_model(ModelConfig(str(tiny_model_dir), dtype="float32"))
    assert not reference.training and all(not p.requires_grad for p in reference.parameters())
    for (name, p), q in zip(policy.named_parameters(), reference.parameters()):
        assert torch.equal(p, q), name


def test_compiled_decoder_layers_keep_names_and_outputs(tiny_model_dir, tokenizer, clip_dataset, tmp_path):
    batch = video_batch(clip_dataset(tmp_path, ("clipping",)), tokenizer)
    model = load_model(ModelConfig(str(tiny_model_dir), dtype="float32")).eval()
    names = list(model.state_dict())
    with torch.no_grad():
        expected = final_hidden_states(model, **batch.model_inputs())
        compile_decoder_layers(model, backend="eager")  # inductor needs a C++ toolchain: the tracing is what we test
        got = final_hidden_states(model, **batch.model_inputs())
    assert list(model.state_dict()) == names
    torch.testing.assert_close(got, expected)
