"""Backbones (DiT, U-Net) and the trainable generator (text connector + backbone)."""

from .attention import attention, jvp_safe_attention, math_attention
from .connector import TextConnector
from .dit import DiT
from .generator import BACKBONES, Generator, build_backbone, build_generator
from .layers import Backbone
from .unet import UNet

__all__ = [
    "BACKBONES",
    "Backbone",
    "DiT",
    "Generator",
    "TextConnector",
    "UNet",
    "attention",
    "build_backbone",
    "build_generator",
    "jvp_safe_attention",
    "math_attention",
]
