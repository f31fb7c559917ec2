"""Scaled dot-product attention, and the forward-mode-AD-safe replacement of the fused kernel.

:func:`attention` always calls ``F.scaled_dot_product_attention`` (the fused kernel). Fused SDPA kernels (flash /
memory-efficient, and the CPU flash kernel) have no forward-mode AD rule, so ``torch.func.jvp`` through them
raises ``NotImplementedError``. MeanFlow's JVP modes (``meanflow.tangent_rules``: ``jvp_safe_attention``,
``fast_tangents``) send every SDPA call, ours and a library's, to :func:`jvp_safe_sdpa`: an explicit math path
built from matmul + softmax, which forward-mode AD differentiates, or, in a graph-free JVP (under
``torch.no_grad``, inputs carrying a forward-AD tangent), :func:`.jvp_attention.jvp_attention`, whose tangent rule
is closed-form (and a fused Triton kernel on CUDA). No global state: the mode on the stack decides.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from .jvp_attention import fused_jvp_backend, jvp_attention


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
        [B, H, Lq, Dh], by ``F.scaled_dot_product_attention`` (inside a JVP mode: :func:`jvp_safe_sdpa`).
    """
    if mask is not None:
        if mask.dtype != torch.bool:
            raise TypeError(f"attention mask must be bool (True = attend), got {mask.dtype}")
        if mask.shape != (k.shape[0], k.shape[-2]):
            raise ValueError(f"attention mask must be [B, Lk] = {(k.shape[0], k.shape[-2])}, got {tuple(mask.shape)}")
    attn_mask = None if mask is None else mask[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)


def jvp_safe_sdpa(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    **kwargs: Any,
) -> Tensor:
    """``F.scaled_dot_product_attention`` where forward-mode AD must pass through it (the JVP modes call it).

    No mask or a bool key padding mask [B, 1, 1, Lk] (what :func:`attention` passes): :func:`jvp_attention` in a
    graph-free JVP, else :func:`math_attention`. Any other call (e.g. a diffusers model's additive mask): SDPA's
    own math backend, which forward-mode AD differentiates too.
    """
    key_padding = attn_mask is None or (
        attn_mask.dtype == torch.bool and attn_mask.shape == (k.shape[0], 1, 1, k.shape[-2])
    )
    if key_padding and dropout_p == 0.0 and not is_causal and scale is None and not kwargs:
        mask = None if attn_mask is None else attn_mask[:, 0, 0, :]
        backend = fused_jvp_backend(q, k, v)
        if backend is not None:
            return jvp_attention(q, k, v, mask, backend)
        return math_attention(q, k, v, mask)
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **kwargs
        )
