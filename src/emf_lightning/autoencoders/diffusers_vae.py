"""Autoencoders from diffusers: `AutoencoderKL` (SD-VAE, FLUX VAE) and `AutoencoderDC` (SANA's DC-AE).

Weights load offline from a local folder or the Hugging Face cache (`utils/hub.py`); missing weights
raise `MissingWeightsError` naming the model, the subfolder and where we looked. The latent scaling is the VAE
config's: latents = (raw - shift_factor) * scaling_factor, and decode inverts it (shift 0 when the config has
none, e.g. SD-VAE and DC-AE; FLUX's VAE has one).
"""

from __future__ import annotations

import json
import logging
from typing import Any, ClassVar

import torch
from torch import Tensor

from emf_lightning.autoencoders.base import LatentAutoencoder
from emf_lightning.utils import hub
from emf_lightning.utils.model_helpers import random_init, short_hash
from emf_lightning.utils.specs import absolute_if_local_folder

log = logging.getLogger(__name__)

# Tiny random configs for tests (pretrained=False): 32 px images -> 16 x 16 latents, builds in well under a second.
TINY_KL: dict[str, Any] = dict(
    block_out_channels=(32, 64),
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    latent_channels=4,
    layers_per_block=1,
    norm_num_groups=32,
    sample_size=32,
    scaling_factor=0.5,
    shift_factor=0.1,
)
TINY_DC: dict[str, Any] = dict(
    latent_channels=8,
    attention_head_dim=32,
    encoder_block_types=("ResBlock", "EfficientViTBlock"),
    decoder_block_types=("ResBlock", "EfficientViTBlock"),
    encoder_block_out_channels=(32, 64),
    decoder_block_out_channels=(32, 64),
    encoder_layers_per_block=(1, 1),
    decoder_layers_per_block=(1, 1),
    encoder_qkv_multiscales=((), (5,)),
    decoder_qkv_multiscales=((), (5,)),
    scaling_factor=0.4,
)


