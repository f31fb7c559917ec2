"""Backbone, connector and attention: numbers against independent references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from emf_lightning.meanflow import tangent_rules
from emf_lightning.meanflow.tangent_rules import jvp_safe_attention
from emf_lightning.models import (
    BACKBONES,
    DiT,
    Generator,
    TextConnector,
    attention,
    build_generator,
    math_attention,
)
from emf_lightning.models.layers import TimestepEmbedder, sincos_2d


def perturb_zero_init(module: torch.nn.Module, std: float = 0.05, seed: int = 0) -> None:
    """adaLN-Zero starts with zero output; give the zero-initialised weights random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.abs().max() == 0:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def qkv(b=2, h=3, lq=5, lk=7, d=8, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, h, n, d, generator=g, dtype=dtype) for n in (lq, lk, lk))


def padding_mask(lengths: list[int], lk: int) -> torch.Tensor:
    return torch.arange(lk)[None, :] < torch.tensor(lengths)[:, None]


# ---------------------------------------------------------------------------------------------- attention


def test_math_attention_equals_sdpa_without_mask():
    q, k, v = qkv()
    torch.testing.assert_close(math_attention(q, k, v), F.scaled_dot_product_attention(q, k, v), atol=1e-6, rtol=1e-5)


def test_math_attention_equals_sdpa_with_padding_mask():
    q, k, v = qkv()
    mask = padding_mask([3, 7], 7)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
    torch.testing.assert_close(math_attention(q, k, v, mask), ref, atol=1e-6, rtol=1e-5)
    # Masked keys have no influence: change them and the output stays.
    k2, v2 = k.clone(), v.clone()
    k2[0, :, 3:] = 100.0
    v2[0, :, 3:] = -100.0
    torch.testing.assert_close(math_attention(q, k2, v2, mask), ref, atol=1e-6, rtol=1e-5)


def test_attention_switches_path_inside_context_and_restores(monkeypatch):
    """The JVP mode routes attention's SDPA call to jvp_safe_sdpa while it is active, and leaves nothing behind
    (no global state: after the context, even one left by an exception, no mode is active)."""
    q, k, v = qkv()
    mask = padding_mask([2, 5], 7)
    routed = []
    real = tangent_rules.jvp_safe_sdpa
    monkeypatch.setattr(tangent_rules, "jvp_safe_sdpa", lambda *a, **kw: routed.append(1) or real(*a, **kw))
    assert not torch._C._is_torch_function_mode_enabled()
    with jvp_safe_attention():
        assert torch._C._is_torch_function_mode_enabled()
        out = attention(q, k, v, mask)
    assert routed == [1]
    assert not torch._C._is_torch_function_mode_enabled()
    torch.testing.assert_close(out, attention(q, k, v, mask), atol=1e-6, rtol=1e-5)
    assert routed == [1]  # outside the context: the fused kernel, not the JVP-safe path
    with pytest.raises(RuntimeError):
        with jvp_safe_attention():
            raise RuntimeError("boom")
    assert not torch._C._is_torch_function_mode_enabled()


def test_attention_under_jvp_matches_math_backend_sdpa_and_finite_differences():
    q, k, v = qkv(dtype=torch.float64)
    tq, tk, tv = qkv(seed=1, dtype=torch.float64)
    mask = padding_mask([4, 6], 7)

    def ours(q, k, v):
        return attention(q, k, v, mask)

    with jvp_safe_attention():
        out, tangent = torch.func.jvp(ours, (q, k, v), (tq, tk, tv))

    # Reference 1: PyTorch's own composite math SDPA, which forward-mode AD can differentiate.
    with sdpa_kernel(SDPBackend.MATH):
        _, ref = torch.func.jvp(
            lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :]),
            (q, k, v),
            (tq, tk, tv),
        )
    torch.testing.assert_close(tangent, ref, atol=1e-10, rtol=1e-8)
    # Reference 2: central finite differences.
    h = 1e-6
    fd = (ours(q + h * tq, k + h * tk, v + h * tv) - ours(q - h * tq, k - h * tk, v - h * tv)) / (2 * h)
    torch.testing.assert_close(tangent, fd, atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(out, ours(q, k, v))


def test_attention_rejects_bad_masks():
    q, k, v = qkv()
    with pytest.raises(TypeError, match="must be bool"):
        attention(q, k, v, torch.ones(2, 7))
    with pytest.raises(ValueError, match=r"must be \[B, Lk\]"):
        attention(q, k, v, torch.ones(2, 6, dtype=torch.bool))


# ---------------------------------------------------------------------------------------------- connector


def test_connector_matches_manual_formula():
    torch.manual_seed(0)
    conn = TextConnector(6, 8)
    with torch.no_grad():
        conn.norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 6)
    h = F.linear(x, conn.fc1.weight, conn.fc1.bias)
    h = 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3)))
    h = F.linear(h, conn.fc2.weight, conn.fc2.bias)
    ref = h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * conn.norm.weight
    torch.testing.assert_close(conn(x), ref, atol=1e-5, rtol=1e-5)


