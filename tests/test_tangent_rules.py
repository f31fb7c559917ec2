"""Hand-written tangent rules (meanflow.tangent_rules) against PyTorch's own forward-mode AD and finite differences."""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn

from emf_lightning.meanflow.tangent_rules import fast_tangents, jvp_safe_attention
from emf_lightning.models import build_generator


def _random_params(module: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return module.double()


def _both_tangents(fn, x: torch.Tensor, tx: torch.Tensor):
    """(output, tangent) from the hand-written rules and from PyTorch's generic ones."""
    with torch.no_grad(), fast_tangents():
        ours = torch.func.jvp(fn, (x,), (tx,))
    reference = torch.func.jvp(fn, (x,), (tx,))
    return ours, reference


def _inputs(*shape: int, channels_last: bool = False, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=torch.float64) * 3 + 1
    tx = torch.randn(*shape, generator=g, dtype=torch.float64)
    if channels_last:
        x, tx = x.contiguous(memory_format=torch.channels_last), tx.contiguous(memory_format=torch.channels_last)
    return x, tx


MODULES = {
    "linear": lambda: nn.Linear(6, 5),
    "linear-nobias": lambda: nn.Linear(6, 5, bias=False),
    "conv3x3": lambda: nn.Conv2d(6, 4, 3, padding=1),
    "conv-stride2": lambda: nn.Conv2d(6, 4, 3, stride=2, padding=1),
    "conv1x1-nobias": lambda: nn.Conv2d(6, 4, 1, bias=False),
    "groupnorm": lambda: nn.GroupNorm(3, 6, eps=1e-6),
    "groupnorm-1group": lambda: nn.GroupNorm(1, 6),
    "groupnorm-noaffine": lambda: nn.GroupNorm(2, 6, affine=False),
    "layernorm": lambda: nn.LayerNorm(6),
    "layernorm-noaffine": lambda: nn.LayerNorm(6, elementwise_affine=False, eps=1e-6),
}


def _is_image_layer(name: str) -> bool:
    return name.startswith(("conv", "groupnorm"))


CASES = [(n, False) for n in sorted(MODULES)] + [(n, True) for n in sorted(MODULES) if _is_image_layer(n)]


@pytest.mark.parametrize("name,channels_last", CASES)
def test_rule_matches_pytorch_and_finite_differences(name, channels_last):
    module = _random_params(MODULES[name]())
    shape = (3, 6, 5, 4) if _is_image_layer(name) else (3, 7, 6)
    x, tx = _inputs(*shape, channels_last=channels_last)
    (y, dy), (y_ref, dy_ref) = _both_tangents(module, x, tx)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(dy, dy_ref, atol=1e-10, rtol=1e-8)
    h = 1e-6
    with torch.no_grad():
        fd = (module(x + h * tx) - module(x - h * tx)) / (2 * h)
    torch.testing.assert_close(dy, fd, atol=1e-7, rtol=1e-6)


def test_keyword_arguments_and_forward_ad_api():
    w, b = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    x, tx = _inputs(2, 6)

    def fn(x_):
        return F.layer_norm(F.linear(x_, weight=w, bias=b), normalized_shape=(4,), eps=1e-3)

    (_, dy), (_, dy_ref) = _both_tangents(fn, x, tx)
    torch.testing.assert_close(dy, dy_ref, atol=1e-10, rtol=1e-8)
    with torch.no_grad(), fast_tangents(), fwAD.dual_level():
        dy_fwad = fwAD.unpack_dual(fn(fwAD.make_dual(x, tx))).tangent
    torch.testing.assert_close(dy_fwad, dy_ref, atol=1e-10, rtol=1e-8)


def test_parameter_tangents_are_included():
    # Dual parameters (torch.func.functional_call): conv(x, dW) + db, x dW^T + db, x_hat dW + db.
    for module, shape in (
        (nn.Conv2d(3, 4, 3, padding=1), (2, 3, 6, 6)),
        (nn.GroupNorm(2, 4), (2, 4, 5, 5)),
        (nn.Linear(3, 4), (2, 3)),
        (nn.LayerNorm(4), (2, 4)),
    ):
        module = _random_params(module)
        x, _ = _inputs(*shape)
        params = dict(module.named_parameters())
        tangents = {k: torch.randn_like(v) for k, v in params.items()}

        def f(p):
            return torch.func.functional_call(module, p, (x,))

        with torch.no_grad(), fast_tangents():
            _, ours = torch.func.jvp(f, (params,), (tangents,))
        _, ref = torch.func.jvp(f, (params,), (tangents,))
        torch.testing.assert_close(ours, ref, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("size", ["tiny", "unet-tiny"])
def test_whole_backbone_jvp_matches_pytorch(size):
    gen = build_generator(size, text_dim=12, input_size=16).double()
    _random_params(gen)
    with torch.no_grad():
        for p in gen.parameters():
            p.mul_(0.1)
    z, v = _inputs(2, 3, 16, 16)
    r, t = torch.tensor([0.1, 0.3], dtype=torch.float64), torch.tensor([0.5, 0.8], dtype=torch.float64)
    ctx, mask = torch.randn(2, 4, 12, dtype=torch.float64), torch.tensor([[True, True, False, False], [True] * 4])

    def u(z_, t_):
        return gen(z_, r, t_, ctx, mask)

    with jvp_safe_attention():
        ref = torch.func.jvp(u, (z, t), (v, torch.ones_like(t)))
        with torch.no_grad(), fast_tangents():
            ours = torch.func.jvp(u, (z, t), (v, torch.ones_like(t)))
    torch.testing.assert_close(ours[0], ref[0])
    torch.testing.assert_close(ours[1], ref[1], atol=1e-9, rtol=1e-7)


def test_a_bias_tangent_alone_is_broadcast_to_the_output():
    # Only the bias is dual: the rule's tangent is db spread over every position, as PyTorch's.
    for module, shape in (
        (nn.Conv2d(3, 4, 3, padding=1), (2, 3, 6, 6)),
        (nn.Linear(3, 4), (2, 5, 3)),
        (nn.GroupNorm(2, 4), (2, 4, 5, 5)),
        (nn.LayerNorm(4), (2, 4)),
    ):
        module = _random_params(module)
        x, _ = _inputs(*shape)
        bias = {"bias": module.bias}
        tangent = {"bias": torch.randn_like(module.bias)}

        def f(p):
            return torch.func.functional_call(module, p, (x,))

        with torch.no_grad(), fast_tangents():
            out, ours = torch.func.jvp(f, (bias,), (tangent,))
        _, ref = torch.func.jvp(f, (bias,), (tangent,))
        assert ours.shape == out.shape
        torch.testing.assert_close(ours, ref)


def test_refuses_to_run_with_gradients_on():
    with pytest.raises(RuntimeError, match="under torch.no_grad"):
        with fast_tangents():
            pass


def test_same_padding_conv_falls_back_to_pytorch():
    conv = _random_params(nn.Conv2d(2, 3, 3, padding="same"))
    x, tx = _inputs(1, 2, 5, 5)
    (_, dy), (_, dy_ref) = _both_tangents(conv, x, tx)
    torch.testing.assert_close(dy, dy_ref)
