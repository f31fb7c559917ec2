"""MeanFlow / flow-matching losses, time sampler and samplers against independent computations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from emf_lightning.meanflow import (
    FlowMatchingLoss,
    MeanFlowLoss,
    TimeSampler,
    cfg_velocity,
    concat_conditions,
    make_noise,
    merge_conditions,
    sample_flow_matching,
    sample_meanflow,
)
from emf_lightning.meanflow.jvp import du_dt
from emf_lightning.meanflow.naive import ReferenceMeanFlowLoss
from emf_lightning.meanflow.tangent_rules import jvp_safe_attention
from emf_lightning.models import build_generator

# The production loss and the naive reference (full-batch torch.func.jvp, as public code) must agree.
LOSSES = [MeanFlowLoss, ReferenceMeanFlowLoss]

# ---------------------------------------------------------------------------------------------- helpers


class LinearVelocity(nn.Module):
    """u = A z + b r + c t + M y (flattened): du/dt along (v, 0, 1) is A v + c, in closed form."""

    def __init__(self, dim: int, cond_dim: int, seed: int = 0, dtype=torch.float64):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.A = nn.Parameter(torch.randn(dim, dim, generator=g, dtype=dtype) / math.sqrt(dim))
        self.b = nn.Parameter(torch.randn(dim, generator=g, dtype=dtype))
        self.c = nn.Parameter(torch.randn(dim, generator=g, dtype=dtype))
        self.M = nn.Parameter(torch.randn(cond_dim, dim, generator=g, dtype=dtype))

    def forward(self, z, r, t, y):
        shape = z.shape
        u = z.flatten(1) @ self.A.T + r[:, None] * self.b + t[:, None] * self.c + y @ self.M
        return u.reshape(shape)


def linear_setup(b=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    net = LinearVelocity(2 * 2 * 2, 3)
    x = torch.randn(b, 2, 2, 2, generator=g, dtype=torch.float64)
    e = torch.randn(b, 2, 2, 2, generator=g, dtype=torch.float64)
    y = torch.randn(b, 3, generator=g, dtype=torch.float64)
    t = torch.rand(b, generator=g, dtype=torch.float64)
    r = t * torch.rand(b, generator=g, dtype=torch.float64)
    r[::2] = t[::2]  # half the batch with r = t
    return net, x, e, r, t, y


def linear_reference_loss(net, x, e, r, t, y, p=1.0, c=1e-3, v_target=None, tangent=None):
    """The MeanFlow loss written out with the closed-form du/dt = A w + c along (w, 0, 1), w = v by default."""
    tb = t[:, None]
    xf, ef = x.flatten(1), e.flatten(1)
    z = (1 - tb) * xf + tb * ef
    v = ef - xf if v_target is None else v_target.flatten(1)
    u = z @ net.A.T + r[:, None] * net.b + tb * net.c + y @ net.M
    w = v if tangent is None else tangent.flatten(1)
    dudt = w @ net.A.T + net.c
    target = (v - (t - r)[:, None] * dudt).detach()
    per = ((u - target) ** 2).sum(1)
    w = 1.0 / (per.detach() + c) ** p
    return (w * per).mean()


def tiny_generator(seed=0, text_dim=6, dtype=torch.float32):
    """A small DiT generator with its adaLN-Zero weights perturbed, so outputs and gradients are non-trivial."""
    torch.manual_seed(seed)
    gen = build_generator("tiny", text_dim=text_dim, input_size=8, patch_size=2, hidden_size=32, depth=2, num_heads=4)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in gen.parameters():
            if p.abs().max() == 0:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return gen.to(dtype)


def text_batch(b=6, seed=0, text_dim=6, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 3, 8, 8, generator=g, dtype=dtype).clamp(-1, 1)
    tokens = torch.randn(b, 5, text_dim, generator=g, dtype=dtype)
    lengths = torch.tensor([1, 2, 3, 4, 5, 5, 2, 3][:b])
    mask = torch.arange(5)[None] < lengths[:, None]
    tokens = tokens * mask[..., None]
    return x, (tokens, mask)


def null_cond(text_dim=6, dtype=torch.float32):
    return (torch.zeros(1, 1, text_dim, dtype=dtype), torch.ones(1, 1, dtype=torch.bool))


def grads(module):
    return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}


# ---------------------------------------------------------------------------------------------- loss values


@pytest.mark.parametrize("loss_cls", LOSSES)
@pytest.mark.parametrize("p", [1.0, 0.5, 0.0])
def test_loss_equals_closed_form_for_linear_model(loss_cls, p):
    net, x, e, r, t, y = linear_setup()
    loss_fn = loss_cls(adaptive_p=p, adaptive_c=1e-2)
    loss, stats = loss_fn.compute(net, x, e, r, t, (y,))
    ref = linear_reference_loss(net, x, e, r, t, y, p=p, c=1e-2)
    torch.testing.assert_close(loss, ref, atol=1e-12, rtol=1e-10)
    assert stats["neq_share"] == 0.5
    # Gradients through u only (the target is a constant), against autograd of the written-out formula.
    (g_ours,) = torch.autograd.grad(loss, [net.A])
    (g_ref,) = torch.autograd.grad(linear_reference_loss(net, x, e, r, t, y, p=p, c=1e-2), [net.A])
    torch.testing.assert_close(g_ours, g_ref, atol=1e-12, rtol=1e-10)


def test_loss_equals_finite_difference_formula_on_dit():
    # Independent of torch.func: du/dt by a central difference of the network itself, in float64.
    gen = tiny_generator(dtype=torch.float64)
    x, cond = text_batch(dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    e = torch.randn(x.shape, generator=g, dtype=torch.float64)
    t = 0.2 + 0.7 * torch.rand(6, generator=g, dtype=torch.float64)
    r = t * torch.rand(6, generator=g, dtype=torch.float64)
    r[0] = t[0]
    loss, _ = MeanFlowLoss(adaptive_c=1e-3).compute(gen, x, e, r, t, cond)

    tb = t[:, None, None, None]
    z, v = (1 - tb) * x + tb * e, e - x
    h = 1e-7
    with torch.no_grad():
        dudt = (gen(z + h * v, r, t + h, *cond) - gen(z - h * v, r, t - h, *cond)) / (2 * h)
        u = gen(z, r, t, *cond)
    target = v - (t - r)[:, None, None, None] * dudt
    per = ((u - target) ** 2).flatten(1).sum(1)
    ref = (per / (per + 1e-3)).mean()
    torch.testing.assert_close(loss, ref, atol=1e-9, rtol=1e-7)


def test_r_equal_t_samples_get_exactly_the_flow_matching_target():
    gen = tiny_generator()
    x, cond = text_batch()
    g = torch.Generator().manual_seed(2)
    e = torch.randn(x.shape, generator=g)
    t = torch.rand(6, generator=g)
    fm_loss, fm_stats = FlowMatchingLoss().compute(gen, x, e, t, t, cond)
    for loss_cls in LOSSES:
        loss, stats = loss_cls().compute(gen, x, e, t.clone(), t, cond)
        if loss_cls is MeanFlowLoss:  # same forward, same target: bit-identical
            assert torch.equal(loss, fm_loss)
        else:  # full-batch JVP runs math attention: same up to float rounding, target v exactly
            torch.testing.assert_close(loss, fm_loss, atol=1e-6, rtol=1e-5)
        assert stats["neq_share"] == 0 and "mse_r_neq_t" not in stats
    # In a mixed batch the r = t rows have target v: their per-row MSE equals flow matching's on those rows.
    r = t.clone()
    r[1::2] = 0.5 * t[1::2]
    _, stats = MeanFlowLoss().compute(gen, x, e, r, t, cond)
    rows = torch.arange(0, 6, 2)
    _, fm_rows = FlowMatchingLoss().compute(gen, x[rows], e[rows], t[rows], t[rows], (cond[0][rows], cond[1][rows]))
    torch.testing.assert_close(stats["mse_r_eq_t"], fm_rows["mse"], atol=1e-7, rtol=1e-6)


def test_flow_matching_loss_formula_and_call_uses_r_equal_t():
    net, x, e, _, t, y = linear_setup()
    loss, _ = FlowMatchingLoss(adaptive_p=0.0).compute(net, x, e, t, t, (y,))
    tb = t[:, None, None, None]
    z = (1 - tb) * x + tb * e
    ref = ((net(z, t, t, y) - (e - x)) ** 2).flatten(1).sum(1).mean()
    torch.testing.assert_close(loss, ref)
    seen = []

    def spy(z, r, t, y):
        seen.append(torch.equal(r, t))
        return net(z, r, t, y)

    FlowMatchingLoss(cond_drop_prob=0.0)(spy, x, (y,), generator=torch.Generator().manual_seed(0))
    assert seen == [True]


# ---------------------------------------------------------------------------------------------- the JVP


@pytest.mark.parametrize("loss_cls", LOSSES)
def test_predicted_tangent_equals_closed_form_for_linear_model(loss_cls):
    # Improved MeanFlow: du/dt along the network's own instantaneous velocity u(z, t, t), not e - x.
    net, x, e, r, t, y = linear_setup()
    # p = 0 (plain squared error): with p = 1 every loss is close to 1 and would hide a wrong tangent.
    loss_fn = loss_cls(adaptive_p=0.0, jvp_tangent="predicted")
    loss, _ = loss_fn.compute(net, x, e, r, t, (y,))
    tb = t[:, None, None, None]
    z = (1 - tb) * x + tb * e
    with torch.no_grad():
        u_inst = net(z, t, t, y)
    ref = linear_reference_loss(net, x, e, r, t, y, p=0.0, tangent=u_inst)
    torch.testing.assert_close(loss, ref, atol=1e-12, rtol=1e-10)
    # ... and it is a different loss from MeanFlow's (the tangent matters on the r != t rows).
    assert not torch.isclose(loss, linear_reference_loss(net, x, e, r, t, y, p=0.0), rtol=1e-3)
    (g_ours,) = torch.autograd.grad(loss, [net.A])
    (g_ref,) = torch.autograd.grad(linear_reference_loss(net, x, e, r, t, y, p=0.0, tangent=u_inst), [net.A])
    torch.testing.assert_close(g_ours, g_ref, atol=1e-12, rtol=1e-10)


def test_predicted_tangent_is_guided_like_the_target_and_respects_dropout():
    net, x, e, r, t, y = linear_setup()
    y_null = torch.full((1, 3), 0.5, dtype=torch.float64)
    omega, kappa, lo, hi = 1.5, 0.3, 0.0, 0.6
    drop = torch.tensor([False, True, False, False, False, True])
    loss_fn = MeanFlowLoss(
        adaptive_p=0.0, guidance_omega=omega, guidance_kappa=kappa, guidance_interval=(lo, hi), jvp_tangent="predicted"
    )
    loss, _ = loss_fn.compute(net, x, e, r, t, (y,), (y_null,), drop)
    y_eff = torch.where(drop[:, None], y_null.expand(6, 3), y)
    tb = t[:, None, None, None]
    z, v = (1 - tb) * x + tb * e, e - x
    with torch.no_grad():
        u_null = net(z, t, t, y_null.expand(6, 3))
        u_cond = net(z, t, t, y_eff)
    guided = (((t >= lo) & (t <= hi)) & ~drop)[:, None, None, None]
    assert guided.any() and not guided.all()
    v_g = torch.where(guided, omega * v + (1 - omega - kappa) * u_null + kappa * u_cond, v)
    tangent = torch.where(guided, (omega + kappa) * u_cond + (1 - omega - kappa) * u_null, u_cond)
    ref = linear_reference_loss(net, x, e, r, t, y_eff, p=0.0, v_target=v_g, tangent=tangent)
    torch.testing.assert_close(loss, ref, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("tangent", ["conditional", "predicted"])
@pytest.mark.parametrize("neq_rows", [[1, 3, 4], [0, 1, 2, 3, 4, 5], [2], []])
def test_production_loss_and_gradients_equal_the_naive_full_batch_jvp(neq_rows, tangent):
    gen = tiny_generator()
    x, cond = text_batch()
    g = torch.Generator().manual_seed(3)
    e = torch.randn(x.shape, generator=g)
    t = 0.1 + 0.9 * torch.rand(6, generator=g)
    r = t.clone()
    r[neq_rows] = t[neq_rows] * torch.rand(len(neq_rows), generator=g)

    results = {}
    for loss_cls in LOSSES:
        gen.zero_grad()
        loss, stats = loss_cls(jvp_tangent=tangent).compute(gen, x, e, r, t, cond)
        loss.backward()
        results[loss_cls] = (loss.detach(), grads(gen), stats)
    (l_ours, g_ours, s_ours), (l_ref, g_ref, s_ref) = results[MeanFlowLoss], results[ReferenceMeanFlowLoss]
    torch.testing.assert_close(l_ours, l_ref, atol=1e-5, rtol=1e-5)
    assert g_ours.keys() == g_ref.keys() and len(g_ours) == len(list(gen.parameters()))
    for name in g_ref:
        assert torch.isfinite(g_ours[name]).all()
        torch.testing.assert_close(g_ours[name], g_ref[name], atol=1e-5, rtol=1e-4, msg=name)
    # The reference does not compute du/dt's size; every other statistic must match.
    assert s_ours.keys() - {"dudt_rms"} == s_ref.keys()
    for key in s_ref:
        torch.testing.assert_close(s_ours[key], s_ref[key], atol=1e-5, rtol=1e-4, msg=key)


def test_jvp_primal_carries_parameter_gradients():
    # The reference loss (py-meanflow's shape) relies on the primal of torch.func.jvp keeping its graph.
    gen = tiny_generator()
    x, cond = text_batch(b=4)
    r, t = torch.tensor([0.1, 0.2, 0.0, 0.3]), torch.tensor([0.5, 0.9, 1.0, 0.4])
    w = torch.randn_like(x)
    with jvp_safe_attention():
        u, dudt = torch.func.jvp(
            lambda z_, r_, t_: gen(z_, r_, t_, *cond),
            (x, r, t),
            (torch.randn_like(x), torch.zeros_like(r), torch.ones_like(t)),
        )
    assert u.requires_grad
    (u * w).sum().backward()
    via_jvp = grads(gen)
    gen.zero_grad()
    (gen(x, r, t, *cond) * w).sum().backward()
    plain = grads(gen)
    for name in plain:
        torch.testing.assert_close(via_jvp[name], plain[name], atol=1e-5, rtol=1e-4, msg=name)


def test_du_dt_matches_the_full_jvp_on_r_neq_t_rows_and_is_zero_elsewhere():
    gen = tiny_generator()
    x, cond = text_batch(b=4)
    r, t = torch.tensor([0.5, 0.2, 0.7, 0.1]), torch.tensor([0.5, 0.9, 0.7, 0.4])
    tangent = torch.randn_like(x)
    ours = du_dt(gen, x, r, t, tangent, cond)
    assert not ours.requires_grad
    with jvp_safe_attention():
        _, full = torch.func.jvp(
            lambda z_, r_, t_: gen(z_, r_, t_, *cond), (x, r, t), (tangent, torch.zeros_like(r), torch.ones_like(t))
        )
    torch.testing.assert_close(ours[[1, 3]], full[[1, 3]], atol=1e-5, rtol=1e-4)
    assert torch.count_nonzero(ours[[0, 2]]) == 0


# ---------------------------------------------------------------------------------------------- guidance, dropout


def test_training_guidance_target_matches_formula():
    net, x, e, r, t, y = linear_setup()
    y_null = torch.zeros(1, 3, dtype=torch.float64)
    omega, kappa, lo, hi = 2.0, 0.5, 0.0, 0.6
    loss_fn = MeanFlowLoss(guidance_omega=omega, guidance_kappa=kappa, guidance_interval=(lo, hi))
    loss, _ = loss_fn.compute(net, x, e, r, t, (y,), (y_null,))
    tb = t[:, None, None, None]
    z, v = (1 - tb) * x + tb * e, e - x
    with torch.no_grad():
        u_null = net(z, t, t, y_null.expand(6, 3))
        u_cond = net(z, t, t, y)
    v_g = omega * v + (1 - omega - kappa) * u_null + kappa * u_cond
    inside = ((t >= lo) & (t <= hi))[:, None, None, None]
    assert inside.any() and not inside.all()
    v_g = torch.where(inside, v_g, v)
    ref = linear_reference_loss(net, x, e, r, t, y, v_target=v_g)
    torch.testing.assert_close(loss, ref, atol=1e-12, rtol=1e-10)


def test_condition_dropout_uses_null_condition_and_unguided_target():
    net, x, e, r, t, y = linear_setup()
    y_null = torch.full((1, 3), 0.5, dtype=torch.float64)
    drop = torch.tensor([True, False, False, True, False, False])
    loss_fn = MeanFlowLoss(guidance_omega=1.5, guidance_interval=(0.0, 1.0))
    loss, stats = loss_fn.compute(net, x, e, r, t, (y,), (y_null,), drop)
    y_eff = torch.where(drop[:, None], y_null.expand(6, 3), y)
    tb = t[:, None, None, None]
    z, v = (1 - tb) * x + tb * e, e - x
    with torch.no_grad():
        v_g = 1.5 * v - 0.5 * net(z, t, t, y_null.expand(6, 3))
    v_g = torch.where(drop[:, None, None, None], v, v_g)
    ref = linear_reference_loss(net, x, e, r, t, y_eff, v_target=v_g)
    torch.testing.assert_close(loss, ref, atol=1e-12, rtol=1e-10)
    assert stats["cond_drop_share"] == pytest.approx(2 / 6)


def test_condition_dropout_draw_and_padding_of_text_null():
    gen = tiny_generator()
    x, cond = text_batch(b=8)
    loss_fn = MeanFlowLoss(cond_drop_prob=0.5)
    _, stats = loss_fn(gen, x, cond, null_cond(), generator=torch.Generator().manual_seed(0))
    assert 0 < stats["cond_drop_share"] < 1
    merged = merge_conditions(cond, null_cond(), torch.tensor([True] + [False] * 7))
    assert merged[0].shape == cond[0].shape
    assert torch.count_nonzero(merged[0][0]) == 0 and merged[1][0].tolist() == [True, False, False, False, False]
    assert torch.equal(merged[0][1:], cond[0][1:]) and torch.equal(merged[1][1:], cond[1][1:])


def test_bad_inputs_give_clear_errors():
    net, x, e, r, t, y = linear_setup()
    with pytest.raises(ValueError, match="needs r <= t"):
        MeanFlowLoss().compute(net, x, e, t, r, (y,))
    with pytest.raises(ValueError, match="null_cond is required"):
        MeanFlowLoss(guidance_omega=2.0, cond_drop_prob=0.0)(net, x, (y,))
    with pytest.raises(ValueError, match="unknown jvp_tangent 'model'"):
        MeanFlowLoss(jvp_tangent="model")
    with pytest.raises(ValueError, match="null_cond is required"):
        FlowMatchingLoss(cond_drop_prob=0.1)(net, x, (y,))
    with pytest.raises(ValueError, match="cond_drop_prob must lie in"):
        MeanFlowLoss(cond_drop_prob=1.0)
    with pytest.raises(ValueError, match="guidance_interval"):
        MeanFlowLoss(guidance_interval=(0.8, 0.2))
    with pytest.raises(ValueError, match="noise shape"):
        MeanFlowLoss().compute(net, x, e[:3], r, t, (y,))
    with pytest.raises(ValueError, match="cfg_scale=2.0 needs null_cond"):
        sample_meanflow(net, e, (y,), cfg_scale=2.0)


# ---------------------------------------------------------------------------------------------- time sampler


def test_time_sampler_share_order_and_counts():
    sampler = TimeSampler(neq_ratio=0.25)
    for seed in range(5):
        r, t = sampler(8, generator=torch.Generator().manual_seed(seed))
        assert r.shape == t.shape == (8,) and r.dtype == torch.float32
        assert bool((r <= t).all()) and bool(((t >= 0) & (t <= 1)).all())
        assert int((r != t).sum()) == 2  # 8 * 0.25 exactly
        r, t = TimeSampler(neq_ratio=0.3)(10, generator=torch.Generator().manual_seed(seed))
        assert int((r != t).sum()) == 3  # 10 * 0.3 is 3.0000000000000004 in floating point
    # A fractional expected count is met on average: 2 * 0.25 = 0.5 samples per batch.
    counts = [
        int((torch.ne(*TimeSampler(neq_ratio=0.25)(2, generator=torch.Generator().manual_seed(s)))).sum())
        for s in range(400)
    ]
    assert set(counts) == {0, 1} and abs(sum(counts) / 400 - 0.5) < 0.08


def test_time_sampler_schedule_endpoints_and_distribution():
    sampler = TimeSampler(mu=(-0.5, 0.5), sigma=(1.0, 2.0), neq_ratio=(0.25, 0.75))
    assert sampler.params(0.0) == {"mu": -0.5, "sigma": 1.0, "neq_ratio": 0.25, "one_step_share": 0.0}
    assert sampler.params(1.0) == {"mu": 0.5, "sigma": 2.0, "neq_ratio": 0.75, "one_step_share": 0.0}
    assert sampler.params(0.5) == {"mu": 0.0, "sigma": 1.5, "neq_ratio": 0.5, "one_step_share": 0.0}
    assert sampler.params(3.0) == sampler.params(1.0)  # progress is clamped
    g = torch.Generator().manual_seed(0)
    for progress, (mu, sigma) in [(0.0, (-0.5, 1.0)), (1.0, (0.5, 2.0))]:
        logits = torch.logit(sampler.draw(20000, progress, generator=g).double())
        assert abs(logits.mean().item() - mu) < 0.05 and abs(logits.std().item() - sigma) < 0.05
        r, t = sampler(1000, progress, generator=g)
        assert int((r != t).sum()) == (250 if progress == 0 else 750)
    u = TimeSampler("uniform").draw(20000, generator=g)
    assert u.min() >= 0 and u.max() <= 1 and abs(u.mean().item() - 0.5) < 0.01
    # t = max of two uniforms has mean 2/3, r = min has mean 1/3.
    r, t = TimeSampler("uniform", neq_ratio=1.0)(20000, generator=g)
    assert abs(t.mean().item() - 2 / 3) < 0.01 and abs(r.mean().item() - 1 / 3) < 0.01


def test_one_step_share_puts_that_share_of_r_neq_t_rows_on_the_full_interval():
    sampler = TimeSampler(mu=0.0, sigma=1.0, neq_ratio=(0.5, 0.5), one_step_share=(0.0, 0.5))
    g = torch.Generator().manual_seed(0)
    for progress, want in [(0.0, 0), (0.5, 125), (1.0, 250)]:  # of 500 r != t rows: 0, 25 % and 50 %
        r, t = sampler(1000, progress, generator=g)
        ends = (r == 0) & (t == 1)
        assert int((r != t).sum()) == 500 and int(ends.sum()) == want
        # The other rows keep their logit-normal draws (never exactly 0 or 1): r = t rows are untouched.
        others = ~ends
        assert bool(((t[others] > 0) & (t[others] < 1) & (r[others] > 0)).all())
    # Off (the default), the draws are exactly those of a sampler without the option: old seeds reproduce.
    plain = TimeSampler(mu=0.0, sigma=1.0, neq_ratio=0.5)
    off = TimeSampler(mu=0.0, sigma=1.0, neq_ratio=0.5, one_step_share=0.0)
    a = plain(64, 0.3, generator=torch.Generator().manual_seed(5))
    b = off(64, 0.3, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    with pytest.raises(ValueError, match="one_step_share must lie in"):
        TimeSampler(one_step_share=1.5)


def test_time_sampler_rejects_bad_settings():
    with pytest.raises(ValueError, match="unknown time distribution 'beta'"):
        TimeSampler("beta")
    with pytest.raises(ValueError, match="neq_ratio must lie in"):
        TimeSampler(neq_ratio=(0.2, 1.5))
    with pytest.raises(ValueError, match="sigma must be positive"):
        TimeSampler(sigma=0.0)
    with pytest.raises(ValueError, match="a number or a"):
        TimeSampler(mu=(0.0, 1.0, 2.0))


# ---------------------------------------------------------------------------------------------- samplers


def test_one_step_meanflow_sample_is_noise_minus_u():
    gen = tiny_generator()
    _, cond = text_batch(b=3)
    e = make_noise((3, 3, 8, 8), seed=0)
    x = sample_meanflow(gen, e, cond, steps=1)
    with torch.no_grad():
        ref = e - gen(e, torch.zeros(3), torch.ones(3), *cond)
    torch.testing.assert_close(x, ref)


def test_multi_step_samplers_follow_their_grids():
    net, _, _, _, _, y = linear_setup(b=3)
    e = make_noise((3, 2, 2, 2), seed=1, dtype=torch.float64)
    z_mf, z_fm = e.clone(), e.clone()
    grid = [1.0, 2 / 3, 1 / 3, 0.0]
    with torch.no_grad():
        for a, b in zip(grid[:-1], grid[1:]):
            ones = torch.ones(3, dtype=torch.float64)
            z_mf = z_mf - (a - b) * net(z_mf, ones * b, ones * a, y)
            z_fm = z_fm - (a - b) * net(z_fm, ones * a, ones * a, y)
    torch.testing.assert_close(sample_meanflow(net, e, (y,), steps=3), z_mf)
    torch.testing.assert_close(sample_flow_matching(net, e, (y,), steps=3), z_fm)


def test_cfg_scale_one_is_conditional_and_other_scales_extrapolate():
    gen = tiny_generator()
    _, cond = text_batch(b=3)
    e = make_noise((3, 3, 8, 8), seed=0)
    null = null_cond()
    torch.testing.assert_close(
        sample_meanflow(gen, e, cond, cfg_scale=1.0, null_cond=null), sample_meanflow(gen, e, cond)
    )
    zeros, ones = torch.zeros(3), torch.ones(3)
    with torch.no_grad():
        u_c = gen(e, zeros, ones, *cond)
        u_n = gen(e, zeros, ones, null[0].expand(3, 1, 6), null[1].expand(3, 1))
        guided = cfg_velocity(gen, e, zeros, ones, cond, 3.0, null)
    torch.testing.assert_close(guided, u_n + 3.0 * (u_c - u_n), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sample_meanflow(gen, e, cond, cfg_scale=3.0, null_cond=null), e - guided)
    x_fm = sample_flow_matching(gen, e, cond, steps=2, cfg_scale=1.0, null_cond=null)
    torch.testing.assert_close(x_fm, sample_flow_matching(gen, e, cond, steps=2))


def test_concat_conditions_pads_shorter_sequences():
    a = (torch.ones(2, 3, 4), torch.ones(2, 3, dtype=torch.bool))
    b = (torch.full((2, 1, 4), 2.0), torch.ones(2, 1, dtype=torch.bool))
    tok, mask = concat_conditions(a, b)
    assert tok.shape == (4, 3, 4) and mask.shape == (4, 3)
    assert mask[2:].tolist() == [[True, False, False]] * 2 and torch.count_nonzero(tok[2:, 1:]) == 0
    with pytest.raises(ValueError, match="cannot be aligned"):
        concat_conditions((torch.ones(2, 3, 4),), (torch.ones(2, 3, 5),))


def test_determinism_for_a_seed():
    gen = tiny_generator()
    x, cond = text_batch()
    assert torch.equal(make_noise((2, 3), 7), make_noise((2, 3), torch.Generator().manual_seed(7)))
    assert not torch.equal(make_noise((2, 3), 7), make_noise((2, 3), 8))
    loss_fn = MeanFlowLoss(TimeSampler(neq_ratio=0.5), cond_drop_prob=0.3)
    runs = [loss_fn(gen, x, cond, null_cond(), generator=torch.Generator().manual_seed(5)) for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0])
    other = loss_fn(gen, x, cond, null_cond(), generator=torch.Generator().manual_seed(6))
    assert not torch.equal(runs[0][0], other[0])
    s1 = sample_meanflow(gen, make_noise((2, 3, 8, 8), 3), (cond[0][:2], cond[1][:2]), steps=2)
    s2 = sample_meanflow(gen, make_noise((2, 3, 8, 8), 3), (cond[0][:2], cond[1][:2]), steps=2)
    assert torch.equal(s1, s2)


def test_bf16_autocast_loss_runs_and_stays_close():
    gen = tiny_generator()
    x, cond = text_batch()
    g = torch.Generator().manual_seed(4)
    e = torch.randn(x.shape, generator=g)
    t = 0.2 + 0.7 * torch.rand(6, generator=g)
    r = t * torch.rand(6, generator=g)
    r[:3] = t[:3]
    ref, _ = MeanFlowLoss(adaptive_p=0.0).compute(gen, x, e, r, t, cond)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = MeanFlowLoss(adaptive_p=0.0).compute(gen, x, e, r, t, cond)
    assert loss.dtype == torch.float32
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in gen.parameters())
    torch.testing.assert_close(loss.detach(), ref, rtol=5e-2, atol=0.0)


def test_float64_data_gives_float64_times_loss_and_samples():
    # Times follow the data's dtype: a float64 network is not handed float32 times (issue 13).
    net, x, _, _, _, y = linear_setup()
    seen = []

    def spy(z, r, t, y_):
        seen.append((z.dtype, r.dtype, t.dtype))
        return net(z, r, t, y_)

    for loss_fn in (MeanFlowLoss(TimeSampler(neq_ratio=0.5), cond_drop_prob=0.0), FlowMatchingLoss(cond_drop_prob=0.0)):
        loss, _ = loss_fn(spy, x, (y,), generator=torch.Generator().manual_seed(0))
        assert loss.dtype == torch.float64
    e = make_noise(x.shape, seed=0, dtype=torch.float64)
    for sampler in (sample_meanflow, sample_flow_matching):
        assert sampler(spy, e, (y,), steps=2).dtype == torch.float64
    assert seen and all(dtypes == (torch.float64,) * 3 for dtypes in seen)


def test_fp32_jvp_precision_matches_float64_under_bf16_autocast():
    # Under bf16 autocast du/dt carries bf16's error; jvp_precision="fp32" computes it as the reference codes do.
    gen = tiny_generator()
    x, cond = text_batch()
    g = torch.Generator().manual_seed(5)
    r, t = 0.3 * torch.rand(6, generator=g), 0.5 + 0.5 * torch.rand(6, generator=g)
    tangent = torch.randn(x.shape, generator=g)
    ref = du_dt(
        tiny_generator(dtype=torch.float64),
        x.double(),
        r.double(),
        t.double(),
        tangent.double(),
        (cond[0].double(), cond[1]),
    )
    errors = {}
    for precision in ("fp32", "autocast"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = du_dt(gen, x, r, t, tangent, cond, precision)
        assert got.dtype == torch.float32
        errors[precision] = ((got.double() - ref).norm() / ref.norm()).item()
    assert errors["fp32"] < 1e-5  # float32 rounding
    assert errors["autocast"] > 100 * errors["fp32"]  # bf16 keeps ~3 significant digits
    with pytest.raises(ValueError, match="unknown jvp_precision 'fp16'"):
        MeanFlowLoss(jvp_precision="fp16")
