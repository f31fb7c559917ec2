"""Triton kernels for attention and its forward-mode tangent (used by :mod:`.jvp_attention` on CUDA).

Two kernels, both tiled FlashAttention-2 style (one program per block of query rows of one (batch, head),
a loop over key blocks, nothing of size [Lq, Lk] in memory):

* :func:`attention_forward`: ``out = softmax(q k^T * scale + bias) v`` and the row log-sum-exp ``lse``, by
  the online softmax (running max ``m``, normaliser ``l``, accumulator rescaled by ``exp(m_old - m_new)``).
* :func:`attention_tangent`: the tangent of ``out`` along (dq, dk, dv). With S = q k^T * scale,
  P = softmax(S), dS = (dq k^T + q dk^T) * scale:

      dP = P * (dS - rowsum(P * dS))
      dout = dP v + P dv = (P * dS) v + P dv - rowsum(P * dS) * out

  Because ``lse`` is known from the forward, P = exp(S - lse) is exact in every key block and the kernel
  needs no running max: it accumulates the row scalar ``sum_j P_j dS_j`` and ``sum_j P_j (dS_j v_j + dv_j)``.
  A tangent that is absent (cross-attention: keys and values come from text) is a compile-time flag, so its
  products are not computed at all.

Key padding is an additive float32 bias per key ([B, Lk]: 0 or a large negative, never -inf, so a block
whose keys are all padding cannot produce NaN). Any Lq, Lk >= 1 and head dims up to 256 work; the kernels
mask partial blocks. Runs on CUDA, and on CPU tensors under ``TRITON_INTERPRET=1`` (the tests do).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

MAX_HEAD_DIM = 256


@triton.jit
def _load_rows(base, rows, dims, row_stride, row_ok, dim_ok):
    """A [rows, dims] tile of a [L, D] matrix with unit stride along D; zeros outside the matrix."""
    return tl.load(base + rows[:, None] * row_stride + dims[None, :], mask=row_ok[:, None] & dim_ok[None, :], other=0.0)


@triton.jit
def _load_cols(base, cols, dims, row_stride, col_ok, dim_ok):
    """The transposed [dims, cols] tile of a [L, D] matrix (keys as columns of q k^T)."""
    return tl.load(base + cols[None, :] * row_stride + dims[:, None], mask=col_ok[None, :] & dim_ok[:, None], other=0.0)


@triton.jit
def _scores(q, k_t, bias_ptr, cols, col_ok, scale, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr):
    """float32 q k^T * scale (+ key bias); keys past the end are -inf, so they get probability 0."""
    s = tl.dot(q, k_t, input_precision=PRECISION) * scale
    if HAS_BIAS:
        s += tl.load(bias_ptr + cols, mask=col_ok, other=0.0)[None, :]
    return tl.where(col_ok[None, :], s, float("-inf"))


@triton.jit
def _forward_kernel(
    Q,
    K,
    V,
    Bias,
    Out,
    Lse,
    q_sb,
    q_sh,
    q_sl,
    k_sb,
    k_sh,
    k_sl,
    v_sb,
    v_sh,
    v_sl,
    o_sb,
    o_sh,
    o_sl,
    num_heads,
    len_q,
    len_k,
    head_dim,
    scale,
    HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    bh = tl.program_id(1)
    b, h = bh // num_heads, bh % num_heads
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_ok, dim_ok = rows < len_q, dims < head_dim
    q = _load_rows(Q + b * q_sb + h * q_sh, rows, dims, q_sl, row_ok, dim_ok)
    k_base, v_base, bias_base = K + b * k_sb + h * k_sh, V + b * v_sb + h * v_sh, Bias + b * len_k

    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, len_k, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < len_k
        s = _scores(
            q, _load_cols(k_base, cols, dims, k_sl, col_ok, dim_ok), bias_base, cols, col_ok, scale, HAS_BIAS, PRECISION
        )
        m_new = tl.maximum(m, tl.max(s, 1))  # finite from the first block on: it holds >= 1 real key
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        l = l * alpha + tl.sum(p, 1)
        v = _load_rows(v_base, cols, dims, v_sl, col_ok, dim_ok)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m = m_new

    out = acc / l[:, None]
    o_ptrs = Out + b * o_sb + h * o_sh + rows[:, None] * o_sl + dims[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])
    tl.store(Lse + bh * len_q + rows, m + tl.log(l), mask=row_ok)


@triton.jit
def _tangent_kernel(
    Q,
    K,
    V,
    DQ,
    DK,
    DV,
    Bias,
    Out,
    Lse,
    DOut,
    q_sb,
    q_sh,
    q_sl,
    k_sb,
    k_sh,
    k_sl,
    v_sb,
    v_sh,
    v_sl,
    dq_sb,
    dq_sh,
    dq_sl,
    dk_sb,
    dk_sh,
    dk_sl,
    dv_sb,
    dv_sh,
    dv_sl,
    o_sb,
    o_sh,
    o_sl,
    num_heads,
    len_q,
    len_k,
    head_dim,
    scale,
    HAS_DQ: tl.constexpr,
    HAS_DK: tl.constexpr,
    HAS_DS: tl.constexpr,
    HAS_DV: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    bh = tl.program_id(1)
    b, h = bh // num_heads, bh % num_heads
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_ok, dim_ok = rows < len_q, dims < head_dim
    q = _load_rows(Q + b * q_sb + h * q_sh, rows, dims, q_sl, row_ok, dim_ok)
    if HAS_DQ:
        dq = _load_rows(DQ + b * dq_sb + h * dq_sh, rows, dims, dq_sl, row_ok, dim_ok)
    lse = tl.load(Lse + bh * len_q + rows, mask=row_ok, other=0.0)
    k_base, v_base, bias_base = K + b * k_sb + h * k_sh, V + b * v_sb + h * v_sh, Bias + b * len_k
    dk_base, dv_base = DK + b * dk_sb + h * dk_sh, DV + b * dv_sb + h * dv_sh

    p_ds_sum = tl.zeros([BLOCK_M], tl.float32)  # sum_j P_j dS_j
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)  # sum_j P_j (dS_j v_j + dv_j)
    for start in range(0, len_k, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < len_k
        k_t = _load_cols(k_base, cols, dims, k_sl, col_ok, dim_ok)
        p = tl.exp(_scores(q, k_t, bias_base, cols, col_ok, scale, HAS_BIAS, PRECISION) - lse[:, None])
        if HAS_DS:  # HAS_DQ or HAS_DK
            ds = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            if HAS_DQ:
                ds += tl.dot(dq, k_t, input_precision=PRECISION)
            if HAS_DK:
                ds += tl.dot(q, _load_cols(dk_base, cols, dims, dk_sl, col_ok, dim_ok), input_precision=PRECISION)
            p_ds = p * ds * scale
            p_ds_sum += tl.sum(p_ds, 1)
            v = _load_rows(v_base, cols, dims, v_sl, col_ok, dim_ok)
            acc += tl.dot(p_ds.to(v.dtype), v, input_precision=PRECISION)
        if HAS_DV:
            dv = _load_rows(dv_base, cols, dims, dv_sl, col_ok, dim_ok)
            acc += tl.dot(p.to(dv.dtype), dv, input_precision=PRECISION)

    o_offsets = b * o_sb + h * o_sh + rows[:, None] * o_sl + dims[None, :]
    io_mask = row_ok[:, None] & dim_ok[None, :]
    out = tl.load(Out + o_offsets, mask=io_mask, other=0.0).to(tl.float32)
    d_out = acc - p_ds_sum[:, None] * out
    tl.store(DOut + o_offsets, d_out.to(DOut.dtype.element_ty), mask=io_mask)


def _blocks(len_q: int, len_k: int, head_dim: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_D): tl.dot needs every side >= 16; wide heads get smaller tiles (registers)."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_m = 64 if block_d <= 128 else 32
    block_n = 64 if block_d <= 64 else 32
    return (
        min(block_m, max(16, triton.next_power_of_2(len_q))),
        min(block_n, max(16, triton.next_power_of_2(len_k))),
        block_d,
    )


def _precision(dtype: torch.dtype) -> str:
    """float32 products follow torch's matmul setting ('highest' means IEEE, otherwise TF32); bf16/fp16 ignore
    the flag and get Triton's default."""
    if dtype == torch.float64 or (dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest"):
        return "ieee"
    return "tf32"


def _strides(x: Tensor) -> tuple[int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2)


def _unit_last(x: Tensor) -> Tensor:
    """The kernels index the head dim with stride 1 (qkv splits and head transposes keep it so)."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _check(q: Tensor, k: Tensor, v: Tensor) -> None:
    if q.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(
            f"Triton JVP attention supports head dims up to {MAX_HEAD_DIM}, got {q.shape[-1]}; "
            "set EMF_JVP_ATTENTION=torch"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")


def attention_forward(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, scale: float) -> tuple[Tensor, Tensor]:
    """q [B, H, Lq, D], k and v [B, H, Lk, D], bias [B, Lk] float32 or None -> (out [B, H, Lq, D], lse float32
    [B, H, Lq])."""
    _check(q, k, v)
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    batch, heads, len_q, head_dim = q.shape
    len_k = k.shape[2]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, heads, len_q), dtype=torch.float32, device=q.device)
    block_m, block_n, block_d = _blocks(len_q, len_k, head_dim)
    grid = (triton.cdiv(len_q, block_m), batch * heads)
    _forward_kernel[grid](
        q,
        k,
        v,
        lse if bias is None else bias,
        out,
        lse,  # an unused bias pointer still needs a tensor
        *_strides(q),
        *_strides(k),
        *_strides(v),
        *_strides(out),
        heads,
        len_q,
        len_k,
        head_dim,
        scale,
        HAS_BIAS=bias is not None,
        PRECISION=_precision(q.dtype),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
    )
    return out, lse


def attention_tangent(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias: Tensor | None,
    out: Tensor,
    lse: Tensor,
    scale: float,
    dq: Tensor | None,
    dk: Tensor | None,
    dv: Tensor | None,
) -> Tensor:
    """The tangent of :func:`attention_forward`'s ``out`` along (dq, dk, dv); a None tangent is zero."""
    _check(q, k, v)
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    batch, heads, len_q, head_dim = q.shape
    len_k = k.shape[2]
    d_out = torch.empty(out.shape, dtype=out.dtype, device=out.device)
    # Absent tangents get a stand-in pointer (never read: the flag removes every load of it).
    dq_, dk_, dv_ = (q if t is None else _unit_last(t.to(q.dtype)) for t in (dq, dk, dv))
    block_m, block_n, block_d = _blocks(len_q, len_k, head_dim)
    grid = (triton.cdiv(len_q, block_m), batch * heads)
    _tangent_kernel[grid](
        q,
        k,
        v,
        dq_,
        dk_,
        dv_,
        lse if bias is None else bias,
        out,
        lse,
        d_out,
        *_strides(q),
        *_strides(k),
        *_strides(v),
        *_strides(dq_),
        *_strides(dk_),
        *_strides(dv_),
        *_strides(out),
        heads,
        len_q,
        len_k,
        head_dim,
        scale,
        HAS_DQ=dq is not None,
        HAS_DK=dk is not None,
        HAS_DS=dq is not None or dk is not None,
        HAS_DV=dv is not None,
        HAS_BIAS=bias is not None,
        PRECISION=_precision(q.dtype),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
    )
    return d_out
