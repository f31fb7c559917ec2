"""Backbones (DiT, U-Net) and the trainable generator (text connector + backbone)."""

from .attention import attention, jvp_safe_sdpa, math_attention
from .connector import TextConnector
from .dit import DiT
from .generator import BACKBONES, Generator, build_backbone, build_generator
from .layers import Backbone
from .unet import UNet


def __getattr__(name: str):
    # The diffusers adapter imports diffusers: loaded on first use, so `import emf_lightning.models` stays light.
    if name == "SanaMeanFlowBackbone":
        from .diffusers_adapter import SanaMeanFlowBackbone

        return SanaMeanFlowBackbone
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BACKBONES",
    "Backbone",
    "DiT",
    "SanaMeanFlowBackbone",
    "Generator",
    "TextConnector",
    "UNet",
    "attention",
    "build_backbone",
    "build_generator",
    "jvp_safe_sdpa",
    "math_attention",
]
