"""Backbones (DiT, U-Net) and the trainable generator (text connector + backbone)."""

from .attention import attention, jvp_safe_attention, math_attention
from .connector import TextConnector
from .dit import DiT
from .generator import BACKBONE_PRESETS, Generator, build_generator
from .unet import UNet

__all__ = [
    "BACKBONE_PRESETS",
    "DiT",
    "Generator",
    "TextConnector",
    "UNet",
    "attention",
    "build_generator",
    "jvp_safe_attention",
    "math_attention",
]
