"""sharding.grad_norm: the global L2 gradient norm the module logs and the NaN guard checks.

The FSDP2 case (DTensor gradients, reduced over two gloo ranks) is checked in tests/test_fsdp.py against the
norm of the full single-process gradient."""

from __future__ import annotations

import math

import torch

from emf_lightning.training.sharding import grad_norm


def test_grad_norm_is_the_norm_of_all_gradients_as_one_vector():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    net(torch.randn(5, 4)).square().sum().backward()
    grads = torch.cat([p.grad.flatten() for p in net.parameters()]).double()
    assert grads.abs().sum() > 0
    torch.testing.assert_close(grad_norm(net.parameters()).double(), grads.norm(), rtol=1e-6, atol=0)
    assert grad_norm(net.parameters()).dtype == torch.float32


def test_grad_norm_hand_computed_and_parameters_without_gradients():
    a, b, c = (torch.nn.Parameter(torch.zeros(n)) for n in (2, 1, 3))
    a.grad = torch.tensor([3.0, 0.0])
    b.grad = torch.tensor([4.0])
    # c has no gradient (frozen or unused): skipped, not counted as zero-size trouble
    assert grad_norm([a, b, c]).item() == 5.0
    assert grad_norm([c]) is None
    assert grad_norm([]) is None


def test_grad_norm_reports_non_finite_gradients():
    a = torch.nn.Parameter(torch.zeros(2))
    a.grad = torch.tensor([1.0, math.inf])
    assert math.isinf(grad_norm([a]).item())
    a.grad = torch.tensor([1.0, math.nan])
    assert math.isnan(grad_norm([a]).item())
