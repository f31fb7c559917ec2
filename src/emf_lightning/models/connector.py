"""Trainable bridge from frozen text-encoder features to the backbone's width (as in EMF)."""

from __future__ import annotations

import torch.nn as nn
from torch import Tensor

from .norms import Float32RMSNorm


class TextConnector(nn.Module):
    """Linear -> GELU(tanh) -> Linear -> RMSNorm, applied per token.

    The frozen encoder's last hidden states have their own scale and anisotropy; the connector maps them
    to the backbone width and the RMSNorm fixes their scale, so cross-attention sees well-conditioned keys.
    The null condition (all-zero tokens) maps to a learned constant through the biases and norm weight.
    """

    def __init__(self, in_dim: int, out_dim: int, eps: float = 1e-6):
        super().__init__()
        if in_dim <= 0 or out_dim <= 0:
            raise ValueError(f"TextConnector dims must be positive, got in_dim={in_dim}, out_dim={out_dim}")
        self.in_dim = in_dim
        self.out_dim = out_dim
        self.fc1 = nn.Linear(in_dim, out_dim)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(out_dim, out_dim)
        self.norm = Float32RMSNorm(out_dim, eps=eps)

    def forward(self, tokens: Tensor) -> Tensor:
        """[B, L, in_dim] -> [B, L, out_dim]."""
        if tokens.shape[-1] != self.in_dim:
            raise ValueError(
                f"TextConnector expects text features of width {self.in_dim}, got {tokens.shape[-1]} "
                "(was the generator built for another text encoder?)"
            )
        return self.norm(self.fc2(self.act(self.fc1(tokens))))
