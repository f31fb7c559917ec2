"""Hand-written forward-mode (JVP) rules for MeanFlow's graph-free JVP, for any backbone.

PyTorch's generic forward-AD formulas are correct but slow on a CPU: ``native_group_norm``'s costs many times
its forward (dozens of full-size elementwise ops), and a linear layer's or a convolution's runs three
matrix products where two suffice. MeanFlow's JVP goes through every one of these layers.

:func:`fast_tangents` is a ``TorchFunctionMode``: while it is active, calls of ``F.linear``, ``F.conv2d``,
``F.group_norm`` and ``F.layer_norm`` (whoever makes them: nn layers, timm's Mlp, our blocks) run as an
autograd.Function with a closed-form ``jvp``. It is for graph-free JVPs only (``meanflow.jvp``, under
``torch.no_grad``); the functions have no backward. Everything else keeps PyTorch's rules. Tested against
them to 1e-8 in float64.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from emf_lightning.models.attention import jvp_safe_sdpa


def _no_backward(name: str):
    def backward(ctx, *grads):  # pragma: no cover - only used under torch.no_grad
        raise RuntimeError(f"{name} is for graph-free JVPs (fast_tangents under torch.no_grad)")

    return staticmethod(backward)


def _save(ctx, x: Tensor, weight: Tensor | None, output: Tensor) -> None:
    ctx.save_for_forward(x, weight)
    ctx.set_materialize_grads(False)  # absent tangents stay None: no products with zero tensors
    ctx.out_shape, ctx.out_dtype, ctx.out_device = output.shape, output.dtype, output.device


def _sum_tangents(ctx, *terms: Tensor | None) -> Tensor:
    """Sum of the tangent terms that are present, with the output's shape (zeros when none is)."""
    out = None
    for term in terms:
        if term is not None:
            out = term if out is None else out + term
    if out is None:
        return torch.zeros(ctx.out_shape, dtype=ctx.out_dtype, device=ctx.out_device)
    return out if out.shape == ctx.out_shape else out.expand(ctx.out_shape).clone()  # a bias tangent alone


