"""Layers with hand-written forward-mode (JVP) rules, for MeanFlow's graph-free JVP through a U-Net.

PyTorch's generic forward-AD formulas are correct but slow on a CPU: ``native_group_norm``'s costs ~100x
its forward (dozens of full-size elementwise ops), and a convolution's runs three convolutions where two
suffice. The layers below are the plain nn layers everywhere except inside
:func:`~emf_lightning.models.attention.jvp_safe_attention` with gradients off (the "detached" JVP
strategy, the default), where an autograd.Function with a closed-form ``jvp`` takes over. The "joint"
strategy, which backpropagates through the JVP, keeps PyTorch's own rules. Tested against them to 1e-5.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .attention import jvp_safe_attention_active


def _graph_free_jvp() -> bool:
    return jvp_safe_attention_active() and not torch.is_grad_enabled()


class _GroupNormWithTangent(torch.autograd.Function):
    """GroupNorm whose forward-mode rule is written out (used only for graph-free JVPs).

    PyTorch's generic forward-AD formula for ``native_group_norm`` costs ~100x the forward on a CPU (it runs
    dozens of full-size elementwise ops); MeanFlow's JVP goes through every norm of a U-Net, so that formula
    was half of the whole JVP. The tangent in closed form, per group g with x_hat = (x - mean_g) * rstd_g:

        dy = weight * rstd_g * (dx_c - x_hat * mean_g(dx_c * x_hat)) + dweight * x_hat + dbias,
        dx_c = dx - mean_g(dx)

    a handful of full-size ops. No backward: this path runs only under ``torch.no_grad``.
    """

    @staticmethod
    def forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, groups: int, eps: float) -> Tensor:
        return F.group_norm(x, groups, weight, bias, eps)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, weight, bias, groups, eps = inputs
        ctx.save_for_forward(x, weight)
        ctx.groups, ctx.eps = groups, eps

    @staticmethod
    def jvp(ctx, dx: Tensor | None, dweight: Tensor | None, dbias: Tensor | None, *_: None) -> Tensor:
        x, weight = ctx.saved_tensors
        groups, eps = ctx.groups, ctx.eps
        n, c = x.shape[:2]
        hw = x[0, 0].numel()
        # The fused kernel returns per-group means and reciprocal std next to its output, so every
        # per-group reduction below is one fused call instead of a reshape (a copy for channels-last input).
        x_hat, _, rstd = torch.native_group_norm(x, None, None, n, c, hw, groups, eps)

        def per_channel(stat: Tensor) -> Tensor:  # [N, G] -> [N, C, 1, ...]
            return stat.repeat_interleave(c // groups, dim=1).reshape(n, c, *(1,) * (x.ndim - 2))

        def group_mean(t: Tensor) -> Tensor:
            return per_channel(torch.native_group_norm(t, None, None, n, c, hw, groups, eps)[1])

        out = torch.zeros_like(x)
        if dx is not None:
            scale = per_channel(rstd)
            if weight is not None:
                scale = scale * weight.reshape(1, c, *(1,) * (x.ndim - 2)).to(scale.dtype)
            out = (dx - group_mean(dx) - x_hat * group_mean(dx * x_hat)) * scale.to(x.dtype)
        if dweight is not None:
            out = out + x_hat * dweight.reshape(1, c, *(1,) * (x.ndim - 2))
        if dbias is not None:
            out = out + dbias.reshape(1, c, *(1,) * (x.ndim - 2))
        return out

    @staticmethod
    def backward(ctx, *grads):  # pragma: no cover - the class is only used without autograd
        raise RuntimeError("_GroupNormWithTangent is for graph-free JVPs; use nn.GroupNorm under autograd")


class JvpGroupNorm(nn.GroupNorm):
    """nn.GroupNorm that takes a closed-form tangent inside graph-free MeanFlow JVPs.

    Inside :func:`~emf_lightning.models.attention.jvp_safe_attention` with gradients off (the "detached"
    JVP strategy) it runs :class:`_GroupNormWithTangent`; everywhere else it is exactly nn.GroupNorm, so
    the gradient path and the "joint" strategy (which backpropagates through the JVP) are untouched.
    """

    def forward(self, x: Tensor) -> Tensor:
        if _graph_free_jvp():
            return _GroupNormWithTangent.apply(x, self.weight, self.bias, self.num_groups, self.eps)
        return super().forward(x)


class _Conv2dWithTangent(torch.autograd.Function):
    """conv2d whose tangent is conv(dx, w) (+ conv(x, dw) + db when the parameters carry tangents)."""

    @staticmethod
    def forward(x: Tensor, weight: Tensor, bias: Tensor | None, stride, padding, dilation, groups: int) -> Tensor:
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, weight, bias, stride, padding, dilation, groups = inputs
        ctx.save_for_forward(x, weight)
        ctx.args = (stride, padding, dilation, groups)

    @staticmethod
    def jvp(ctx, dx: Tensor | None, dweight: Tensor | None, dbias: Tensor | None, *_: None) -> Tensor:
        x, weight = ctx.saved_tensors
        out = None
        if dx is not None:
            out = F.conv2d(dx, weight, None, *ctx.args)
        if dweight is not None:
            term = F.conv2d(x, dweight, None, *ctx.args)
            out = term if out is None else out + term
        if out is None:
            out = torch.zeros_like(F.conv2d(x, weight, None, *ctx.args))
        if dbias is not None:
            out = out + dbias.reshape(1, -1, 1, 1)
        return out

    @staticmethod
    def backward(ctx, *grads):  # pragma: no cover - the class is only used without autograd
        raise RuntimeError("_Conv2dWithTangent is for graph-free JVPs; use nn.Conv2d under autograd")


class JvpConv2d(nn.Conv2d):
    """nn.Conv2d with a two-convolution tangent inside graph-free MeanFlow JVPs (zeros padding only)."""

    def forward(self, x: Tensor) -> Tensor:
        if _graph_free_jvp() and self.padding_mode == "zeros":
            return _Conv2dWithTangent.apply(x, self.weight, self.bias, self.stride, self.padding, self.dilation,
                                            self.groups)
        return super().forward(x)
