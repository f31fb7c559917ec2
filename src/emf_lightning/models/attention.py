"""Scaled dot-product attention with a forward-mode-AD-safe fallback.

Fused SDPA kernels (flash / memory-efficient, and the CPU flash kernel) have no forward-mode AD rule, so
``torch.func.jvp`` through them raises ``NotImplementedError``. MeanFlow needs a JVP through the whole
network for the samples with r != t, so inside :func:`jvp_safe_attention` every call of :func:`attention`
takes an explicit math path built from matmul + softmax, which forward-mode AD differentiates. Outside
that context (plain forwards, sampling) the fused kernel runs. In a graph-free JVP (under ``torch.no_grad``,
inputs carrying a forward-AD tangent) the context routes to :func:`.jvp_attention.jvp_attention` instead,
whose tangent rule is closed-form (and a fused Triton kernel on CUDA).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from .jvp_attention import fused_jvp_backend, jvp_attention

# A plain module-level flag: torch.compile guards on it (one graph per value) instead of tracing a
# context manager, and reading it costs nothing in eager mode.
_JVP_SAFE: bool = False


@contextlib.contextmanager
def jvp_safe_attention(enabled: bool = True) -> Iterator[None]:
    """Route :func:`attention` through the explicit math path while the context is active.

    Re-entrant: the previous state is restored on exit, so nesting and exceptions are safe.
    """
    global _JVP_SAFE
    previous = _JVP_SAFE
    _JVP_SAFE = enabled
    try:
        yield
    finally:
        _JVP_SAFE = previous


def jvp_safe_attention_active() -> bool:
    """Whether :func:`attention` currently uses the math path."""
    return _JVP_SAFE


def _key_padding_bias(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """[B, Lk] bool (True = attend) -> additive bias [B, 1, 1, Lk] with 0 / large negative.

    A finite large negative (not -inf) keeps a fully masked row from producing NaN; the contract says
    every row has at least one real token, so the result is the same as -inf for valid input.
    """
    bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    bias = bias.masked_fill(~mask, torch.finfo(dtype).min)
    return bias[:, None, None, :]


def math_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """Reference attention from matmul + softmax; differentiable in forward and reverse mode.

    Shapes as :func:`attention`. The softmax runs in at least float32 even under bf16/fp16 autocast, because
    its tangent (p * (ds - sum(p * ds))) loses the small differences first in low precision.
    """
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = torch.matmul(q, k.transpose(-2, -1))
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32)) * scale
    if mask is not None:
        scores = scores + _key_padding_bias(mask, scores.dtype)
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    return torch.matmul(probs, v)


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """Multi-head attention ``softmax(q k^T / sqrt(d)) v``.

    Args:
        q: [B, H, Lq, Dh] queries.
        k: [B, H, Lk, Dh] keys.
        v: [B, H, Lk, Dh] values.
        mask: optional key padding mask [B, Lk] bool, True = attend (a real token).

    Returns:
        [B, H, Lq, Dh]. Uses fused ``F.scaled_dot_product_attention`` unless inside
        :func:`jvp_safe_attention`, where it uses :func:`.jvp_attention.jvp_attention` for a graph-free
        JVP and :func:`math_attention` otherwise.
    """
    if mask is not None:
        if mask.dtype != torch.bool:
            raise TypeError(f"attention mask must be bool (True = attend), got {mask.dtype}")
        if mask.shape != (k.shape[0], k.shape[-2]):
            raise ValueError(f"attention mask must be [B, Lk] = {(k.shape[0], k.shape[-2])}, got {tuple(mask.shape)}")
    if _JVP_SAFE:
        backend = fused_jvp_backend(q, k, v)
        if backend is not None:
            return jvp_attention(q, k, v, mask, backend)
        return math_attention(q, k, v, mask)
    attn_mask = None if mask is None else mask[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