class DiffusersAutoencoder(LatentAutoencoder):
    """Shared loading, scaling and keys for the diffusers VAEs. Subclasses name the diffusers class, the default
    model and a tiny config, and implement `_raw_encode` / `_raw_decode` / `downsample`.

    Args:
        model: Hugging Face id (in the local cache) or a local folder: a VAE folder, or a pipeline folder with
            the VAE in `subfolder`.
        subfolder: the VAE's folder inside a pipeline repository (e.g. "vae" for FLUX.1-dev).
        pretrained: False builds a tiny random VAE from `random_config` (tests only; logs a warning).
        random_config: overrides of the tiny config (pretrained=False).
        scaling_factor, shift_factor: override the config's (None = the config's; shift None in the config = 0).
        sample_posterior: encode draws from the posterior instead of taking its mean (KL only).
        batch_size: images (or latents) per VAE call in encode / decode, to bound memory.
        tiling: diffusers' tiled encode/decode for large images.
        variant: weight file variant, e.g. "fp16" (diffusion_pytorch_model.fp16.safetensors).
        seed: the random init's seed (pretrained=False).
        device, dtype: where and in which dtype the VAE runs (default CPU, float32).
    """

    diffusers_class: ClassVar[str] = ""
    default_model: ClassVar[str] = ""
    tiny_config: ClassVar[dict[str, Any]] = {}
    has_posterior: ClassVar[bool] = True

    def __init__(
        self,
        model: str | None = None,
        subfolder: str | None = None,
        pretrained: bool = True,
        random_config: dict[str, Any] | None = None,
        scaling_factor: float | None = None,
        shift_factor: float | None = None,
        sample_posterior: bool = False,
        batch_size: int = 8,
        tiling: bool = False,
        variant: str | None = None,
        seed: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
    ):
        super().__init__(batch_size=batch_size, device=device, dtype=dtype)
        if sample_posterior and not self.has_posterior:
            raise ValueError(
                f"{self.diffusers_class} is deterministic: it has no posterior to sample (sample_posterior=True)"
            )
        import diffusers

        cls = getattr(diffusers, self.diffusers_class)
        if pretrained:
            # a local folder by its absolute path: the latents' cache key does not depend on the working directory
            self.model_id = absolute_if_local_folder(model or self.default_model)
            self.subfolder = subfolder
            source, sub = hub.locate(self.model_id, subfolder, hub.diffusers_weights(variant))
            self.vae = hub.load(
                cls.from_pretrained, source, subfolder=sub, variant=variant, torch_dtype=self.compute_dtype
            )
            self._random_key = ""
        else:
            config = {**self.tiny_config, **(random_config or {})}
            self.model_id, self.subfolder = f"tiny-{self.diffusers_class}", None
            self._random_key = "random-" + short_hash(json.dumps({**config, "seed": seed}, sort_keys=True, default=str))
            log.warning("%s built with RANDOM weights (pretrained=False): for tests only", self.diffusers_class)
            self.vae = random_init(lambda: cls(**config), seed)
        if tiling:
            self.vae.enable_tiling()
        cfg = self.vae.config
        self.scaling_factor = float(cfg.get("scaling_factor", 1.0) if scaling_factor is None else scaling_factor)
        config_shift = cfg.get("shift_factor")
        self.shift_factor = float((config_shift or 0.0) if shift_factor is None else shift_factor)
        if self.scaling_factor == 0:
            raise ValueError(f"{self.model_id}: scaling_factor must be non-zero")
        self.sample_posterior = bool(sample_posterior)
        self._finish_init()

    @classmethod
    def weights_available(
        cls,
        model: str | None = None,
        subfolder: str | None = None,
        pretrained: bool = True,
        variant: str | None = None,
        **_: Any,
    ) -> bool:
        """Whether the weights `cls(model=..., subfolder=...)` would load are on this machine (loads nothing)."""
        return (
            True
            if not pretrained
            else hub.weights_available(model or cls.default_model, subfolder, hub.diffusers_weights(variant))
        )

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    def _key_parts(self) -> list[str]:
        parts = [self.model_id]
        if self.subfolder:
            parts.append(self.subfolder)
        if self._random_key:
            parts.append(self._random_key)
        parts += [
            f"scale{self.scaling_factor:g}",
            f"shift{self.shift_factor:g}",
            "sample" if self.sample_posterior else "mean",
            str(self.compute_dtype).removeprefix("torch."),
        ]
        return parts

    def scale(self, raw: Tensor) -> Tensor:
        """The VAE's raw latent -> the generator's latent."""
        return (raw - self.shift_factor) * self.scaling_factor

    def unscale(self, latents: Tensor) -> Tensor:
        """The generator's latent -> the VAE's raw latent (inverse of `scale`)."""
        return latents / self.scaling_factor + self.shift_factor

    def _raw_encode(self, images: Tensor, sample: bool, generator: torch.Generator | None) -> Tensor:
        raise NotImplementedError

    def _raw_decode(self, raw: Tensor) -> Tensor:
        return self.vae.decode(raw).sample

    def _encode_chunk(self, images: Tensor, sample: bool, generator: torch.Generator | None) -> Tensor:
        return self.scale(self._raw_encode(images, sample, generator))

    def _decode_chunk(self, latents: Tensor) -> Tensor:
        return self._raw_decode(self.unscale(latents))


class KLAutoencoder(DiffusersAutoencoder):
    """diffusers `AutoencoderKL`: SD-VAE (stabilityai/sd-vae-ft-ema: 4 channels, f8, scale 0.18215) or the FLUX VAE
    (black-forest-labs/FLUX.1-dev, subfolder vae: 16 channels, f8, scale 0.3611, shift 0.1159). Encode takes the
    posterior mean unless `sample_posterior` (or `encode(sample=True)`) asks for a draw."""

    name = "autoencoder-kl"
    diffusers_class = "AutoencoderKL"
    default_model = "stabilityai/sd-vae-ft-ema"
    tiny_config = TINY_KL

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def _raw_encode(self, images: Tensor, sample: bool, generator: torch.Generator | None) -> Tensor:
        posterior = self.vae.encode(images).latent_dist
        return posterior.sample(generator=generator) if sample else posterior.mean


class DCAutoencoder(DiffusersAutoencoder):
    """diffusers `AutoencoderDC`: SANA's deep-compression autoencoder (mit-han-lab/dc-ae-f32c32-sana-1.1-diffusers:
    32 channels, f32, so 1024 px -> 32 x 32 latents). Deterministic: it has no posterior to sample."""

    name = "autoencoder-dc"
    diffusers_class = "AutoencoderDC"
    default_model = "mit-han-lab/dc-ae-f32c32-sana-1.1-diffusers"
    tiny_config = TINY_DC
    has_posterior = False

    @property
    def downsample(self) -> int:
        return int(self.vae.spatial_compression_ratio)

    def _raw_encode(self, images: Tensor, sample: bool, generator: torch.Generator | None) -> Tensor:
        if sample:
            raise ValueError("AutoencoderDC is deterministic: it has no posterior to sample (sample=True)")
        return self.vae.encode(images).latent
