"""A trained generator as the server uses it: a checkpoint (``emf fit``) or an export (``emf export``).

``ServedModel.sample(captions, seeds, steps, cfg)`` samples several requests in one forward. Each row's noise
is drawn from its own seed exactly as ``emf sample`` draws a single prompt's (``make_noise`` of one image), so
a request gives the image ``emf sample`` gives for the same prompt, seed and steps, batched or not (up to
float rounding of a different batch size).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from emf_lightning.autoencoders import LatentAutoencoder
from emf_lightning.encoders.base import TextFeatures
from emf_lightning.inference import sampling_conditions
from emf_lightning.meanflow import Objective, encode_with_null, make_noise
from emf_lightning.utils.images import to_uint8


@dataclass
class ServedModel:
    """What sampling needs, taken from an ``EMFModule`` or a ``MeanFlowGenerator``."""

    name: str
    source: str
    net: nn.Module
    encode_text: Callable[[list[str]], TextFeatures]
    text_dim: int
    loss: Objective
    autoencoder: LatentAutoencoder
    data_shape: tuple[int, int, int]
    device: torch.device

    def __post_init__(self) -> None:
        self.net.eval().requires_grad_(False)
        if next(self.autoencoder.parameters(), None) is not None:
            self.autoencoder.to(self.device)

    @property
    def objective(self) -> str:
        return self.loss.objective

    @property
    def default_steps(self) -> tuple[int, ...]:
        """The step counts the page shows first: 1/2/4, plus flow matching's many-step count for such a model."""
        return tuple(self.loss.eval_steps)

    def describe(self) -> dict:
        channels, height, width = self.data_shape
        return {
            "name": self.name,
            "source": self.source,
            "objective": self.objective,
            "steps": list(self.default_steps),
            "latent_shape": [channels, height, width],
            "device": str(self.device),
        }

    @torch.no_grad()
    def sample(self, captions: Sequence[str], seeds: Sequence[int], steps: int, cfg_scale: float) -> np.ndarray:
        """uint8 images [B, H, W, 3], row i from captions[i] and the noise of seeds[i]."""
        feats = self.encode_text(list(captions))
        noise = torch.cat([make_noise((1, *self.data_shape), int(seed), device=self.device) for seed in seeds])
        cond, null = sampling_conditions(
            self.net, feats, self.text_dim, cfg_scale, [int(s) for s in seeds], self.device
        )
        x = self.loss.sampler(self.net, noise, cond, steps=steps, cfg_scale=cfg_scale, null_cond=null)
        return to_uint8(self.autoencoder.decode(x.float()))


def model_from_module(module, name: str, source: str, use_ema: bool = True) -> ServedModel:
    """An ``EMFModule`` (loaded from a checkpoint, or built in a test) as a served model."""
    module.eval()
    # the frozen encoder lives outside the checkpoint; put it where the generator is
    module.move_frozen(module.encoder)
    encoder, device = module.encoder, module.device

    def encode_text(captions: list[str]) -> TextFeatures:
        # The encoder itself, not the module's feature cache: a cache would keep every prompt ever typed.
        return encode_with_null(captions, encoder.encode, encoder.dim, device=device)

    return ServedModel(
        name=name,
        source=source,
        net=module.ema_generator if use_ema else module.generator,
        encode_text=encode_text,
        text_dim=encoder.dim,
        loss=module.loss_fn,
        autoencoder=module.autoencoder,
        data_shape=module.data_shape,
        device=device,
    )


def load_checkpoint_model(path: str, name: str, device: torch.device, use_ema: bool = True) -> ServedModel:
    """An ``emf fit`` checkpoint, read as ``emf sample`` reads it."""
    from emf_lightning.checkpoint_config import read_checkpoint
    from emf_lightning.training import EMFModule

    read_checkpoint(path)  # a missing, unreadable or foreign file is a one-line error before anything is built
    module = EMFModule.load_from_checkpoint(path, map_location=device)
    return model_from_module(module, name, str(path), use_ema=use_ema)


def load_export_model(directory: str, name: str, device: torch.device) -> ServedModel:
    """An ``emf export`` folder (its weights are the EMA generator's)."""
    from emf_lightning.inference import MeanFlowGenerator

    model = MeanFlowGenerator.from_pretrained(directory, device=device)
    return ServedModel(
        name=name,
        source=str(directory),
        net=model.generator,
        encode_text=model.encode_text,
        text_dim=model.encoder.dim,
        loss=model.loss,
        autoencoder=model.autoencoder,
        data_shape=model.data_shape,
        device=model.device,
    )


def load_served_model(kind: str, path: str, name: str, device: torch.device, use_ema: bool = True) -> ServedModel:
    """``kind`` is ``"ckpt"`` or ``"export"``; a path that does not exist is an ``InputNotFoundError``."""
    from emf_lightning.errors import InputNotFoundError

    if not Path(path).exists():
        flag = "--ckpt" if kind == "ckpt" else "--export"
        raise InputNotFoundError(f"{flag} {path}: no such file or folder")
    if kind == "ckpt":
        return load_checkpoint_model(path, name, device, use_ema=use_ema)
    if kind == "export":
        return load_export_model(path, name, device)
    raise ValueError(f"unknown model kind {kind!r}: use 'ckpt' or 'export'")
