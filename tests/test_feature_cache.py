"""FeatureCache: exact equality with the encoder, only misses computed, persistence, robustness."""

from __future__ import annotations

import json

import pytest
import torch

from emf_lightning.encoders import BagOfWordsEncoder, FeatureCache, LLMEncoder
from emf_lightning.encoders.cache import cache_dir_name


class CountingEncoder(BagOfWordsEncoder):
    """A bag-of-words encoder that records every caption list it is asked to encode."""

    def __init__(self, dim: int = 8):
        super().__init__(dim=dim)
        self.calls: list[list[str]] = []

    def encode(self, captions):
        self.calls.append(list(captions))
        return super().encode(captions)


CAPTIONS = ["a red circle", "two blue squares left of a star", "sky"]


def assert_same(a, b) -> None:
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.mask, b.mask) and torch.equal(a.pooled, b.pooled)


@pytest.fixture(scope="module")
def llm() -> LLMEncoder:
    return LLMEncoder(pretrained=False)


def test_cache_returns_exactly_what_the_encoder_computes(llm, tmp_path) -> None:
    cache = FeatureCache(llm, tmp_path)
    first = cache.encode(CAPTIONS)
    assert_same(first, llm.encode(CAPTIONS))
    assert_same(cache.encode(CAPTIONS), first)  # all hits now
    assert (cache.hits, cache.misses) == (3, 3)
    # a different order and a subset come out as the encoder would pad them
    subset = cache.encode([CAPTIONS[2], CAPTIONS[0]])
    assert subset.tokens.shape[1] == int(first.mask[0].sum())
    torch.testing.assert_close(subset.tokens, llm.encode([CAPTIONS[2], CAPTIONS[0]]).tokens, atol=1e-6, rtol=0)
    cache.save()
    reloaded = FeatureCache(llm, tmp_path)
    assert len(reloaded) == 3
    assert_same(reloaded.encode(CAPTIONS), first)
    assert reloaded.misses == 0


def test_only_misses_are_computed_once_each(tmp_path) -> None:
    enc = CountingEncoder()
    cache = FeatureCache(enc, tmp_path)
    cache.encode(["a", "b", "a"])
    cache.encode(["b", "c", "c", "a", "d"])
    assert enc.calls == [["a", "b"], ["c", "d"]]
    cache.encode(["d", "a"])
    assert len(enc.calls) == 2 and len(cache) == 4
    assert (cache.hits, cache.misses) == (1 + 3 + 2, 4)  # a repeat within a call is a hit too


def test_cache_persists_across_instances_without_encoder_calls(tmp_path) -> None:
    enc = CountingEncoder()
    FeatureCache(enc, tmp_path).precompute(CAPTIONS, batch_size=2)
    fresh = CountingEncoder()
    cache = FeatureCache(fresh, tmp_path)
    assert len(cache) == 3 and "sky" in cache
    assert_same(cache.encode(CAPTIONS), enc.encode(CAPTIONS))
    assert fresh.calls == []
    key = json.loads((cache.dir / "cache_key.json").read_text())
    assert key["cache_key"] == enc.cache_key and key["dim"] == 8


def test_precompute_skips_cached_and_saves_each_chunk(tmp_path) -> None:
    enc = CountingEncoder()
    cache = FeatureCache(enc, tmp_path)
    assert cache.precompute(CAPTIONS + ["sky", "dog"], batch_size=3) == 4
    # unique, uncached, sorted by length (less padding), in chunks of 3
    assert enc.calls == [["sky", "dog", "a red circle"], ["two blue squares left of a star"]]
    assert len(list(cache.dir.glob("part-*.safetensors"))) == 2 and cache.unsaved == 0
    assert cache.precompute(["dog", "cat"]) == 1
    with pytest.raises(ValueError, match="empty caption"):
        cache.precompute(["ok", ""])


def test_in_memory_cache_has_no_folder() -> None:
    cache = FeatureCache(CountingEncoder(), root=None)
    cache.encode(["a"])
    assert cache.dir is None and cache.save() is None and cache.unsaved == 1


def test_two_writers_share_one_folder(tmp_path) -> None:
    one, two = FeatureCache(CountingEncoder(), tmp_path), FeatureCache(CountingEncoder(), tmp_path)
    one.encode(["a", "b"])
    two.encode(["b", "c"])
    one.save(), two.save()
    assert one.reload() == 1 and len(one) == 3  # picks up "c" from the other writer, keeps its own "b"
    third = CountingEncoder()
    union = FeatureCache(third, tmp_path)
    assert len(union) == 3 and third.calls == []
    union.compact()
    assert len(list(union.dir.glob("part-*.safetensors"))) == 1
    assert_same(FeatureCache(CountingEncoder(), tmp_path).encode(["a", "b", "c"]), union.encode(["a", "b", "c"]))


