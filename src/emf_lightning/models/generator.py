"""The trainable generator: text connector + backbone (DiT or U-Net), and the registry of named sizes."""

from __future__ import annotations

from typing import Any

import torch.nn as nn
from torch import Tensor

from .connector import TextConnector
from .dit import DiT
from .unet import UNet

# Named backbone sizes. S/B/L/XL are DiT's (Peebles & Xie, table 1); "tiny" runs a training step on a
# laptop CPU in well under a second at 32x32. patch_size is the default when the caller gives none.
# The unet-* presets are pixel-space U-Nets (MeanFlow's CIFAR-10 backbone family, DDPM/ADM layout): at
# 32x32 they learn crisp shapes from far fewer samples than a patch-4 DiT (see README, "The demo").
BACKBONE_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"arch": "dit", "hidden_size": 128, "depth": 4, "num_heads": 4, "mlp_ratio": 4.0, "patch_size": 4},
    "S": {"arch": "dit", "hidden_size": 384, "depth": 12, "num_heads": 6, "mlp_ratio": 4.0, "patch_size": 2},
    "B": {"arch": "dit", "hidden_size": 768, "depth": 12, "num_heads": 12, "mlp_ratio": 4.0, "patch_size": 2},
    "L": {"arch": "dit", "hidden_size": 1024, "depth": 24, "num_heads": 16, "mlp_ratio": 4.0, "patch_size": 2},
    "XL": {"arch": "dit", "hidden_size": 1152, "depth": 28, "num_heads": 16, "mlp_ratio": 4.0, "patch_size": 2},
    "unet-tiny": {"arch": "unet", "base_channels": 32, "channel_mult": (1, 2, 2), "num_res_blocks": 1,
                  "attention_resolutions": (4,), "head_dim": 32, "context_dim": 128},
    "unet-S": {"arch": "unet", "base_channels": 64, "channel_mult": (1, 2, 2), "num_res_blocks": 2,
               "attention_resolutions": (2, 4), "head_dim": 32, "context_dim": 256},
    "unet-B": {"arch": "unet", "base_channels": 128, "channel_mult": (1, 2, 2, 2), "num_res_blocks": 2,
               "attention_resolutions": (2,), "head_dim": 64, "context_dim": 512},
}

# Keyword arguments a caller may override on top of a preset, per architecture.
_DIT_OPTIONS = {
    "hidden_size",
    "depth",
    "num_heads",
    "mlp_ratio",
    "patch_size",
    "qk_norm",
    "pool_context",
    "time_scale",
    "frequency_dim",
}
_UNET_OPTIONS = {
    "base_channels",
    "channel_mult",
    "num_res_blocks",
    "attention_resolutions",
    "head_dim",
    "context_dim",
    "dropout",
    "time_scale",
    "frequency_dim",
}


class Generator(nn.Module):
    """u_theta(z, r, t | text): maps frozen text features through the connector into the backbone."""

    def __init__(self, connector: TextConnector, backbone: DiT | UNet):
        super().__init__()
        if connector.out_dim != backbone.context_dim:
            raise ValueError(
                f"connector output width {connector.out_dim} != backbone context width {backbone.context_dim}"
            )
        self.connector = connector
        self.backbone = backbone

    @property
    def text_dim(self) -> int:
        """Width of the text features the generator expects."""
        return self.connector.in_dim

    def forward(self, z: Tensor, r: Tensor, t: Tensor, text_tokens: Tensor, text_mask: Tensor | None) -> Tensor:
        """z [B, C, H, W], r/t [B], text_tokens [B, L, text_dim], text_mask [B, L] bool -> u [B, C, H, W]."""
        return self.backbone(z, r, t, self.connector(text_tokens), text_mask)

    def copy_time_embedder_to_interval(self) -> None:
        """EMF fine-tuning recipe: start the interval (t - r) embedder from the trained t embedder."""
        self.backbone.copy_time_embedder_to_interval()


def build_generator(
    size: str,
    text_dim: int,
    input_size: int | tuple[int, int],
    in_channels: int = 3,
    patch_size: int | None = None,
    **overrides: Any,
) -> Generator:
    """Build a Generator from a named preset.

    Args:
        size: a key of BACKBONE_PRESETS (DiT: tiny, S, B, L, XL; U-Net: unet-tiny, unet-S, unet-B).
        text_dim: width D of the text encoder's features.
        input_size: spatial size of the generator's input (pixels or latents).
        in_channels: channels of the input (3 in pixel space).
        patch_size: overrides the preset's patch size (DiT only).
        **overrides: options of the preset's architecture. DiT: hidden_size, depth, num_heads, mlp_ratio,
            qk_norm, pool_context, time_scale, frequency_dim. U-Net: base_channels, channel_mult,
            num_res_blocks, attention_resolutions, head_dim, context_dim, dropout, time_scale, frequency_dim.
    """
    if size not in BACKBONE_PRESETS:
        raise ValueError(f"unknown backbone size '{size}'; choose one of {sorted(BACKBONE_PRESETS)}")
    cfg = dict(BACKBONE_PRESETS[size])
    arch = cfg.pop("arch")
    allowed = _DIT_OPTIONS if arch == "dit" else _UNET_OPTIONS
    unknown = set(overrides) - allowed
    if unknown:
        raise TypeError(f"unknown {arch} backbone option(s) {sorted(unknown)}; allowed: {sorted(allowed)}")
    cfg.update(overrides)
    if arch == "unet":
        if patch_size is not None:
            raise TypeError(f"patch_size applies to DiT backbones only; '{size}' is a U-Net (pixel resolution)")
        backbone: DiT | UNet = UNet(input_size=input_size, in_channels=in_channels, **cfg)
    else:
        if patch_size is not None:
            cfg["patch_size"] = patch_size
        backbone = DiT(input_size=input_size, in_channels=in_channels, **cfg)
    connector = TextConnector(text_dim, backbone.context_dim)
    return Generator(connector, backbone)
