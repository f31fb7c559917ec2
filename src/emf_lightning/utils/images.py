"""The one place images change representation: float tensors in [-1, 1] <-> uint8 arrays."""

from __future__ import annotations

import numpy as np
import torch


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[B, C, H, W] or [C, H, W] float in [-1, 1] -> uint8 [B, H, W, C] or [H, W, C]."""
    x = images.detach().float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
    x = x.movedim(-3, -1)
    return x.cpu().numpy()


def from_uint8(images: np.ndarray) -> torch.Tensor:
    """uint8 [B, H, W, C] or [H, W, C] -> float [B, C, H, W] or [C, H, W] in [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(images)).float().div(127.5).sub(1)
    return x.movedim(-1, -3).contiguous()