def test_connector_rejects_wrong_width():
    with pytest.raises(ValueError, match="width 6, got 5"):
        TextConnector(6, 8)(torch.randn(1, 2, 5))


# ---------------------------------------------------------------------------------------------- DiT parts


def test_sincos_2d_hand_values():
    emb = sincos_2d((2, 3), 8)  # y uses channels 0..3, x uses 4..7; each half = [sin(p w), cos(p w)], w = 1, 1e-2
    assert emb.shape == (6, 8)
    y, x = 1, 2
    row = emb[y * 3 + x]
    expect = [
        math.sin(y),
        math.sin(y / 100),
        math.cos(y),
        math.cos(y / 100),
        math.sin(x),
        math.sin(x / 100),
        math.cos(x),
        math.cos(x / 100),
    ]
    torch.testing.assert_close(row, torch.tensor(expect, dtype=torch.float32))


def test_timestep_embedder_sinusoid_scales_raw_time():
    emb = TimestepEmbedder(16, frequency_dim=4, scale=1000.0)
    s = emb.sinusoid(torch.tensor([0.25]))
    # freqs = [1, 1/100]; args = 250 * freqs
    expect = torch.tensor([[math.cos(250), math.cos(2.5), math.sin(250), math.sin(2.5)]])
    torch.testing.assert_close(s, expect)


def test_unpatchify_inverts_patch_order():
    model = DiT(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=1, num_heads=2)
    x = torch.randn(2, 3, 8, 8)
    # Patchify by hand: token (i, j) holds pixels [c, 2i+a, 2j+b] in (a, b, c) order.
    tokens = x.reshape(2, 3, 4, 2, 4, 2).permute(0, 2, 4, 3, 5, 1).reshape(2, 16, 12)
    torch.testing.assert_close(model.unpatchify(tokens), x)


def tiny_model(**kw) -> DiT:
    torch.manual_seed(0)
    cfg = dict(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=2, num_heads=4, context_dim=12)
    cfg.update(kw)
    return DiT(**cfg)


