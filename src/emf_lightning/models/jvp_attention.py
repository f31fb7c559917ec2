"""Attention with a closed-form forward-mode (JVP) rule, for MeanFlow's graph-free JVP.

PyTorch's fused attention kernels have no forward-mode rule, and the fallback inside the JVP, matmul + softmax
under PyTorch's generic tangent rules, materialises several [B, H, Lq, Lk] float32 tensors (scores,
probabilities and the tangent of each). :func:`jvp_attention` is one
``autograd.Function``: its forward returns the attention output and its ``jvp`` the tangent in closed form,
with S = q k^T * scale, P = softmax(S), dS = (dq k^T + q dk^T) * scale:

    dout = (P * dS) v + P dv - rowsum(P * dS) * out

An absent tangent drops its terms: cross-attention to text (keys and values carry none) costs one product
for dS and one for (P * dS) v.

Backends (``EMF_JVP_ATTENTION`` or :func:`set_jvp_attention_backend`):

* ``triton``: two fused kernels (:mod:`.jvp_attention_triton`), nothing of size [Lq, Lk] in memory.
* ``torch``: the same formula in plain torch over tiles of query rows, each tile's scores at most
  :data:`TILE_ELEMENTS` float32 numbers; the CPU path and the reference for the kernels.
* ``math``: the old path (forward-mode AD through :func:`.attention.math_attention`).
* ``auto`` (default): ``triton`` on CUDA when Triton imports, else ``torch``.

Only for graph-free JVPs (under ``torch.no_grad``): the function has no backward, so a JVP that
backpropagates through the tangent (the naive reference loss of the tests) keeps the math path
(:func:`fused_jvp_backend`).
"""

from __future__ import annotations

import functools
import math
import os

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

ENV_VAR = "EMF_JVP_ATTENTION"
BACKENDS = ("auto", "math", "torch", "triton")
# float32 scores per tile of the torch path (B * H * rows * Lk): bounds its memory, not its result.
TILE_ELEMENTS = 1 << 23

_DESCRIPTIONS = {
    "triton": "fused Triton kernels (models/jvp_attention_triton.py)",
    "torch": "closed-form tangent in tiled torch ops (models/jvp_attention.py)",
    "math": "forward-mode AD through unfused math attention",
}
_logged: set[tuple[str, str]] = set()


def _read_backend(value: str) -> str:
    name = value.strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"{ENV_VAR}={value!r} is not a JVP attention backend; use one of {', '.join(BACKENDS)}")
    return name


_backend = _read_backend(os.environ.get(ENV_VAR, "auto"))


def set_jvp_attention_backend(name: str) -> None:
    """Choose the backend for this process: ``auto``, ``math``, ``torch`` or ``triton`` (overrides the env var)."""
    global _backend
    _backend = _read_backend(name)


def get_jvp_attention_backend() -> str:
    """The configured backend name (``auto`` is resolved per device by :func:`resolve_backend`)."""
    return _backend


@functools.cache
def triton_available() -> bool:
    """Whether the Triton kernels import (Triton installed and importable)."""
    try:
        from . import jvp_attention_triton  # noqa: F401
    except (ImportError, RuntimeError):  # not installed, or installed without a usable backend
        return False
    return True


def _triton_runs_on(device: torch.device) -> bool:
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def resolve_backend(device: torch.device, name: str | None = None) -> str:
    """The backend that runs for tensors on ``device``: ``math``, ``torch`` or ``triton``; logs it once."""
    name = _backend if name is None else _read_backend(name)
    if name == "auto":
        name = "triton" if device.type == "cuda" and triton_available() else "torch"
    elif name == "triton" and not (triton_available() and _triton_runs_on(device)):
        raise RuntimeError(
            f"{ENV_VAR}=triton needs Triton and CUDA tensors (or TRITON_INTERPRET=1 on the CPU), "
            f"got {device.type} tensors{'' if triton_available() else ' and no importable Triton'}; "
            f"use {ENV_VAR}=torch"
        )
    if (name, device.type) not in _logged:
        _logged.add((name, device.type))
        from lightning.fabric.utilities.rank_zero import rank_zero_info

        rank_zero_info(
            f"JVP attention on {device.type}: {_DESCRIPTIONS[name]} (set {ENV_VAR}=math|torch|triton to change)"
        )
    return name


