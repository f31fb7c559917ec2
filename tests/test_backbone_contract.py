"""The contract every backbone meets (models.layers.Backbone), checked on each: DiT, U-Net, SANA adapter.

forward(x, r, t, context, mask) -> u of x's shape; masked text tokens change nothing; the JVP along (v, 0, 1)
equals a float64 central difference; bad shapes are clear errors; the recorded constructor arguments rebuild
the same architecture.
"""

from __future__ import annotations

import pytest
import torch

from emf_lightning.models import DiT, UNet
from emf_lightning.models.layers import Backbone
from emf_lightning.utils.specs import build, to_spec

from helpers import assert_backbone_jvp_matches_finite_differences, assert_padded_text_tokens_do_not_change_output
from test_models import perturb_zero_init


def _dit() -> Backbone:
    return DiT(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=2, num_heads=4, context_dim=12)


def _unet() -> Backbone:
    return UNet(
        input_size=8,
        base_channels=8,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(2,),
        head_dim=8,
        context_dim=12,
    )


def _sana() -> Backbone:
    pytest.importorskip("diffusers")
    from emf_lightning.models.diffusers_adapter import SanaMeanFlowBackbone

    return SanaMeanFlowBackbone.from_config("tiny", interval_init="random")


BACKBONES = {"dit": _dit, "unet": _unet, "sana": _sana}
ZERO_AT_INIT = {"dit", "unet"}  # adaLN-Zero / zero-initialised branch ends; a pretrained model is not zero


def make(kind: str, dtype: torch.dtype = torch.float32) -> Backbone:
    torch.manual_seed(0)
    model = BACKBONES[kind]()
    if kind in ZERO_AT_INIT:
        perturb_zero_init(model)
    return model.to(dtype)


def inputs(model: Backbone, b: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(b, model.in_channels, *model.input_size, generator=g)
    ctx = torch.randn(b, 5, model.context_dim, generator=g)
    mask = torch.tensor([[True, True, True, False, False], [True] * 5])
    return z, ctx, mask


@pytest.mark.parametrize("kind", sorted(BACKBONES))
def test_output_has_the_input_shape_and_zero_init_backbones_start_at_zero(kind):
    torch.manual_seed(0)
    model = BACKBONES[kind]()
    z, ctx, mask = inputs(model)
    u = model(z, torch.tensor([0.1, 0.2]), torch.tensor([0.5, 0.9]), ctx, mask)
    assert u.shape == z.shape
    if kind in ZERO_AT_INIT:
        assert torch.count_nonzero(u) == 0
    else:
        assert u.abs().max() > 0


@pytest.mark.parametrize("kind", ["dit", "unet"])
def test_the_interval_enters_as_t_minus_r(kind):
    """With the t embedding silenced, u depends on (r, t) only through t - r: two pairs with the same interval
    give the same output, and a different interval a different one (an embedder fed r would fail both)."""
    model = make(kind)
    with torch.no_grad():
        for p in model.t_embedder.parameters():
            p.zero_()
    z, ctx, mask = inputs(model)
    with torch.no_grad():
        u = model(z, torch.tensor([0.125, 0.25]), torch.tensor([0.5, 0.625]), ctx, mask)
        same_interval = model(z, torch.tensor([0.5, 0.5]), torch.tensor([0.875, 0.875]), ctx, mask)
        other_interval = model(z, torch.tensor([0.25, 0.5]), torch.tensor([0.5, 0.625]), ctx, mask)
    torch.testing.assert_close(same_interval, u)
    assert (other_interval - u).abs().max() > 1e-4


@pytest.mark.parametrize("kind", sorted(BACKBONES))
def test_padded_text_tokens_do_not_change_output(kind):
    model = make(kind)
    assert_padded_text_tokens_do_not_change_output(model, *inputs(model))


@pytest.mark.parametrize("kind", sorted(BACKBONES))
def test_jvp_matches_finite_differences(kind):
    model = make(kind, torch.float64)
    assert_backbone_jvp_matches_finite_differences(model, *inputs(model))


@pytest.mark.parametrize("kind", sorted(BACKBONES))
def test_bad_shapes_are_clear_errors(kind):
    model = make(kind)
    z, ctx, mask = inputs(model)
    c, (h, w) = model.in_channels, model.input_size
    with pytest.raises(ValueError, match=rf"expects x of shape \[B, {c}, {h}, {w}\]"):
        model(torch.randn(2, c, 2 * h, 2 * w), torch.zeros(2), torch.ones(2), ctx, mask)
    with pytest.raises(ValueError, match="r and t must have shape"):
        model(z, torch.zeros(3), torch.ones(2), ctx, mask)
    with pytest.raises(ValueError, match="context must be"):
        model(z, torch.zeros(2), torch.ones(2), torch.randn(2, 5, model.context_dim + 1), mask)


@pytest.mark.parametrize("kind", sorted(BACKBONES))
def test_recorded_arguments_rebuild_the_same_architecture(kind):
    torch.manual_seed(0)
    model = BACKBONES[kind]()
    spec = to_spec(model)
    assert "unrecorded" not in spec
    torch.manual_seed(0)
    rebuilt = build(spec, Backbone)
    assert type(rebuilt) is type(model) and to_spec(rebuilt) == spec
    for (name, a), (_, b) in zip(model.state_dict().items(), rebuilt.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
