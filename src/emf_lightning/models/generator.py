"""The trainable generator (text connector + backbone) and the registry of named backbone sizes."""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from .connector import CONNECTOR_OPTIONS, TextConnector
from .dit import DiT
from .layers import Backbone, zero_init
from .layout import LAYOUT_CHANNELS, paint_layout
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
    """u_theta(z, r, t | text): maps frozen text features through the connector into the backbone.

    With a connector that plans a layout (``TextConnector(layout=True)``) the condition is (text tokens, mask,
    places [B, K, 2], present [B, K]): each present slot's content painted at its place (``models.layout``) goes
    through a zero-initialised convolution into the backbone's first features. Training gives the true places of
    the slots' objects; :meth:`sampling_condition` plans them; without them (a two-tensor condition, the null
    condition) the map is empty.
    """

    def __init__(self, connector: TextConnector, backbone: Backbone):
        super().__init__()
        if connector.out_dim != backbone.context_dim:
            raise ValueError(
                f"connector output width {connector.out_dim} != backbone context width {backbone.context_dim}"
            )
        self.connector = connector
        self.backbone = backbone
        if connector.layout:
            width = getattr(backbone, "input_feature_channels", 0)
            if not width:
                raise ValueError(
                    f"the slot layout is painted into a U-Net's first features; {type(backbone).__name__} takes no "
                    "input features (use a UNet backbone, or set model.slot_layout: false)"
                )
            self.layout_in = zero_init(nn.Conv2d(LAYOUT_CHANNELS, width, 3, padding=1))

    @classmethod
    def for_backbone(cls, backbone: Backbone, text_dim: int, **connector_options: Any) -> Generator:
        """The backbone behind a new connector from ``text_dim`` to its context width; ``connector_options`` are
        the model config's connector keys (those of ``CONNECTOR_OPTIONS``)."""
        unknown = set(connector_options) - set(CONNECTOR_OPTIONS)
        if unknown:
            raise TypeError(f"unknown connector option(s) {sorted(unknown)}; choose from {sorted(CONNECTOR_OPTIONS)}")
        kwargs = {CONNECTOR_OPTIONS[key][0]: value for key, value in connector_options.items()}
        return cls(TextConnector(text_dim, backbone.context_dim, **kwargs), backbone)

    @property
    def text_dim(self) -> int:
        """Width of the text features the generator expects."""
        return self.connector.in_dim

    def forward(
        self,
        z: Tensor,
        r: Tensor,
        t: Tensor,
        text_tokens: Tensor,
        text_mask: Tensor | None,
        places: Tensor | None = None,
        present: Tensor | None = None,
    ) -> Tensor:
        """z [B, C, H, W], r/t [B], text_tokens [B, L, text_dim], text_mask [B, L] bool, and with a layout places
        [B, K, 2] and present [B, K] bool -> u [B, C, H, W]."""
        if not self.connector.layout:
            if places is not None:
                raise ValueError("places given to a generator without a slot layout")
            return self.backbone(z, r, t, *self.connector.context(text_tokens, text_mask))
        context, mask, reading = self.connector.read(text_tokens, text_mask)
        if places is None:
            places, present = self.empty_layout(z.shape[0], z.device)
        painted = paint_layout(places.float(), present, self.connector.layout_content(reading), tuple(z.shape[-2:]))
        return self.backbone(z, r, t, context, mask, input_features=self.layout_in(painted.to(z.dtype)))

    def empty_layout(self, batch: int, device: torch.device | str | None = None) -> tuple[Tensor, ...]:
        """The layout part of a condition that places nothing ((places, present) with no slot present); () for a
        generator without a slot layout. The null condition of a layout generator ends with it."""
        if not self.connector.layout:
            return ()
        k = self.connector.slots
        return torch.full((batch, k, 2), 0.5, device=device), torch.zeros(batch, k, dtype=torch.bool, device=device)

    @torch.no_grad()
    def sampling_condition(
        self, text_tokens: Tensor, text_mask: Tensor | None, generator: torch.Generator | None = None
    ) -> tuple[Tensor, ...]:
        """The condition sampling gives every step: (tokens, mask), plus a layout the connector plans from
        ``generator`` when it has one (the same state gives the same layout)."""
        if not self.connector.layout:
            return text_tokens, text_mask
        _, _, reading = self.connector.read(text_tokens, text_mask)
        return (text_tokens, text_mask, *self.connector.plan_layout(reading, generator, text_tokens, text_mask))

    def copy_time_embedder_to_interval(self) -> None:
        """EMF fine-tuning recipe: start the interval (t - r) embedder from the trained t embedder."""
        self.backbone.copy_time_embedder_to_interval()
