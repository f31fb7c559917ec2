"""Hand-written tangent rules (models.jvp_ops) against PyTorch's own forward-mode AD and finite differences."""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD

from emf_lightning.models import jvp_safe_attention
from emf_lightning.models.jvp_ops import JvpConv2d, JvpGroupNorm


def _random_affine(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return module.double()


def _both_tangents(module: torch.nn.Module, x: torch.Tensor, tx: torch.Tensor):
    """(tangent from the hand-written rule, tangent from PyTorch's generic rule) for the same module."""
    with torch.no_grad(), jvp_safe_attention():
        ours = torch.func.jvp(module, (x,), (tx,))
    reference = torch.func.jvp(module, (x,), (tx,))  # outside the context: the plain nn layer
    return ours, reference


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("groups,channels", [(4, 8), (1, 6), (6, 6)])
def test_group_norm_tangent_matches_pytorch_and_finite_differences(groups, channels, channels_last):
    norm = _random_affine(JvpGroupNorm(groups, channels, eps=1e-6))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, channels, 5, 4, generator=g, dtype=torch.float64) * 3 + 1
    tx = torch.randn(x.shape, generator=g, dtype=torch.float64)
    if channels_last:
        x, tx = x.contiguous(memory_format=torch.channels_last), tx.contiguous(memory_format=torch.channels_last)
    (y, dy), (y_ref, dy_ref) = _both_tangents(norm, x, tx)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(dy, dy_ref, atol=1e-10, rtol=1e-8)
    h = 1e-6
    with torch.no_grad():
        fd = (norm(x + h * tx) - norm(x - h * tx)) / (2 * h)
    torch.testing.assert_close(dy, fd, atol=1e-7, rtol=1e-6)


def test_group_norm_without_affine_and_under_forward_ad():
    norm = JvpGroupNorm(2, 4, affine=False).double()
    x, tx = torch.randn(2, 4, 3, 3, dtype=torch.float64), torch.randn(2, 4, 3, 3, dtype=torch.float64)
    (_, dy), (_, dy_ref) = _both_tangents(norm, x, tx)
    torch.testing.assert_close(dy, dy_ref, atol=1e-10, rtol=1e-8)
    with torch.no_grad(), jvp_safe_attention(), fwAD.dual_level():
        dy_fwad = fwAD.unpack_dual(norm(fwAD.make_dual(x, tx))).tangent
    torch.testing.assert_close(dy_fwad, dy_ref, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("kwargs", [dict(kernel_size=3, padding=1), dict(kernel_size=3, stride=2, padding=1),
                                    dict(kernel_size=1), dict(kernel_size=3, padding=1, bias=False)])
def test_conv_tangent_matches_pytorch(kwargs):
    conv = _random_affine(JvpConv2d(4, 6, **kwargs))
    x, tx = torch.randn(2, 4, 8, 8, dtype=torch.float64), torch.randn(2, 4, 8, 8, dtype=torch.float64)
    (y, dy), (y_ref, dy_ref) = _both_tangents(conv, x, tx)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(dy, dy_ref, atol=1e-10, rtol=1e-8)
    # Linear in x: the tangent is the bias-free convolution of the tangent.
    torch.testing.assert_close(dy, torch.nn.functional.conv2d(tx, conv.weight, None, conv.stride, conv.padding))


def test_parameter_tangents_are_included():
    # torch.func.functional_call with dual parameters: the rule must add conv(x, dw) + db and x_hat * dw + db.
    for module in (_random_affine(JvpConv2d(3, 4, 3, padding=1)), _random_affine(JvpGroupNorm(2, 4))):
        x = torch.randn(2, module.weight.shape[1] if isinstance(module, JvpConv2d) else 4, 6, 6, dtype=torch.float64)
        params = dict(module.named_parameters())
        tangents = {k: torch.randn_like(v) for k, v in params.items()}

        def f(p):
            return torch.func.functional_call(module, p, (x,))

        with torch.no_grad(), jvp_safe_attention():
            _, ours = torch.func.jvp(f, (params,), (tangents,))
        _, ref = torch.func.jvp(f, (params,), (tangents,))
        torch.testing.assert_close(ours, ref, atol=1e-10, rtol=1e-8)


def test_layers_are_plain_nn_layers_under_autograd():
    # With gradients on (training forward, or the joint JVP strategy) the stock layers run and backprop works.
    conv, norm = JvpConv2d(2, 4, 3, padding=1), JvpGroupNorm(2, 4)
    x = torch.randn(1, 2, 5, 5, requires_grad=True)
    with jvp_safe_attention():
        y = norm(conv(x))
    y.sum().backward()
    assert x.grad is not None and "GroupNormWithTangent" not in str(y.grad_fn)
