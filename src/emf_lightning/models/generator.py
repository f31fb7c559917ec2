"""The trainable generator (text connector + backbone) and the registry of named backbone sizes."""

from __future__ import annotations

import inspect
from typing import Any

import torch.nn as nn
from torch import Tensor

from .connector import TextConnector
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
    name: str,
    text_dim: int,
    input_size: int | tuple[int, int],
    in_channels: int = 3,
    standardize_text: bool = False,
    text_refiner_layers: int = 0,
    **overrides: Any,
) -> Generator:
    """A named backbone (``build_backbone``) behind a text connector from ``text_dim``."""
    return Generator.for_backbone(
        build_backbone(name, input_size, in_channels, **overrides), text_dim, standardize_text, text_refiner_layers
    )


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
    def for_backbone(
        cls, backbone: Backbone, text_dim: int, standardize_text: bool = False, text_refiner_layers: int = 0
    ) -> Generator:
        """The backbone behind a new connector from ``text_dim`` to its context width (``standardize_text``: the
        connector z-scores the features per channel; ``text_refiner_layers``: self-attention blocks over the
        tokens after the per-token map; both ``TextConnector`` options)."""
        connector = TextConnector(
            text_dim, backbone.context_dim, standardize=standardize_text, refiner_layers=text_refiner_layers
        )
        return cls(connector, backbone)

    @property
    def text_dim(self) -> int:
        """Width of the text features the generator expects."""
        return self.connector.in_dim

    def forward(self, z: Tensor, r: Tensor, t: Tensor, text_tokens: Tensor, text_mask: Tensor | None) -> Tensor:
        """z [B, C, H, W], r/t [B], text_tokens [B, L, text_dim], text_mask [B, L] bool -> u [B, C, H, W]."""
        return self.backbone(z, r, t, self.connector(text_tokens, text_mask), text_mask)

    def copy_time_embedder_to_interval(self) -> None:
        """EMF fine-tuning recipe: start the interval (t - r) embedder from the trained t embedder."""
        self.backbone.copy_time_embedder_to_interval()
