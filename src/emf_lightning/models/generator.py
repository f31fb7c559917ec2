"""The trainable generator (text connector + backbone) and the registry of named backbone sizes."""

from __future__ import annotations

import inspect
from typing import Any

import torch.nn as nn
from torch import Tensor

from .connector import CONNECTOR_OPTIONS, TextConnector
from .dit import DiT
from .layers import Backbone
from .unet import UNet

# Short names for the bench, the CLI and old checkpoints: DiT's sizes as they are, U-Nets prefixed.
BACKBONES: dict[str, tuple[type[Backbone], str]] = {
    **{name: (DiT, name) for name in DiT.PRESETS},
    **{f"unet-{name}": (UNet, name) for name in UNet.PRESETS},
}


def build_backbone(name: str, input_size: int | tuple[int, int], in_channels: int = 3, **overrides: Any) -> Backbone:
    """A backbone by short name (``BACKBONES``: tiny, S, B, L, XL, unet-tiny, unet-S, unet-B)."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone '{name}'; choose one of {sorted(BACKBONES)}")
    cls, preset = BACKBONES[name]
    unknown = set(overrides) - set(inspect.signature(cls.__init__).parameters)
    if unknown:
        raise TypeError(f"unknown {cls.__name__} option(s) {sorted(unknown)} for backbone '{name}'")
    return cls(preset=preset, input_size=input_size, in_channels=in_channels, **overrides)


def build_generator(
    name: str, text_dim: int, input_size: int | tuple[int, int], in_channels: int = 3, **overrides: Any
) -> Generator:
    """A named backbone (``build_backbone``) behind a text connector from ``text_dim``."""
    return Generator.for_backbone(build_backbone(name, input_size, in_channels, **overrides), text_dim)


class Generator(nn.Module):
    """u_theta(z, r, t | text): maps frozen text features through the connector into the backbone."""

    def __init__(self, connector: TextConnector, backbone: Backbone):
        super().__init__()
        if connector.out_dim != backbone.context_dim:
            raise ValueError(
                f"connector output width {connector.out_dim} != backbone context width {backbone.context_dim}"
            )
        self.connector = connector
        self.backbone = backbone

    @classmethod
    def for_backbone(cls, backbone: Backbone, text_dim: int, **connector_options: Any) -> Generator:
        """The backbone behind a new connector from ``text_dim`` to its context width; ``connector_options`` are
        the model config's connector keys (``CONNECTOR_OPTIONS``: ``standardize_text``, ``text_refiner_layers``,
        ``text_slots``, ``named_slots``)."""
        unknown = set(connector_options) - set(CONNECTOR_OPTIONS)
        if unknown:
            raise TypeError(f"unknown connector option(s) {sorted(unknown)}; choose from {sorted(CONNECTOR_OPTIONS)}")
        kwargs = {CONNECTOR_OPTIONS[key][0]: value for key, value in connector_options.items()}
        return cls(TextConnector(text_dim, backbone.context_dim, **kwargs), backbone)

    @property
    def text_dim(self) -> int:
        """Width of the text features the generator expects."""
        return self.connector.in_dim

    def forward(self, z: Tensor, r: Tensor, t: Tensor, text_tokens: Tensor, text_mask: Tensor | None) -> Tensor:
        """z [B, C, H, W], r/t [B], text_tokens [B, L, text_dim], text_mask [B, L] bool -> u [B, C, H, W]."""
        return self.backbone(z, r, t, *self.connector.context(text_tokens, text_mask))

    def copy_time_embedder_to_interval(self) -> None:
        """EMF fine-tuning recipe: start the interval (t - r) embedder from the trained t embedder."""
        self.backbone.copy_time_embedder_to_interval()
