import pytest
import torch

from emf_lightning.encoders import BagOfWordsEncoder, FeatureCache, build_encoder
from emf_lightning.encoders.precomputed import MissingCaptionError, PrecomputedEncoder, export_features

CAPTIONS = ["a red circle", "a small blue square left of a green triangle", "two yellow squares"]


@pytest.fixture()
def cache_root(tmp_path):
    encoder = BagOfWordsEncoder()
    cache = FeatureCache(encoder, root=tmp_path / "cache")
    cache.precompute(CAPTIONS)
    cache.save()
    return tmp_path / "cache", encoder


def test_serves_exactly_what_the_source_encoder_computed(cache_root):
    root, source = cache_root
    served = build_encoder("precomputed", cache_dir=str(root))  # a root with one cache folder inside
    want, got = source.encode(CAPTIONS[::-1]), served.encode(CAPTIONS[::-1])
    assert served.dim == source.dim and len(served) == len(CAPTIONS)
    assert torch.equal(got.tokens, want.tokens) and torch.equal(got.mask, want.mask)
    assert torch.equal(got.pooled, want.pooled)
    assert served.cache_key != source.cache_key  # its own key: a FeatureCache in front stays separate


def test_missing_caption_names_it(cache_root):
    root, _ = cache_root
    served = PrecomputedEncoder(str(root))
    with pytest.raises(MissingCaptionError, match="a purple hexagon"):
        served.encode(["a red circle", "a purple hexagon"])


def test_half_precision_export_round_trip(cache_root, tmp_path):
    root, source = cache_root
    folder = export_features(root, tmp_path / "export", captions=CAPTIONS[:2], dtype="float16")
    stored = next(folder.glob("part-*.safetensors")).stat().st_size
    served = PrecomputedEncoder(str(folder))
    got, want = served.encode(CAPTIONS[:2]), source.encode(CAPTIONS[:2])
    assert got.tokens.dtype == torch.float32 and len(served) == 2
    assert torch.equal(got.tokens, want.tokens.half().float())
    with pytest.raises(MissingCaptionError):
        served.encode([CAPTIONS[2]])
    full = export_features(root, tmp_path / "export32", captions=CAPTIONS[:2], dtype="float32")
    assert next(full.glob("part-*.safetensors")).stat().st_size > 1.5 * stored


def test_no_cache_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="emf cache-features"):
        PrecomputedEncoder(str(tmp_path))
    assert not PrecomputedEncoder.weights_available(cache_dir=str(tmp_path))
