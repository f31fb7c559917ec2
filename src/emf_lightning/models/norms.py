"""Normalisation layers that compute in float32 under mixed precision."""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor


class Float32RMSNorm(nn.RMSNorm):
    """RMSNorm computed in (at least) float32 and returned in the input's dtype.

    Under bf16 autocast a bf16 input meets the float32 weight, and ``torch.rms_norm`` then warns and leaves
    its fused kernel; the mean of squares is also where bf16 loses most. Same parameters and state-dict keys
    as ``nn.RMSNorm``, so checkpoints load either way.
    """

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.to(torch.promote_types(x.dtype, torch.float32))).to(x.dtype)
