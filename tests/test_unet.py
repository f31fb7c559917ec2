"""The U-Net backbone: zero init, conditioning paths, padding invariance, JVP, presets."""

from __future__ import annotations

import pytest
import torch

from emf_lightning.meanflow import MeanFlowLoss, TimeSampler
from emf_lightning.meanflow.naive import ReferenceMeanFlowLoss
from emf_lightning.models import UNet, build_generator

from test_models import perturb_zero_init


def small_unet(**kw) -> UNet:
    torch.manual_seed(0)
    args = dict(
        input_size=8,
        base_channels=8,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(2,),
        head_dim=8,
        context_dim=12,
    )
    args.update(kw)
    return UNet(**args)


def inputs(b: int = 2, size: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(b, 3, size, size, generator=g)
    ctx = torch.randn(b, 5, 12, generator=g)
    mask = torch.tensor([[True, True, True, False, False], [True] * 5])
    return z, ctx, mask


def test_unet_layout_has_skip_for_every_up_block():
    # DDPM layout: (num_res_blocks + 1) up blocks per level, each consuming one skip; all skips are used.
    for blocks, mult in ((1, (1, 2)), (2, (1, 2, 2)), (1, (1, 1, 2, 2))):
        model = small_unet(input_size=16, num_res_blocks=blocks, channel_mult=mult)
        assert len(model.up) == (blocks + 1) * len(mult)
        perturb_zero_init(model)
        z = torch.randn(1, 3, 16, 16)
        u = model(z, torch.zeros(1), torch.ones(1), torch.randn(1, 2, 12), None)
        assert u.shape == z.shape and u.abs().max() > 0


def test_unet_output_depends_on_t_interval_and_text():
    model = small_unet()
    perturb_zero_init(model)
    z, ctx, mask = inputs()
    base = model(z, torch.tensor([0.0, 0.0]), torch.tensor([0.1, 0.1]), ctx, mask)
    shift_t = model(z, torch.tensor([0.8, 0.8]), torch.tensor([0.9, 0.9]), ctx, mask)
    assert (shift_t - base).abs().max() > 1e-5
    r, t = torch.tensor([0.1, 0.3]), torch.tensor([0.5, 0.8])
    flipped = model(z, r, t, ctx.flip(0), mask.flip(0))
    assert (model(z, r, t, ctx, mask) - flipped).abs().max() > 1e-3
    # Zeroing the interval embedder's output removes the dependence on r (same t).
    with torch.no_grad():
        model.interval_embedder.mlp[-1].weight.zero_()
        model.interval_embedder.mlp[-1].bias.zero_()
    torch.testing.assert_close(
        model(z, torch.tensor([0.0, 0.0]), torch.tensor([0.9, 0.9]), ctx, mask),
        model(z, torch.tensor([0.8, 0.8]), torch.tensor([0.9, 0.9]), ctx, mask),
    )


@pytest.mark.parametrize("position_embedding", [False, True])
def test_unet_meanflow_loss_and_gradients_equal_the_naive_full_batch_jvp(position_embedding):
    # The production JVP (r != t rows only, graph-free, hand-written tangent rules for GroupNorm and conv)
    # must give the naive full-batch loss and gradients on a U-Net too.
    gen = build_generator(
        "unet-tiny",
        text_dim=12,
        input_size=8,
        base_channels=8,
        channel_mult=(1, 2),
        attention_resolutions=(2,),
        head_dim=8,
        context_dim=16,
        position_embedding=position_embedding,
    )
    perturb_zero_init(gen)
    x = torch.randn(6, 3, 8, 8)
    cond = (torch.randn(6, 4, 12), torch.ones(6, 4, dtype=torch.bool))
    null = (torch.zeros(1, 1, 12), torch.ones(1, 1, dtype=torch.bool))
    results = []
    for loss_cls in (ReferenceMeanFlowLoss, MeanFlowLoss):
        loss_fn = loss_cls(TimeSampler(neq_ratio=(0.5, 0.5)), cond_drop_prob=0.0)
        gen.zero_grad()
        loss, _ = loss_fn(gen, x, cond, null, 0.0, generator=torch.Generator().manual_seed(3))
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in gen.parameters()]))
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-6, rtol=1e-5)
    for a, b in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_position_embedding_tells_attention_where_a_token_stands():
    # A spatially uniform input: without the embedding every image token is the same, so the attention block's
    # output is uniform too (it cannot tell left from right); with it, the output varies with place.
    from emf_lightning.models.unet import AttentionBlock

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 1, 1, generator=g).expand(2, 16, 4, 6).contiguous()
    ctx = torch.randn(2, 3, 12, generator=g)
    outputs = {}
    for grid in (None, (4, 6)):
        torch.manual_seed(0)
        block = AttentionBlock(16, 12, head_dim=8, grid=grid)
        perturb_zero_init(block)
        outputs[grid] = block(x, ctx, None)
    assert outputs[None].flatten(2).std(dim=2).max() < 1e-6
    assert outputs[(4, 6)].flatten(2).std(dim=2).min() > 1e-4  # every channel, every sample
    with pytest.raises(ValueError, match=r"built for a \(4, 6\) grid got \(4, 4\)"):
        block(torch.randn(2, 16, 4, 4), ctx, None)


def test_position_embedding_adds_no_parameters_and_reaches_every_attention_block():
    plain, placed = small_unet(input_size=16), small_unet(input_size=16, position_embedding=True)
    assert plain.state_dict().keys() == placed.state_dict().keys()  # checkpoints load either way
    grids = [m.grid for m in placed.modules() if hasattr(m, "pos_embed")]
    assert grids == [(8, 8), (8, 8), (8, 8), (8, 8)]  # down, mid, two up steps: all at the 2x level
    assert placed.init_args["position_embedding"] is True


def test_unet_presets_build_and_run():
    assert sorted(UNet.PRESETS) == ["B", "S", "tiny"]
    gen = build_generator("unet-tiny", text_dim=10, input_size=16)
    assert isinstance(gen.backbone, UNet)
    assert gen.connector.out_dim == gen.backbone.context_dim == UNet.PRESETS["tiny"]["context_dim"]
    u = gen(torch.randn(2, 3, 16, 16), torch.zeros(2), torch.ones(2), torch.randn(2, 3, 10), None)
    assert u.shape == (2, 3, 16, 16)


def test_unet_rejects_bad_options_and_shapes():
    with pytest.raises(TypeError, match=r"unknown UNet option\(s\) \['patch_size'\]"):
        build_generator("unet-tiny", text_dim=4, input_size=16, patch_size=2)
    with pytest.raises(TypeError, match=r"unknown UNet option\(s\) \['depth'\]"):
        build_generator("unet-tiny", text_dim=4, input_size=16, depth=3)
    with pytest.raises(ValueError, match="must be divisible by 4"):
        UNet(input_size=10, channel_mult=(1, 2, 2))
    with pytest.raises(ValueError, match="head_dim 12 must divide"):
        small_unet(head_dim=12)
    model = small_unet()
    z, ctx, mask = inputs()
    with pytest.raises(ValueError, match="expects x of shape"):
        model(torch.randn(2, 3, 16, 16), torch.zeros(2), torch.ones(2), ctx, mask)
    with pytest.raises(ValueError, match="context must be"):
        model(z, torch.zeros(2), torch.ones(2), torch.randn(2, 5, 7), mask)