def inputs(b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(b, 3, 8, 8, generator=g)
    ctx = torch.randn(b, 5, 12, generator=g)
    mask = padding_mask([3, 5][:b] if b <= 2 else [5] * b, 5)
    return z, ctx, mask


def test_dit_output_depends_on_t_and_interval():
    model = tiny_model()
    perturb_zero_init(model)
    z, ctx, mask = inputs()
    base = model(z, torch.tensor([0.0, 0.0]), torch.tensor([0.1, 0.1]), ctx, mask)
    # Same t - r, different t: only the t embedder sees the change.
    shift_t = model(z, torch.tensor([0.8, 0.8]), torch.tensor([0.9, 0.9]), ctx, mask)
    # Same t, different t - r: only the interval embedder sees the change.
    shift_r = model(z, torch.tensor([0.0, 0.0]), torch.tensor([0.9, 0.9]), ctx, mask)
    shift_r_only = model(z, torch.tensor([0.8, 0.8]), torch.tensor([0.9, 0.9]), ctx, mask)
    # Raw t through N(0, 0.02) time MLPs gives a small but exact dependence at init (no noise: same inputs
    # give bit-identical outputs), so any change well above float rounding shows the path is wired.
    assert (shift_t - base).abs().max() > 1e-5
    assert (shift_r - shift_r_only).abs().max() > 1e-5
    # And each embedder alone is responsible: zero the interval embedder's output layer -> r has no effect.
    with torch.no_grad():
        model.interval_embedder.mlp[-1].weight.zero_()
        model.interval_embedder.mlp[-1].bias.zero_()
    torch.testing.assert_close(
        model(z, torch.tensor([0.0, 0.0]), torch.tensor([0.9, 0.9]), ctx, mask),
        model(z, torch.tensor([0.8, 0.8]), torch.tensor([0.9, 0.9]), ctx, mask),
    )


def test_dit_responds_to_t_and_r_after_training_steps():
    # From the true adaLN-Zero init, a few optimiser steps on a target that depends on t and r are enough.
    model = tiny_model(depth=1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    z, ctx, mask = inputs()
    for _ in range(5):
        r, t = torch.rand(2) * 0.5, 0.5 + torch.rand(2) * 0.5
        target = (t + 2 * (t - r))[:, None, None, None] * torch.ones_like(z)
        loss = (model(z, r, t, ctx, mask) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    a = model(z, torch.tensor([0.2, 0.2]), torch.tensor([0.6, 0.6]), ctx, mask)
    b = model(z, torch.tensor([0.3, 0.3]), torch.tensor([0.7, 0.7]), ctx, mask)
    c = model(z, torch.tensor([0.1, 0.1]), torch.tensor([0.6, 0.6]), ctx, mask)
    assert (a - b).abs().max() > 1e-4 and (a - c).abs().max() > 1e-4


def test_text_changes_output_through_cross_attention_and_pooling():
    for pool in (True, False):
        model = tiny_model(pool_context=pool)
        perturb_zero_init(model)
        z, ctx, mask = inputs()
        r, t = torch.tensor([0.1, 0.3]), torch.tensor([0.5, 0.8])
        diff = model(z, r, t, ctx, mask) - model(z, r, t, ctx.flip(0), mask.flip(0))
        assert diff.abs().max() > 1e-3


def test_copy_time_embedder_to_interval():
    model = tiny_model()
    s = torch.tensor([0.0, 0.3, 1.0])
    assert not torch.allclose(model.t_embedder(s), model.interval_embedder(s))
    model.copy_time_embedder_to_interval()
    torch.testing.assert_close(model.t_embedder(s), model.interval_embedder(s))
    # A copy, not shared storage: training one must not move the other.
    assert model.t_embedder.mlp[0].weight.data_ptr() != model.interval_embedder.mlp[0].weight.data_ptr()


def test_dit_rejects_bad_shapes():
    model = tiny_model()
    z, ctx, mask = inputs()
    with pytest.raises(ValueError, match="expects x of shape"):
        model(torch.randn(2, 3, 16, 16), torch.zeros(2), torch.ones(2), ctx, mask)
    with pytest.raises(ValueError, match="r and t must have shape"):
        model(z, torch.zeros(3), torch.ones(2), ctx, mask)
    with pytest.raises(ValueError, match="patch_size 3 must divide"):
        DiT(input_size=8, patch_size=3, hidden_size=32, depth=1, num_heads=4)
    with pytest.raises(ValueError, match="num_heads 5 must divide"):
        DiT(input_size=8, patch_size=2, hidden_size=32, depth=1, num_heads=5)


# ---------------------------------------------------------------------------------------------- generator


def test_build_generator_presets_and_overrides():
    dits = {k: DiT.PRESETS[preset] for k, (cls, preset) in BACKBONES.items() if cls is DiT}
    assert {k: (v["hidden_size"], v["depth"], v["num_heads"]) for k, v in dits.items()} == {
        "tiny": (128, 4, 4),
        "S": (384, 12, 6),
        "B": (768, 12, 12),
        "L": (1024, 24, 16),
        "XL": (1152, 28, 16),
    }
    gen = build_generator("tiny", text_dim=10, input_size=16)
    assert isinstance(gen, Generator)
    assert gen.backbone.hidden_size == 128 and len(gen.backbone.blocks) == 4
    assert gen.backbone.patch_size == 4 and gen.text_dim == 10
    gen = build_generator("tiny", text_dim=10, input_size=16, in_channels=4, patch_size=2, hidden_size=64, depth=1)
    assert gen.backbone.hidden_size == 64 and len(gen.backbone.blocks) == 1 and gen.backbone.patch_size == 2
    assert gen.connector.out_dim == 64
    u = gen(torch.randn(2, 4, 16, 16), torch.zeros(2), torch.ones(2), torch.randn(2, 3, 10), None)
    assert u.shape == (2, 4, 16, 16)


def test_build_generator_small_preset_parameter_count():
    gen = build_generator("S", text_dim=16, input_size=8, patch_size=2)
    d, depth = 384, 12
    # Per block: qkv + proj + q + kv + proj (cross) + MLP + adaLN(9d) + 4 RMS qk-norm weights of head_dim.
    block = (3 * d * d + 3 * d) + (d * d + d) + (d * d + d) + (2 * d * d + 2 * d) + (d * d + d)
    block += (4 * d * d + 4 * d) + (4 * d * d + d) + (9 * d * d + 9 * d) + 4 * (d // 6)
    embedders = 2 * (256 * d + d + d * d + d) + (d * d + d) * 2  # t, interval, pooled-context
    patch = 3 * 2 * 2 * d + d
    final = (2 * d * d + 2 * d) + (d * 2 * 2 * 3 + 2 * 2 * 3)
    connector = (16 * d + d) + (d * d + d) + d
    expected = depth * block + embedders + patch + final + connector
    assert sum(p.numel() for p in gen.parameters()) == expected


def test_build_generator_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown backbone 'M'"):
        build_generator("M", text_dim=4, input_size=8)
    with pytest.raises(ValueError, match="unknown DiT preset 'M'"):
        DiT(preset="M")
    with pytest.raises(TypeError, match=r"unknown DiT option\(s\) \['widht'\]"):
        build_generator("tiny", text_dim=4, input_size=8, widht=3)


def test_null_condition_padded_equals_unpadded():
    # The null condition is one zero token with mask True; when batched with longer captions it gets padded.
    gen = build_generator("tiny", text_dim=6, input_size=8, patch_size=2, hidden_size=32, depth=1, num_heads=2)
    perturb_zero_init(gen)
    z = torch.randn(1, 3, 8, 8)
    r, t = torch.tensor([0.2]), torch.tensor([0.7])
    short = gen(z, r, t, torch.zeros(1, 1, 6), torch.ones(1, 1, dtype=torch.bool))
    long = gen(z, r, t, torch.zeros(1, 4, 6), torch.tensor([[True, False, False, False]]))
    torch.testing.assert_close(short, long, atol=1e-6, rtol=1e-5)
    assert short.abs().max() > 0
