"""FID / KID against independent computations, Inception loading without downloads, reference cache."""

from __future__ import annotations

import tempfile

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image
from torch import nn

from emf_lightning.evaluation.fid import (
    CLEAN_FID_FILE,
    TORCH_FIDELITY_FILE,
    InceptionFeatures,
    ReferenceFeatureCache,
    extract_features,
    frechet_distance,
    kernel_inception_distance,
    load_inception,
)
from emf_lightning.utils.weights import MissingWeightsError


class TinyFeatures(nn.Module):
    """A small random conv net with the extractor contract: uint8 [B, 3, H, W] -> [B, 12]."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Conv2d(3, 12, 3, stride=2), nn.Tanh(), nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.float() / 127.5 - 1.0)


def _images(n: int, seed: int, bright: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(rng.integers(0, 256, size=(n, 16, 16, 3)) + bright, 0, 255).astype(np.uint8)


def _scipy_fid(a: np.ndarray, b: np.ndarray) -> float:
    """Textbook FID: ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 sqrtm(S_a S_b)), computed with scipy."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s_a @ s_b)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a + s_b - 2 * covmean.real))


def _numpy_kid(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with k(a, b) = (a.b / d + 1)^3 on the full sets."""
    d = x.shape[1]
    k = lambda a, b: (a @ b.T / d + 1.0) ** 3  # noqa: E731
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    m, n = len(x), len(y)
    return float(
        (kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1)) - 2 * kxy.mean()
    )


def test_fid_matches_scipy_sqrtm_on_features_of_a_random_extractor():
    extractor = TinyFeatures()
    real = extract_features(extractor, _images(64, seed=1), batch_size=16)
    fake = extract_features(extractor, _images(48, seed=2, bright=40), batch_size=16)
    ours = frechet_distance(real, fake)
    reference = _scipy_fid(real.numpy(), fake.numpy())
    assert reference > 1e-3  # the two sets differ, so the check is not 0 == 0
    assert ours == pytest.approx(reference, rel=1e-3)


def test_fid_of_a_translated_set_is_the_squared_shift():
    rng = np.random.default_rng(0)
    real = torch.from_numpy(rng.normal(size=(50, 6)))
    shift = torch.tensor([0.5, -1.0, 0.0, 2.0, 0.25, 0.0], dtype=torch.float64)
    # Same covariance, so the trace term vanishes and FID = ||shift||^2 = 5.3125.
    assert frechet_distance(real, real + shift) == pytest.approx(5.3125, rel=1e-6)
    assert abs(frechet_distance(real, real)) < 1e-8


def test_kid_full_subset_matches_numpy_unbiased_mmd_and_is_seeded():
    extractor = TinyFeatures(seed=3)
    real = extract_features(extractor, _images(40, seed=4))
    fake = extract_features(extractor, _images(40, seed=5, bright=60))
    # One subset of the full size is a permutation of the whole set: the estimate is permutation-invariant.
    mean, std = kernel_inception_distance(real, fake, subsets=1, subset_size=40)
    assert mean == pytest.approx(_numpy_kid(real.numpy(), fake.numpy()), rel=1e-6)
    assert std == 0.0
    # Random subsets: reproducible per seed, different across seeds, global RNG untouched.
    state = torch.random.get_rng_state()
    a = kernel_inception_distance(real, fake, subsets=5, subset_size=10, seed=7)
    assert torch.equal(state, torch.random.get_rng_state())
    assert a == kernel_inception_distance(real, fake, subsets=5, subset_size=10, seed=7)
    assert a != kernel_inception_distance(real, fake, subsets=5, subset_size=10, seed=8)
    # Different distributions score clearly above same-distribution sets.
    same = kernel_inception_distance(real[:20], real[20:], subsets=5, subset_size=20)[0]
    assert a[0] > 0 and a[0] > same


def test_kid_clips_subset_size_to_the_smaller_set():
    real = torch.randn(30, 4, dtype=torch.float64)
    fake = torch.randn(12, 4, dtype=torch.float64) + 1
    mean, _ = kernel_inception_distance(real, fake, subsets=3, subset_size=1000)
    assert np.isfinite(mean)


def test_metric_input_errors():
    with pytest.raises(ValueError, match="need at least 2 real and fake samples, got 1 and 5"):
        frechet_distance(torch.zeros(1, 3), torch.zeros(5, 3))
    with pytest.raises(ValueError, match="equal D"):
        kernel_inception_distance(torch.zeros(4, 3), torch.zeros(4, 2))
    with pytest.raises(ValueError, match=r"expected uint8 images \[N, H, W, 3\]"):
        extract_features(TinyFeatures(), np.zeros((2, 3, 8, 8), np.uint8))


def test_extract_features_is_independent_of_batch_size():
    extractor = TinyFeatures()
    imgs = _images(10, seed=9)
    a = extract_features(extractor, imgs, batch_size=3)
    b = extract_features(extractor, torch.from_numpy(imgs), batch_size=100)
    assert a.shape == (10, 12) and a.dtype == torch.float64
    torch.testing.assert_close(a, b)


def _isolate_caches(monkeypatch, tmp_path):
    """Point every default search location at empty temp folders."""
    monkeypatch.setenv("EMF_CACHE", str(tmp_path / "emf"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))


def test_missing_inception_raises_naming_every_place(monkeypatch, tmp_path):
    _isolate_caches(monkeypatch, tmp_path)
    with pytest.raises(MissingWeightsError) as info:
        load_inception()
    msg = str(info.value)
    for place in (
        tmp_path / "emf" / CLEAN_FID_FILE,
        tmp_path / "tmp" / CLEAN_FID_FILE,
        tmp_path / "hub" / "checkpoints" / TORCH_FIDELITY_FILE,
    ):
        assert str(place) in msg
    assert "inception_path" in msg
    assert "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt" in msg
    assert "huggingface-cli" not in msg  # Inception is not on the hub: no misleading hint
    assert len(info.value.looked_in) == 4
    with pytest.raises(MissingWeightsError, match="nope.pt"):
        load_inception(tmp_path / "nope.pt")


class _FakeInceptionGraph(nn.Module):
    """Stands in for clean-fid's TorchScript file: same `layers` entry point, tiny random weights."""

    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(nn.Conv2d(3, 5, 7, stride=8), nn.AdaptiveAvgPool2d(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def test_clean_fid_torchscript_loads_from_a_folder_and_uses_the_clean_resize(monkeypatch, tmp_path):
    _isolate_caches(monkeypatch, tmp_path)
    torch.manual_seed(0)
    graph = torch.jit.script(_FakeInceptionGraph())
    folder = tmp_path / "weights"
    folder.mkdir()
    torch.jit.save(graph, str(folder / CLEAN_FID_FILE))

    model = load_inception(folder)
    assert isinstance(model, InceptionFeatures) and model.protocol == "clean"
    assert "clean" in model.feature_id
    model.train()
    assert not model.training  # FID features never use batch statistics

    imgs = _images(2, seed=3)
    feats = model(torch.from_numpy(imgs).permute(0, 3, 1, 2))
    # Independent reference: PIL bicubic per float channel to 299, then (x - 128) / 128, then the graph.
    resized = np.stack(
        [
            np.stack(
                [
                    np.asarray(
                        Image.fromarray(img[..., c].astype(np.float32), mode="F").resize((299, 299), Image.BICUBIC)
                    )
                    for c in range(3)
                ],
                axis=-1,
            ).clip(0, 255)
            for img in imgs
        ]
    )
    x = (torch.from_numpy(resized).permute(0, 3, 1, 2) - 128.0) / 128.0
    expected = graph.layers(x).reshape(2, -1)
    torch.testing.assert_close(feats, expected)

    # The default search finds it in our own cache too.
    (tmp_path / "emf").mkdir()
    torch.jit.save(graph, str(tmp_path / "emf" / CLEAN_FID_FILE))
    assert load_inception().feature_id == model.feature_id


def test_inception_features_reject_float_input(tmp_path):
    model = InceptionFeatures(torch.jit.script(_FakeInceptionGraph()), "clean", "x")
    with pytest.raises(ValueError, match=r"expected uint8 images \[B, 3, H, W\]"):
        model(torch.zeros(1, 3, 8, 8))


def test_reference_cache_round_trip_and_key_sensitivity(tmp_path):
    cache = ReferenceFeatureCache(tmp_path)
    keys = ["a", "b", "c"]
    base = ReferenceFeatureCache.key(["shard-000.tar"], keys, 32, "feat")
    assert base == ReferenceFeatureCache.key("shard-000.tar", keys, 32, "feat")
    variants = [
        ReferenceFeatureCache.key(["shard-001.tar"], keys, 32, "feat"),
        ReferenceFeatureCache.key(["shard-000.tar"], ["a", "b", "d"], 32, "feat"),
        ReferenceFeatureCache.key(["shard-000.tar"], keys[:2], 32, "feat"),
        ReferenceFeatureCache.key(["shard-000.tar"], keys, 64, "feat"),
        ReferenceFeatureCache.key(["shard-000.tar"], keys, 32, "other"),
    ]
    assert len({base, *variants}) == 6

    calls = []
    feats = torch.randn(3, 4, dtype=torch.float64)

    def compute():
        calls.append(1)
        return feats

    first = cache.get_or_compute(["shard-000.tar"], keys, 32, "feat", compute)
    second = ReferenceFeatureCache(tmp_path).get_or_compute(["shard-000.tar"], keys, 32, "feat", compute)
    assert len(calls) == 1
    assert torch.equal(first, feats) and torch.equal(second, feats)
    assert cache.path(base).is_file()


def test_reference_cache_ignores_a_corrupt_file(tmp_path):
    cache = ReferenceFeatureCache(tmp_path)
    cache.path("k").write_bytes(b"not a zip")
    assert cache.load("k") is None


def test_torch_fidelity_file_without_the_package_is_a_clear_import_error(tmp_path):
    import importlib.util

    if importlib.util.find_spec("torch_fidelity") is not None:
        pytest.skip("torch-fidelity is installed; this checks the message when it is not")
    (tmp_path / TORCH_FIDELITY_FILE).write_bytes(b"placeholder")
    with pytest.raises(ImportError, match="needs the `torch-fidelity` package"):
        load_inception(tmp_path)
