"""``model.layout_spacing``: each sampled layout spread so that every two placed objects stand at least the spacing
apart, inside the image (``models.layout.spread_places``; issue 21, counting: objects planned too close are drawn
as one blob)."""

from __future__ import annotations

import pytest
import torch

from emf_lightning.checkpoint_config import is_structural
from emf_lightning.errors import ConfigError
from emf_lightning.models.connector import TextConnector
from emf_lightning.models.layout import spread_places

from helpers import tiny_module, tiny_unet


def _gaps(places: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Per row, the smallest distance between two present places."""
    out = []
    for row, keep in zip(places, present):
        p = row[keep]
        out.append((torch.cdist(p, p) + torch.eye(len(p)) * 9.0).min())
    return torch.stack(out)


def test_two_close_places_part_along_their_line_each_by_half_the_lack():
    places = torch.tensor([[[0.5, 0.45], [0.5, 0.55]]])
    present = torch.ones(1, 2, dtype=torch.bool)
    # 0.1 apart, 0.3 wanted: each moves 0.1 away from the other, straight up and down.
    torch.testing.assert_close(spread_places(places, present, 0.3), torch.tensor([[[0.5, 0.35], [0.5, 0.65]]]))
    diagonal = torch.tensor([[[0.45, 0.45], [0.55, 0.55]]])
    spread = spread_places(diagonal, present, 0.3)
    step = (0.3 - 0.1 * 2**0.5) / 2 / 2**0.5  # half the lack, on each axis of the diagonal
    torch.testing.assert_close(spread, torch.tensor([[[0.45 - step, 0.45 - step], [0.55 + step, 0.55 + step]]]))


def test_a_layout_already_spaced_absent_slots_and_spacing_zero_are_left_as_they_are():
    spaced = torch.tensor([[[0.05, 0.5], [0.9, 0.5], [0.5, 0.5]]])  # the first is nearer the edge than 0.15
    present = torch.tensor([[True, True, False]])  # the absent one sits between them
    assert torch.equal(spread_places(spaced, present, 0.3), spaced)
    crowded = torch.tensor([[[0.5, 0.5], [0.52, 0.5], [0.51, 0.5]]])
    assert torch.equal(spread_places(crowded, present, 0.0), crowded)
    moved = spread_places(crowded, present, 0.3)
    assert torch.equal(moved[0, 2], crowded[0, 2]) and not torch.equal(moved[0, :2], crowded[0, :2])


def test_crowded_layouts_end_spaced_inside_the_image_and_two_objects_keep_their_relation():
    torch.manual_seed(0)
    b, k, spacing = 256, 4, 0.45
    places = 0.3 + 0.4 * torch.rand(b, k, 2)  # crowded in the middle of the image
    places[:8] = 0.5  # all at one point: they have no line to part along
    present = torch.arange(k)[None, :] < torch.randint(2, k + 1, (b, 1))  # two to four objects
    spread = spread_places(places, present, spacing)
    assert (_gaps(spread, present) >= spacing - 1e-3).all()
    inside = spread[present]
    assert (inside >= spacing / 2 - 1e-6).all() and (inside <= 1 - spacing / 2 + 1e-6).all()
    two = present.sum(1) == 2
    before, after = places[two, 0] - places[two, 1], spread[two, 0] - spread[two, 1]
    kept = before.abs() > 1e-6
    assert (torch.sign(before) == torch.sign(after))[kept].all()  # left stays left, above stays above


def test_a_row_is_spread_as_it_would_be_alone():
    row = torch.tensor([[[0.1, 0.5], [0.9, 0.5]]])  # spaced, but nearer the edges than spacing / 2
    crowded = torch.tensor([[[0.5, 0.5], [0.55, 0.5]]])
    present = torch.ones(2, 2, dtype=torch.bool)
    together = spread_places(torch.cat([row, crowded]), present, 0.45)
    assert torch.equal(together[:1], row)
    torch.testing.assert_close(together[1:], spread_places(crowded, present[1:], 0.45))


def test_spacing_is_checked_needs_a_layout_and_only_changes_sampling():
    with pytest.raises(ValueError, match=r"fraction of the image side in \[0, 1\)"):
        spread_places(torch.rand(1, 2, 2), torch.ones(1, 2, dtype=torch.bool), 1.0)
    with pytest.raises(ValueError, match="set layout=True"):
        TextConnector(6, 32, slots=2, spacing=0.3)
    with pytest.raises(ConfigError, match="model.layout_spacing spreads the places"):
        tiny_module(backbone=tiny_unet(), text_slots=4, object_supervision=0.5, layout_spacing=0.3)
    with pytest.raises(ConfigError, match="model.layout_spacing is a fraction"):
        tiny_module(backbone=tiny_unet(), text_slots=4, object_supervision=0.5, slot_layout=True, layout_spacing=-0.1)
    assert not is_structural("layout_spacing")


def test_the_connector_spreads_the_layout_it_plans():
    torch.manual_seed(0)
    connector = TextConnector(6, 32, slots=3, layout=True, spacing=0.45).eval()
    with torch.no_grad():  # every slot names an object, so every slot is placed
        connector.slot_namer.classify.bias.copy_(
            torch.cat([torch.cat([torch.zeros(n - 1), torch.tensor([-9.0])]) for n in connector.slot_namer.sizes])
        )
        # A planner that has learnt nothing but to stay put: every slot sampled near the centre.
        for p in connector.layout_planner.parameters():
            p.zero_()
    tokens = torch.randn(5, 4, 6)
    _, _, reading = connector.read(tokens, None)
    places, present = connector.plan_layout(reading, torch.Generator().manual_seed(0))
    assert present.all() and (_gaps(places, present) >= 0.45 - 1e-3).all()
    connector.spacing = 0.0
    close, _ = connector.plan_layout(reading, torch.Generator().manual_seed(0))
    assert (_gaps(close, present) < 0.45).any()
