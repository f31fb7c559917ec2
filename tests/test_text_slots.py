"""The connector's slot tokens (``model.text_slots``): learned tokens that read the whole caption and follow its
tokens into the backbone's cross-attention, so one object's attributes can arrive as one token (issue 21)."""

from __future__ import annotations

import json

import pytest
import torch

from emf_lightning.checkpoint_config import is_structural
from emf_lightning.meanflow.conditions import null_condition
from emf_lightning.models.connector import CONNECTOR_OPTIONS, SAMPLING_CONNECTOR_OPTIONS, SlotBlock, TextConnector
from emf_lightning.models.generator import Generator, build_backbone

from helpers import BOW, TINY_DIT, redraw_connector_blocks, tiny_module

CAPTIONS = ["a red circle and a blue square", "a blue circle and a red square", "two green stars"]


def test_without_slots_the_context_is_the_per_token_map_and_its_mask():
    torch.manual_seed(0)
    connector = TextConnector(8, 32)
    x, mask = torch.randn(2, 5, 8), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    context, context_mask = connector.context(x, mask)
    torch.testing.assert_close(context, connector(x, mask))
    assert context_mask is mask and connector.slots == 0
    assert not any(k.startswith("slot") for k in connector.state_dict())


def test_slots_follow_the_tokens_with_the_mask_extended_and_start_caption_independent():
    torch.manual_seed(0)
    connector = TextConnector(8, 32, slots=3)
    x, mask = torch.randn(2, 5, 8), torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    context, context_mask = connector.context(x, mask)
    assert context.shape == (2, 8, 32) and connector.slots == 3
    torch.testing.assert_close(context[:, :5], connector(x, mask))  # the caption's tokens come first, unchanged
    assert torch.equal(context_mask, torch.cat([mask, torch.ones(2, 3, dtype=torch.bool)], dim=1))
    # zero-initialised ends: new slots are their learned starting vectors, the same for every caption
    torch.testing.assert_close(context[0, 5:], context[1, 5:])
    # unit RMS like the caption's tokens, so neither kind dominates the backbone's attention by scale
    torch.testing.assert_close(context[:, 5:].pow(2).mean(-1), torch.ones(2, 3), atol=1e-3, rtol=1e-3)
    # without a mask every token is real, and the mask stays None
    unmasked, none = connector.context(x)
    assert none is None and unmasked.shape == (2, 8, 32)


def test_trained_slots_read_the_caption_and_padding_never_reaches_them():
    torch.manual_seed(0)
    connector = redraw_connector_blocks(TextConnector(8, 32, slots=2))
    x = torch.randn(2, 6, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0]], dtype=torch.bool)
    x[1] = 0.0  # a null row inside a padded batch: zeros, position 0 attended
    context, _ = connector.context(x, mask)
    edited = x.clone()
    edited[0, 0] = torch.randn(8)  # "red" -> "blue" in the first caption
    assert not torch.allclose(connector.context(edited, mask)[0][0, 6:], context[0, 6:], atol=1e-3)
    junk = x.clone()
    junk[~mask] = torch.randn(int((~mask).sum()), 8) * 100
    torch.testing.assert_close(connector.context(junk, mask)[0][:, 6:], context[:, 6:])
    null_tokens, null_mask = null_condition(1, 8)
    torch.testing.assert_close(context[1, 6:], connector.context(null_tokens, null_mask)[0][0, 1:])
    assert torch.isfinite(context).all()


def test_the_generator_feeds_the_slots_to_the_backbone():
    torch.manual_seed(0)
    backbone = build_backbone("unet-tiny", 16, 3, base_channels=16, head_dim=16, context_dim=32)
    gen = Generator.for_backbone(backbone, 8, text_slots=2)
    redraw_connector_blocks(gen.connector)
    with torch.no_grad():  # zero-initialised output heads would hide every input
        for p in gen.backbone.parameters():
            if p.abs().max() == 0:
                p.normal_(0, 0.05)
    z, r, t = torch.randn(1, 3, 16, 16), torch.tensor([0.2]), torch.tensor([0.9])
    x, mask = torch.randn(1, 4, 8), torch.ones(1, 4, dtype=torch.bool)
    out = gen(z, r, t, x, mask)
    with torch.no_grad():
        gen.connector.slot_queries.add_(torch.randn_like(gen.connector.slot_queries))
    assert not torch.allclose(gen(z, r, t, x, mask), out, atol=1e-5)


def test_connector_options_are_checked_and_named_as_the_model_config_names_them():
    with pytest.raises(ValueError, match="slots must be >= 0"):
        TextConnector(8, 32, slots=-1)
    with pytest.raises(TypeError, match="text_slot"):
        Generator.for_backbone(build_backbone("unet-tiny", 16, 3), 8, text_slot=2)
    # Every option that shapes the weights refuses a change on a checkpoint; the sampling-only ones may change.
    assert all(is_structural(key) for key in CONNECTOR_OPTIONS if key not in SAMPLING_CONNECTOR_OPTIONS)
    assert not any(is_structural(key) for key in SAMPLING_CONNECTOR_OPTIONS)


def test_a_caption_longer_than_the_slots_position_table_is_refused_with_the_limit():
    block = SlotBlock(32, max_tokens=4)
    block(torch.randn(1, 2, 32), torch.randn(1, 4, 32), None)
    with pytest.raises(ValueError, match="at most 4 text tokens, got 5"):
        block(torch.randn(1, 2, 32), torch.randn(1, 5, 32), None)


def test_the_dry_run_counts_the_connector_options():
    from emf_lightning.dry_run import dry_run

    def parameters(**model_options):
        model = {"encoder": json.loads(BOW), "backbone": json.loads(TINY_DIT), **model_options}
        return dry_run({"model": model, "data": {"batch_size": 2, "image_size": 16}}).total_parameters

    plain = parameters()
    built = tiny_module(encoder=json.loads(BOW), backbone=json.loads(TINY_DIT), text_slots=2, text_refiner_layers=1)
    assert parameters(text_slots=2, text_refiner_layers=1) == sum(p.numel() for p in built.generator.parameters())
    assert parameters(text_slots=2) > plain
