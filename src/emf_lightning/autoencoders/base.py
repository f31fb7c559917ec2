"""The autoencoder protocol: a frozen map between images and the latents a generator works in.

    latents = ae.encode(images)      # images [B, 3, H, W] in [-1, 1] -> [B, C, H/f, W/f], scaled for the generator
    images = ae.decode(latents)      # -> [B, 3, H, W] in [-1, 1] (clamped)

Latents are what the generator sees: the VAE's raw latent with its `shift_factor` subtracted and multiplied by
its `scaling_factor`, so they have roughly unit variance; `decode` undoes both. Work is done in chunks of
`batch_size` under `torch.no_grad`, in the autoencoder's compute dtype; results come back as float32 on the
input's device, whatever device and dtype the autoencoder runs in.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn as nn
from torch import Tensor

from emf_lightning.utils.model_helpers import resolve_dtype
from emf_lightning.utils.specs import RecordsInitArgs, to_spec


class LatentAutoencoder(RecordsInitArgs, nn.Module):
    """A frozen autoencoder. Subclasses set `name`, implement `latent_channels`, `downsample`, `_key_parts`,
    `_encode_chunk` and `_decode_chunk`. Their constructor arguments are recorded in `self.init_args`
    (`utils.specs`), so `spec` rebuilds them: checkpoints keep that spec, not the autoencoder's weights."""

    name: ClassVar[str] = ""
    image_channels: ClassVar[int] = 3
    sample_posterior: bool = False  # what encode(sample=None) does

    def __init__(
        self, batch_size: int = 8, device: torch.device | str | None = None, dtype: torch.dtype | str | None = None
    ):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = int(batch_size)
        self.compute_dtype = resolve_dtype(dtype)
        self._init_device = torch.device(device) if device is not None else None

    # -- subclass interface -------------------------------------------------------------------------
    @property
    def latent_channels(self) -> int:
        """C of the latents."""
        raise NotImplementedError

    @property
    def downsample(self) -> int:
        """Spatial factor f: an H x W image has an H/f x W/f latent."""
        raise NotImplementedError

    def _key_parts(self) -> list[str]:
        """What determines the latents besides the class: model id, scaling, encode mode, dtype..."""
        raise NotImplementedError

    def _encode_chunk(self, images: Tensor, sample: bool, generator: torch.Generator | None) -> Tensor:
        """One chunk of images (compute dtype, model device) -> scaled latents."""
        raise NotImplementedError

    def _decode_chunk(self, latents: Tensor) -> Tensor:
        """One chunk of scaled latents (compute dtype, model device) -> images (unclamped)."""
        raise NotImplementedError

    # -- shared machinery -----------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        """Where the model lives (inputs are moved there; results go back to the input's device)."""
        return self._model_device() or torch.device("cpu")

    def _model_device(self) -> torch.device | None:
        for tensor in self.parameters():
            return tensor.device
        return self._init_device

    @property
    def cache_key(self) -> str:
        """Stable across processes: class name plus everything that changes the latents (cached latents are only
        valid for the same key)."""
        return ":".join([self.name or type(self).__name__, *self._key_parts()])

    @property
    def spec(self) -> dict[str, Any]:
        """{"class_path", "init_args"}: `build_autoencoder(spec)` rebuilds this autoencoder."""
        return to_spec(self)

    def latent_shape(self, image_size: int | tuple[int, int]) -> tuple[int, int, int]:
        """(C, h, w) of the latent of an image of side `image_size` (int) or (H, W)."""
        h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
        f = self.downsample
        if h % f or w % f:
            raise ValueError(
                f"{self.cache_key}: image size {h}x{w} is not divisible by the autoencoder's "
                f"downsampling factor {f}; use a multiple of {f}"
            )
        return self.latent_channels, h // f, w // f

    def _finish_init(self) -> None:
        """Freeze, move to the requested device and dtype. Subclasses call this at the end of __init__."""
        self.requires_grad_(False)
        if any(p.is_floating_point() and p.dtype != self.compute_dtype for p in self.parameters()):
            self.to(dtype=self.compute_dtype)
        if self._init_device is not None:
            self.to(device=self._init_device)
        self.eval()

    def train(self, mode: bool = True) -> LatentAutoencoder:
        """Always stays in eval mode: the autoencoder is frozen, whatever the parent does."""
        return super().train(False)

    def encode(self, images: Tensor, generator: torch.Generator | None = None, sample: bool | None = None) -> Tensor:
        """Images [B, 3, H, W] in [-1, 1] -> latents [B, C, H/f, W/f] (float32, on the input's device).

        Deterministic by default (the posterior mean); `sample=True` draws from the posterior with `generator`
        (autoencoders without a posterior reject it). The same seed and `batch_size` give the same latents.
        """
        if images.ndim != 4 or images.shape[1] != self.image_channels:
            raise ValueError(
                f"{self.cache_key}: encode expects images [B, {self.image_channels}, H, W], got {tuple(images.shape)}"
            )
        self.latent_shape((images.shape[2], images.shape[3]))  # checks divisibility with a clear message
        sample = self.sample_posterior if sample is None else bool(sample)
        return self._chunked(images, lambda x: self._encode_chunk(x, sample, generator))

    def decode(self, latents: Tensor) -> Tensor:
        """Latents [B, C, h, w] -> images [B, 3, h f, w f] in [-1, 1] (float32, on the input's device)."""
        if latents.ndim != 4 or latents.shape[1] != self.latent_channels:
            raise ValueError(
                f"{self.cache_key}: decode expects latents [B, {self.latent_channels}, h, w], "
                f"got {tuple(latents.shape)}"
            )
        return self._chunked(latents, self._decode_chunk).clamp_(-1.0, 1.0)

    def _chunked(self, x: Tensor, fn: Any) -> Tensor:
        out = []
        device = self._model_device() or x.device  # no parameters (identity): compute where the input is
        with torch.no_grad():
            for chunk in x.split(self.batch_size):
                y = fn(chunk.to(device=device, dtype=self.compute_dtype))
                out.append(y.to(device=x.device, dtype=torch.float32))
        if not out:
            raise ValueError(f"{self.cache_key}: got an empty batch")
        return torch.cat(out)

    def forward(self, images: Tensor) -> Tensor:
        """Same as `encode`."""
        return self.encode(images)

    def extra_repr(self) -> str:
        return f"cache_key={self.cache_key!r}, latent_channels={self.latent_channels}, downsample={self.downsample}"


class IdentityAutoencoder(LatentAutoencoder):
    """Pixel space (`none`): the "latent" is the image itself, 3 channels, no downsampling."""

    name = "none"

    def __init__(
        self, batch_size: int = 64, device: torch.device | str | None = None, dtype: torch.dtype | str | None = None
    ):
        super().__init__(batch_size=batch_size, device=device, dtype=dtype)
        self._finish_init()

    @property
    def latent_channels(self) -> int:
        return self.image_channels

    @property
    def downsample(self) -> int:
        return 1

    def _key_parts(self) -> list[str]:
        return []

    def _encode_chunk(self, images: Tensor, sample: bool, generator: torch.Generator | None) -> Tensor:
        if sample:
            raise ValueError("the identity autoencoder has no posterior to sample from (sample=True)")
        return images

    def _decode_chunk(self, latents: Tensor) -> Tensor:
        return latents
