"""Autoencoders: tiny random diffusers VAEs (KL, DC) behind LatentAutoencoder, offline."""

from __future__ import annotations

import json

import pytest
import torch

from emf_lightning.autoencoders import (
    DCAutoencoder,
    IdentityAutoencoder,
    KLAutoencoder,
    LatentAutoencoder,
    build_autoencoder,
)
from emf_lightning.utils.weights import MissingWeightsError

pytest.importorskip("diffusers")


def _images(n: int = 3, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.fixture(scope="module")
def kl() -> KLAutoencoder:
    return build_autoencoder("sd-vae", pretrained=False)  # tiny config: scale 0.5, shift 0.1, f2, 4 channels


@pytest.fixture(scope="module")
def dc() -> DCAutoencoder:
    return build_autoencoder("dc-ae-f32", pretrained=False)  # tiny config: scale 0.4, no shift, f2, 8 channels


def test_kl_scaling_and_shift_are_applied_exactly(kl):
    x = _images()
    z = kl.encode(x)
    assert z.shape == (3, 4, 16, 16) and kl.latent_shape(32) == (4, 16, 16) and z.dtype == torch.float32
    with torch.no_grad():
        raw = kl.vae.encode(x).latent_dist.mean
        assert torch.equal(z, (raw - 0.1) * 0.5)
        assert torch.equal(kl.decode(z), kl.vae.decode(z / 0.5 + 0.1).sample.clamp(-1, 1))
    torch.testing.assert_close(kl.unscale(kl.scale(raw)), raw)
    assert (kl.scaling_factor, kl.shift_factor) == (0.5, 0.1)


def test_kl_posterior_sample_is_seeded(kl):
    x = _images(2)
    a = kl.encode(x, generator=torch.Generator().manual_seed(3), sample=True)
    b = kl.encode(x, generator=torch.Generator().manual_seed(3), sample=True)
    assert torch.equal(a, b) and not torch.equal(a, kl.encode(x))
    with torch.no_grad():
        raw = kl.vae.encode(x).latent_dist.sample(generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, (raw - 0.1) * 0.5)


def test_dc_scaling_and_determinism(dc):
    x = _images()
    z = dc.encode(x)
    assert z.shape == (3, 8, 16, 16) and dc.downsample == 2 and dc.shift_factor == 0.0
    with torch.no_grad():
        assert torch.equal(z, dc.vae.encode(x).latent * 0.4)
        assert torch.equal(dc.decode(z), dc.vae.decode(z / 0.4).sample.clamp(-1, 1))
    with pytest.raises(ValueError, match="deterministic"):
        dc.encode(x, sample=True)
    with pytest.raises(ValueError, match="deterministic"):
        DCAutoencoder(pretrained=False, sample_posterior=True)


def test_chunked_encode_and_decode_match_one_call():
    small = KLAutoencoder(pretrained=False, batch_size=2)
    big = KLAutoencoder(pretrained=False, batch_size=8)
    x = _images(5)
    # CPU kernels round differently for different batch sizes: equal to float32 noise
    torch.testing.assert_close(small.encode(x), big.encode(x), rtol=1e-5, atol=1e-5)
    z = big.encode(x)
    torch.testing.assert_close(small.decode(z), big.decode(z), rtol=1e-5, atol=1e-5)


def test_identity_is_pixel_space():
    ae = build_autoencoder("none")
    assert isinstance(ae, IdentityAutoencoder) and ae.latent_shape(32) == (3, 32, 32) and ae.cache_key == "none"
    x = _images(2)
    assert torch.equal(ae.encode(x), x)
    assert torch.equal(ae.decode(2 * x), (2 * x).clamp(-1, 1))
    assert build_autoencoder(None).cache_key == "none"


def test_frozen_and_input_checks(kl):
    assert not any(p.requires_grad for p in kl.parameters())
    kl.train()
    assert not kl.training and not kl.vae.training
    with pytest.raises(ValueError, match="not divisible by the autoencoder's downsampling factor 2"):
        kl.encode(_images(1, size=31))
    with pytest.raises(ValueError, match=r"decode expects latents \[B, 4, h, w\]"):
        kl.decode(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"encode expects images \[B, 3, H, W\]"):
        kl.encode(torch.zeros(1, 1, 8, 8))


def test_spec_rebuilds_the_same_autoencoder(kl):
    again = build_autoencoder(kl.spec)
    assert again.cache_key == kl.cache_key
    x = _images(1)
    assert torch.equal(again.encode(x), kl.encode(x))
    assert build_autoencoder({"name": "sd-vae", "pretrained": False}).cache_key == kl.cache_key


def test_local_folders_load_offline(tmp_path, kl, dc):
    kl.vae.save_pretrained(tmp_path / "sd")
    loaded = build_autoencoder(str(tmp_path / "sd"))
    assert isinstance(loaded, KLAutoencoder) and str(tmp_path / "sd") in loaded.cache_key
    x = _images(2)
    assert torch.equal(loaded.encode(x), kl.encode(x))  # scale and shift come from the saved config
    # a pipeline folder keeps its VAE in vae/
    dc.vae.save_pretrained(tmp_path / "pipe" / "vae")
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    pipe = build_autoencoder(str(tmp_path / "pipe"))
    assert isinstance(pipe, DCAutoencoder) and pipe.subfolder == "vae"
    assert torch.equal(pipe.encode(x), dc.encode(x))


def test_missing_weights_name_the_model_and_where_we_looked(tmp_path):
    with pytest.raises(MissingWeightsError, match="stabilityai/sd-vae-ft-ema") as err:
        build_autoencoder("sd-vae")
    assert "hub" in str(err.value)
    with pytest.raises(MissingWeightsError, match="'vae' subfolder"):
        build_autoencoder("flux-vae")
    assert not KLAutoencoder.weights_available()
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    with pytest.raises(MissingWeightsError, match=f"Looked in: {tmp_path}.*diffusion_pytorch_model.safetensors"):
        build_autoencoder(str(tmp_path))
    with pytest.raises(MissingWeightsError, match="nothing-here does not exist"):  # a missing folder, said plainly
        build_autoencoder(str(tmp_path / "nothing-here"))
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    with pytest.raises(ValueError, match="config.json names 'UNet2DModel'"):
        build_autoencoder(str(tmp_path))


def test_registry_rejects_unknown_classes():
    with pytest.raises(ValueError, match="does not name a subclass of LatentAutoencoder"):
        build_autoencoder("torch.nn.Linear")
    with pytest.raises(ValueError, match="needs 'class_path'"):
        build_autoencoder({"init_args": {}})
    assert issubclass(KLAutoencoder, LatentAutoencoder)