class _Linear(torch.autograd.Function):
    """y = x W^T + b;  dy = dx W^T (+ x dW^T + db)."""

    @staticmethod
    def forward(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return F.linear(x, weight, bias)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, weight, _ = inputs
        _save(ctx, x, weight, output)

    @staticmethod
    def jvp(ctx, dx: Tensor | None, dweight: Tensor | None, dbias: Tensor | None) -> Tensor:
        x, weight = ctx.saved_tensors
        return _sum_tangents(
            ctx, None if dx is None else F.linear(dx, weight), None if dweight is None else F.linear(x, dweight), dbias
        )

    backward = _no_backward("_Linear")


class _Conv2d(torch.autograd.Function):
    """y = conv(x, W) + b;  dy = conv(dx, W) (+ conv(x, dW) + db)."""

    @staticmethod
    def forward(x: Tensor, weight: Tensor, bias: Tensor | None, stride, padding, dilation, groups) -> Tensor:
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, weight, _, *args = inputs
        _save(ctx, x, weight, output)
        ctx.args = args

    @staticmethod
    def jvp(ctx, dx: Tensor | None, dweight: Tensor | None, dbias: Tensor | None, *_) -> Tensor:
        x, weight = ctx.saved_tensors
        return _sum_tangents(
            ctx,
            None if dx is None else F.conv2d(dx, weight, None, *ctx.args),
            None if dweight is None else F.conv2d(x, dweight, None, *ctx.args),
            None if dbias is None else dbias.reshape(1, -1, 1, 1),
        )

    backward = _no_backward("_Conv2d")


def _normalised_tangent(dx: Tensor, x_hat: Tensor, mean, scale: Tensor) -> Tensor:
    """Tangent of (x - mean(x)) * rstd at x along dx: scale * (dx - mean(dx) - x_hat * mean(dx * x_hat))."""
    return (dx - mean(dx) - x_hat * mean(dx * x_hat)) * scale


class _GroupNorm(torch.autograd.Function):
    """GroupNorm; per group, dy = weight * rstd * (dx - mean(dx) - x_hat mean(dx x_hat)) + dweight x_hat + dbias."""

    @staticmethod
    def forward(x: Tensor, groups: int, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
        return F.group_norm(x, groups, weight, bias, eps)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, groups, weight, _, eps = inputs
        _save(ctx, x, weight, output)
        ctx.groups, ctx.eps = groups, eps

    @staticmethod
    def jvp(ctx, dx: Tensor | None, _groups, dweight: Tensor | None, dbias: Tensor | None, _eps) -> Tensor:
        x, weight = ctx.saved_tensors
        n, c, groups = x.shape[0], x.shape[1], ctx.groups
        hw = x[0, 0].numel()
        channel_shape = (1, c, *(1,) * (x.ndim - 2))
        # The fused kernel returns per-group mean and 1/std beside its output, so every per-group reduction
        # is one fused call (a reshape to [N, G, -1] would copy a channels-last tensor).
        x_hat, _, rstd = torch.native_group_norm(x, None, None, n, c, hw, groups, ctx.eps)

        def per_channel(stat: Tensor) -> Tensor:  # [N, G] -> [N, C, 1, ...]
            return stat.repeat_interleave(c // groups, dim=1).reshape(n, c, *channel_shape[2:])

        def group_mean(t: Tensor) -> Tensor:
            return per_channel(torch.native_group_norm(t, None, None, n, c, hw, groups, ctx.eps)[1])

        d_norm = None
        if dx is not None:
            scale = per_channel(rstd)
            if weight is not None:
                scale = scale * weight.reshape(channel_shape).to(scale.dtype)
            d_norm = _normalised_tangent(dx, x_hat, group_mean, scale.to(x.dtype))
        return _sum_tangents(
            ctx,
            d_norm,
            None if dweight is None else x_hat * dweight.reshape(channel_shape),
            None if dbias is None else dbias.reshape(channel_shape),
        )

    backward = _no_backward("_GroupNorm")


class _LayerNorm(torch.autograd.Function):
    """LayerNorm over the trailing ``normalized_shape`` dims; the same closed form as GroupNorm."""

    @staticmethod
    def forward(x: Tensor, shape, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
        return F.layer_norm(x, shape, weight, bias, eps)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, shape, weight, _, eps = inputs
        _save(ctx, x, weight, output)
        ctx.shape, ctx.eps = tuple(shape), eps

    @staticmethod
    def jvp(ctx, dx: Tensor | None, _shape, dweight: Tensor | None, dbias: Tensor | None, _eps) -> Tensor:
        x, weight = ctx.saved_tensors
        dims = tuple(range(x.ndim - len(ctx.shape), x.ndim))
        x_hat, _, rstd = torch.native_layer_norm(x, ctx.shape, None, None, ctx.eps)
        d_norm = None
        if dx is not None:
            scale = rstd if weight is None else rstd * weight.to(rstd.dtype)
            d_norm = _normalised_tangent(dx, x_hat, lambda t: t.mean(dims, keepdim=True), scale.to(x.dtype))
        return _sum_tangents(ctx, d_norm, None if dweight is None else x_hat * dweight, dbias)

    backward = _no_backward("_LayerNorm")


def _arguments(defaults: dict, args: tuple, kwargs: dict) -> list:
    """A call's positional + keyword arguments -> every argument in order, defaults filled in."""
    values = list(args) + list(defaults.values())[len(args) :]
    names = list(defaults)
    for key, value in kwargs.items():
        values[names.index(key)] = value
    return values


# torch function -> (rule, its parameters with defaults, in order)
_RULES = {
    F.linear: (_Linear, {"input": None, "weight": None, "bias": None}),
    F.conv2d: (
        _Conv2d,
        {"input": None, "weight": None, "bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1},
    ),
    F.group_norm: (_GroupNorm, {"input": None, "num_groups": None, "weight": None, "bias": None, "eps": 1e-5}),
    F.layer_norm: (_LayerNorm, {"input": None, "normalized_shape": None, "weight": None, "bias": None, "eps": 1e-5}),
}


class _JvpSafeAttentionMode(TorchFunctionMode):
    """Every ``F.scaled_dot_product_attention`` call (ours or a library's) goes to ``jvp_safe_sdpa``: fused SDPA
    kernels have no forward-mode AD rule."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            return jvp_safe_sdpa(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


class _FastTangentMode(_JvpSafeAttentionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        rule = _RULES.get(func)
        if rule is not None:
            fn, defaults = rule
            values = _arguments(defaults, args, kwargs or {})
            if fn is not _Conv2d or not isinstance(values[4], str):  # padding="same"/"valid": PyTorch's rule
                return fn.apply(*values)
        return super().__torch_function__(func, types, args, kwargs)


@contextlib.contextmanager
def jvp_safe_attention() -> Iterator[None]:
    """Route attention through a forward-mode-AD-safe path (for ``torch.func.jvp`` with a graph, as the naive
    reference loss does); ``fast_tangents`` does this too."""
    with _JvpSafeAttentionMode():
        yield


@contextlib.contextmanager
def fast_tangents() -> Iterator[None]:
    """Route linear, conv2d, group_norm and layer_norm through hand-written tangent rules (no backward), and
    attention as ``jvp_safe_attention`` does.

    Use only around a JVP under ``torch.no_grad`` (``meanflow.jvp.du_dt`` does).
    """
    if torch.is_grad_enabled():
        raise RuntimeError("fast_tangents() has no backward rules: use it under torch.no_grad()")
    with _FastTangentMode():
        yield