def _functorch_wrapped(*tensors: Tensor) -> bool:
    """Inside ``torch.func`` transforms tensors are wrappers without storage, which Triton cannot launch on."""
    return any(torch._C._functorch.is_functorch_wrapped_tensor(t) for t in tensors)


def _has_tangent(*tensors: Tensor) -> bool:
    return any(fwAD.unpack_dual(t).tangent is not None for t in tensors)


def fused_jvp_backend(q: Tensor, k: Tensor, v: Tensor) -> str | None:
    """The backend for :func:`jvp_attention`, or None where the math path must run: no forward-AD tangent on
    q, k or v (nothing to gain), an autograd graph being built (the function has no backward), or
    backend ``math``."""
    if torch.is_grad_enabled() or not _has_tangent(q, k, v):
        return None
    backend = resolve_backend(q.device)
    return None if backend == "math" else backend


# ------------------------------------------------------------------------------------------------ torch path


def key_padding_bias(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """[B, Lk] bool (True = attend) -> [B, Lk] additive bias: 0 or the dtype's most negative finite number
    (as :func:`.attention.math_attention`: a row with no real key averages v instead of producing NaN)."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


def _row_tiles(q: Tensor, k: Tensor) -> list[slice]:
    batch, heads, len_q = q.shape[:3]
    rows = max(1, TILE_ELEMENTS // max(1, batch * heads * k.shape[-2]))
    return [slice(start, start + rows) for start in range(0, len_q, rows)]


def _probs(q: Tensor, k: Tensor, bias: Tensor | None, scale: float) -> Tensor:
    """softmax(q k^T * scale + bias) in at least float32, with math_attention's exact operation order."""
    s = torch.matmul(q, k.transpose(-2, -1))
    s = s.to(torch.promote_types(s.dtype, torch.float32)).mul_(scale)  # a fresh tensor: in-place is safe
    if bias is not None:
        s.add_(bias[:, None, None, :].to(s.dtype))
    return torch.softmax(s, dim=-1)


def _bias_or_none(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if mask is None else key_padding_bias(mask, torch.promote_types(dtype, torch.float32))


def _torch_forward(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float) -> tuple[Tensor, Tensor]:
    """(out, probabilities when one tile holds them all, else an empty tensor: the tangent recomputes them)."""
    bias = _bias_or_none(mask, q.dtype)
    tiles = _row_tiles(q, k)
    outs = []
    for rows in tiles:
        p = _probs(q[..., rows, :], k, bias, scale)
        outs.append(torch.matmul(p.to(v.dtype), v))
    if len(tiles) == 1:
        return outs[0], p
    return torch.cat(outs, dim=-2), q.new_empty(0)


def _torch_tangent(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None,
    out: Tensor,
    probs: Tensor,
    scale: float,
    dq: Tensor | None,
    dk: Tensor | None,
    dv: Tensor | None,
) -> Tensor:
    bias = _bias_or_none(mask, q.dtype)
    # dS = dq k^T + q dk^T as one product [dq, q] [k, dk]^T: one [rows, Lk] result instead of two.
    ds_keys = k if dk is None else dk if dq is None else torch.cat([k, dk], dim=-1)
    ds_queries = q if dq is None else dq if dk is None else torch.cat([dq, q], dim=-1)
    pieces = []
    for rows in _row_tiles(q, k):
        p = probs if probs.numel() else _probs(q[..., rows, :], k, bias, scale)
        d_out = None
        if dq is not None or dk is not None:
            ds = torch.matmul(ds_queries[..., rows, :], ds_keys.transpose(-2, -1))
            p_ds = ds.to(p.dtype).mul_(scale).mul_(p)
            d_out = torch.matmul(p_ds.to(v.dtype), v) - p_ds.sum(-1, keepdim=True) * out[..., rows, :]
        if dv is not None:
            p_dv = torch.matmul(p.to(dv.dtype), dv)
            d_out = p_dv if d_out is None else d_out + p_dv
        pieces.append(d_out.to(out.dtype))
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=-2)


# ---------------------------------------------------------------------------------------------- the function


def _kernel_dtype(*tensors: Tensor) -> torch.dtype:
    """The dtype the Triton kernels compute in: autocast's where it is on (as math_attention's matmuls),
    else the inputs' common dtype."""
    device_type = tensors[0].device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return functools.reduce(torch.promote_types, (t.dtype for t in tensors))


class _JVPAttention(torch.autograd.Function):
    """out = softmax(q k^T / sqrt(d) + mask bias) v, with its tangent in closed form (no backward)."""

    @staticmethod
    def forward(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, backend: str) -> tuple[Tensor, Tensor]:
        scale = 1.0 / math.sqrt(q.shape[-1])
        if backend == "triton":
            from .jvp_attention_triton import attention_forward

            dtype = _kernel_dtype(q, k, v)
            bias = _bias_or_none(mask, torch.float32)
            return attention_forward(q.to(dtype), k.to(dtype), v.to(dtype), bias, scale)  # (out, lse)
        return _torch_forward(q, k, v, mask, scale)  # (out, probs or empty)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        q, k, v, mask, backend = inputs
        out, aux = output
        ctx.save_for_forward(q, k, v, mask, out, aux)
        ctx.mark_non_differentiable(aux)
        ctx.set_materialize_grads(False)  # absent tangents stay None: their terms are skipped
        ctx.backend = backend

    @staticmethod
    def jvp(ctx, dq: Tensor | None, dk: Tensor | None, dv: Tensor | None, _mask, _backend) -> tuple[Tensor, None]:
        q, k, v, mask, out, aux = ctx.saved_tensors
        if dq is None and dk is None and dv is None:
            return torch.zeros_like(out), None
        scale = 1.0 / math.sqrt(q.shape[-1])
        if ctx.backend == "triton":
            from .jvp_attention_triton import attention_tangent

            dtype = out.dtype
            bias = _bias_or_none(mask, torch.float32)
            d_out = attention_tangent(q.to(dtype), k.to(dtype), v.to(dtype), bias, out, aux, scale, dq, dk, dv)
        else:
            d_out = _torch_tangent(q, k, v, mask, out, aux, scale, dq, dk, dv)
        return d_out, None

    @staticmethod
    def backward(ctx, *grads):  # pragma: no cover - fused_jvp_backend never routes a graph here
        raise RuntimeError("jvp_attention has no backward: use it only for graph-free JVPs (under torch.no_grad)")


def jvp_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, backend: str | None = None) -> Tensor:
    """``softmax(q k^T / sqrt(d)) v`` whose forward-mode tangent is computed in closed form.

    Args:
        q: [B, H, Lq, D] queries; k, v: [B, H, Lk, D] keys and values. Any of them may be a forward-AD dual
            tensor (``torch.autograd.forward_ad`` or ``torch.func.jvp``).
        mask: optional key padding mask [B, Lk] bool, True = attend.
        backend: ``torch`` or ``triton``; default: :func:`resolve_backend` for q's device. Inside a
            ``torch.func`` transform the ``torch`` backend runs (Triton needs plain tensors).
    """
    backend = resolve_backend(q.device, backend)
    if backend == "triton" and _functorch_wrapped(q, k, v):
        backend = "torch"
    if backend == "math":
        raise ValueError("jvp_attention runs the torch or triton backend; call math_attention for the math path")
    out, _ = _JVPAttention.apply(q, k, v, mask, backend)
    return out
