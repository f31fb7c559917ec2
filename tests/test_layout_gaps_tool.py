"""tools/layout_gaps.py: a layout model's one-step images judged at several spacings, as ``EMFModule.generate``
samples them, and binned by the smallest gap of the planner's own layout."""

from __future__ import annotations

import pytest
import torch

from emf_lightning.data.datamodule import ShardDataModule
from emf_lightning.models.layout import smallest_gaps
from emf_lightning.shapes.judge import ShapesEval

from helpers import load_tool, tiny_module, tiny_unet, write_shapes_shards

tool = load_tool("layout_gaps")


def test_gaps_fall_in_their_bins_and_rows_with_one_place_have_none():
    assert [tool.gap_bin(g) for g in (0.0, 0.1, 0.29, 0.45, 0.8)] == ["<0.1", "0.1-0.2", "0.2-0.3", "0.4-0.5", ">=0.5"]
    places = torch.tensor([[[0.1, 0.1], [0.4, 0.5], [0.9, 0.9]], [[0.5, 0.5], [0.1, 0.1], [0.2, 0.2]]])
    present = torch.tensor([[True, True, True], [True, False, False]])
    assert smallest_gaps(places, present) == [pytest.approx(0.5), None]


def test_each_spacing_is_judged_on_the_images_generate_gives_at_that_spacing(tmp_path, monkeypatch):
    judged = []

    class RecordingJudge(ShapesEval):
        def evaluate_detailed(self, images, specs):
            judged.append(images.clone())
            return super().evaluate_detailed(images, specs)

    monkeypatch.setattr(tool, "ShapesEval", RecordingJudge)
    torch.manual_seed(0)
    urls = write_shapes_shards(tmp_path / "shards", n_train=4, n_val=24, per_shard=24)
    module = tiny_module(backbone=tiny_unet(), text_slots=4, object_supervision=0.5, slot_layout=True).eval()
    connector = module.ema_generator.connector
    with torch.no_grad():  # every slot names an object, so every scene gets four places to spread
        connector.slot_namer.classify.bias.copy_(
            torch.cat([torch.cat([torch.zeros(n - 1), torch.tensor([-9.0])]) for n in connector.slot_namer.sizes])
        )
        # past the zero-initialised ends, so the painted places reach the image
        for weight in (module.ema_generator.layout_in.weight, module.ema_generator.backbone.out_conv.weight):
            torch.nn.init.normal_(weight, std=0.5)
    result = tool.layout_gaps(module, urls["val"], [0.0, 0.45], batch_size=64)
    assert connector.spacing == 0.0  # put back as it was

    dm = ShardDataModule(val_shards=urls["val"], batch_size=64, num_workers=0, image_size=32)
    dm.setup("validate")
    (batch,) = list(dm.val_dataloader())
    assert not torch.equal(judged[0], judged[1])  # the spacing moved the objects
    for spacing, images in zip((0.0, 0.45), judged):
        connector.spacing = spacing
        generated = module.generate(batch["caption"], steps=1, seed=0)
        assert torch.equal(images, generated)
        want = ShapesEval().evaluate(generated, batch["meta"])
        row = result["spacings"][f"{spacing:g}"]
        assert row["scenes"] == 24
        assert {c: row[c] for c in want} == pytest.approx(want)
    connector.spacing = 0.0
    # every scene had four places: each is binned once, by the planner's own smallest gap
    assert sum(n for bins in result["by_gap"].values() for _, n in bins.values()) == 24


def test_a_model_without_a_layout_is_refused(tmp_path):
    urls = write_shapes_shards(tmp_path / "shards", n_train=4, n_val=4)
    with pytest.raises(SystemExit, match="no slot layout"):
        tool.layout_gaps(tiny_module(text_slots=2, object_supervision=0.5), urls["val"], [0.0])