def test_corrupt_part_is_skipped_counted_and_logged(tmp_path, caplog) -> None:
    cache = FeatureCache(CountingEncoder(), tmp_path)
    cache.encode(["a", "b"])
    cache.save()
    (cache.dir / "part-0-broken.safetensors").write_bytes(b"\x10\x00\x00\x00not a safetensors file")
    with caplog.at_level("WARNING"):
        again = FeatureCache(CountingEncoder(), tmp_path)
    assert again.skipped_parts == 1 and len(again) == 2
    assert "skipping unreadable part" in caplog.text and "part-0-broken" in caplog.text


def test_folders_are_per_encoder_and_safe(tmp_path) -> None:
    a = FeatureCache(BagOfWordsEncoder(dim=8), tmp_path)
    b = FeatureCache(BagOfWordsEncoder(dim=8, seed=1), tmp_path)
    assert a.dir != b.dir and a.dir.parent == tmp_path
    name = cache_dir_name("llm:Qwen/Qwen3-0.6B:layer-1:tpl 1")
    assert name.startswith("llm_Qwen_Qwen3-0.6B_layer-1_tpl_1-") and len(name.split("-")[-1]) == 12
    assert cache_dir_name("a/b") != cache_dir_name("a_b")  # sanitising alone would merge them


def test_null_caption_is_refused(tmp_path) -> None:
    cache = FeatureCache(CountingEncoder(), tmp_path)
    with pytest.raises(ValueError, match="the empty caption is the null condition"):
        cache.encode(["a", ""])


# -- emf cache-features ----------------------------------------------------------------------------
from emf_lightning.commands import cache_features  # noqa: E402


def test_cache_features_from_a_captions_file(tmp_path, capsys) -> None:
    captions = tmp_path / "captions.txt"
    captions.write_text("a red circle\n\nsky\na red circle\n  two cats \n")
    root = tmp_path / "cache"
    argv = ["--encoder", "bow", "--encoder-arg", "dim=8", "--captions", str(captions), "--root", str(root)]
    assert cache_features.main(argv) == 0
    out = capsys.readouterr().out
    assert "skipped 1: blank line" in out and "3 unique, 0 already cached, 3 to compute" in out
    cache = FeatureCache(BagOfWordsEncoder(dim=8), root)
    assert sorted(cache._pooled) == ["a red circle", "sky", "two cats"]
    assert len(list(cache.dir.glob("part-*.safetensors"))) == 1  # compacted
    assert cache_features.main(argv) == 0
    assert "3 already cached, 0 to compute" in capsys.readouterr().out


def test_cache_features_from_shards_with_paraphrases(tmp_path, capsys) -> None:
    import webdataset as wds

    shard = tmp_path / "shard-000000.tar"
    with wds.TarWriter(str(shard)) as sink:
        sink.write(
            {"__key__": "s0", "txt": "a red circle", "json": {"captions": ["a circle that is red", "a red circle"]}}
        )
        sink.write({"__key__": "s1", "txt": "sky", "png": b"not decoded"})
        sink.write({"__key__": "s2", "json": {"objects": []}})  # no caption at all
    root = tmp_path / "cache"
    base = ["--encoder", "label", "--encoder-arg", "num_classes=5", "--shards", str(shard), "--root", str(root)]
    assert cache_features.main(base + ["--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "skipped 1: sample without caption" in out and "3 unique, 0 already cached, 3 to compute" in out
    assert not root.exists()  # a dry run writes nothing
    assert cache_features.main(base + ["--no-paraphrases"]) == 0
    assert "2 unique" in capsys.readouterr().out


def test_cache_features_reads_an_encoder_config(tmp_path, capsys) -> None:
    config = tmp_path / "train.yaml"
    config.write_text(
        "model:\n  init_args:\n    encoder:\n      class_path: emf_lightning.encoders.BagOfWordsEncoder\n"
        "      init_args: {dim: 6, seed: 3}\n"
    )
    captions = tmp_path / "c.jsonl"
    captions.write_text('{"caption": "a cat", "captions": ["one cat"]}\nnot json\n{"id": 1}\n')
    assert (
        cache_features.main(["--encoder", str(config), "--captions", str(captions), "--root", str(tmp_path / "r")]) == 0
    )
    out = capsys.readouterr().out
    assert "bow:dim6:seed3" in out and "2 unique" in out
    assert "skipped 1: bad JSON line" in out and "skipped 1: row without caption" in out


def test_cache_features_reports_missing_weights(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    captions = tmp_path / "c.txt"
    captions.write_text("a cat\n")
    assert cache_features.main(["--encoder", "t5", "--captions", str(captions), "--root", str(tmp_path)]) == 2
    assert "google/flan-t5-base" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="expects KEY=VALUE"):
        cache_features.main(["--encoder", "bow", "--encoder-arg", "dim", "--captions", str(captions)])
