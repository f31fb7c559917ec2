"""Trainable bridge from frozen text-encoder features to the backbone's width (as in EMF)."""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from emf_lightning.utils.model_helpers import standardize_tokens

from .norms import Float32RMSNorm


class TextConnector(nn.Module):
    """[optional per-channel standardisation] -> Linear -> GELU(tanh) -> Linear -> RMSNorm, applied per token.

    The frozen encoder's last hidden states have their own scale and anisotropy; the connector maps them
    to the backbone width and the RMSNorm fixes their scale, so cross-attention sees well-conditioned keys.
    The null condition (all-zero tokens) maps to a learned constant through the biases and norm weight.

    With ``standardize=True`` the features are first z-scored per channel with statistics fitted once on the
    training captions (``set_standardization``; ``EMFModule(standardize_text=True)`` does it at fit start). An
    LLM's hidden states can be dominated by a few huge channels (docs/probe_results.md): a random first Linear
    then sees almost the same vector for every caption, and it must learn to undo that before it can learn
    anything else. The statistics are buffers, so checkpoints and exports carry them and every path that runs
    the generator (training, evaluation, sampling, an export) applies the same map. An all-zero token (the null
    condition, padding) stays zero: the null condition stays the centre of the standardised space.
    """

    def __init__(self, in_dim: int, out_dim: int, eps: float = 1e-6, standardize: bool = False):
        super().__init__()
        if in_dim <= 0 or out_dim <= 0:
            raise ValueError(f"TextConnector dims must be positive, got in_dim={in_dim}, out_dim={out_dim}")
        self.in_dim = in_dim
        self.out_dim = out_dim
        self.standardize = bool(standardize)
        if self.standardize:
            # Identity until fitted; `standardization_fitted` tells the two apart in a checkpoint.
            self.register_buffer("feature_mean", torch.zeros(in_dim))
            self.register_buffer("feature_std", torch.ones(in_dim))
            self.register_buffer("standardization_fitted", torch.tensor(False))
        self.fc1 = nn.Linear(in_dim, out_dim)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(out_dim, out_dim)
        self.norm = Float32RMSNorm(out_dim, eps=eps)

    @property
    def is_fitted(self) -> bool:
        """Whether standardisation statistics were set (False when standardisation is off)."""
        return self.standardize and bool(self.standardization_fitted)

    @torch.no_grad()
    def set_standardization(self, mean: Tensor, std: Tensor) -> None:
        """Use these per-channel statistics (each [in_dim], std > 0) from now on."""
        if not self.standardize:
            raise ValueError("this TextConnector was built with standardize=False")
        if mean.shape != (self.in_dim,) or std.shape != (self.in_dim,):
            raise ValueError(f"standardisation statistics must have shape ({self.in_dim},)")
        if not bool(torch.isfinite(mean).all() and torch.isfinite(std).all() and (std > 0).all()):
            raise ValueError("standardisation statistics must be finite with std > 0")
        self.feature_mean.copy_(mean)
        self.feature_std.copy_(std)
        self.standardization_fitted.fill_(True)

    def standardized(self, tokens: Tensor) -> Tensor:
        """``tokens`` z-scored per channel (all-zero tokens stay zero); unchanged without standardisation."""
        if not self.standardize:
            return tokens
        return standardize_tokens(tokens, self.feature_mean, self.feature_std)

    def forward(self, tokens: Tensor) -> Tensor:
        """[B, L, in_dim] -> [B, L, out_dim]."""
        if tokens.shape[-1] != self.in_dim:
            raise ValueError(
                f"TextConnector expects text features of width {self.in_dim}, got {tokens.shape[-1]} "
                "(was the generator built for another text encoder?)"
            )
        return self.norm(self.fc2(self.act(self.fc1(self.standardized(tokens)))))
