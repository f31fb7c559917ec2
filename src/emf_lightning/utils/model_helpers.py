"""Small helpers shared by every model wrapper (text encoders, autoencoders, backbones)."""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import Tensor


def masked_mean(tokens: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean of tokens [B, L, D] over the positions where mask [B, L] is True -> [B, D] (every position when mask
    is None). The one masked mean: encoders' pooled features, the backbones' pooled text, the probe."""
    if mask is None:
        return tokens.mean(dim=1)
    weights = mask.to(tokens.dtype).unsqueeze(-1)
    return (tokens * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    """Accept torch dtypes and config strings ('float32', 'bf16', 'torch.float16'); None -> float32."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    aliases = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16", "float": "float32"}
    name = str(dtype).removeprefix("torch.")
    name = aliases.get(name, name)
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ValueError(f"unknown floating dtype {dtype!r}; use float32, float16 or bfloat16")
    return value


def short_hash(text: str, n: int = 10) -> str:
    """A stable (cross-process, cross-platform) short hex digest, for cache keys."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:n]


def random_init(build: Any, seed: int) -> Any:
    """Run `build()` under a private, seeded RNG so a random test model is reproducible and the caller's
    global RNG state is untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def standardize_tokens(tokens: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """``tokens`` [..., D] z-scored per channel; all-zero tokens (padding, the null condition) stay zero."""
    is_zero = (tokens == 0).all(dim=-1, keepdim=True)
    mean, std = mean.to(tokens), std.to(tokens)
    return torch.where(is_zero, torch.zeros_like(tokens), (tokens - mean) / std)
