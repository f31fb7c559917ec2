"""tools/slot_names.py: how well a trained generator's slots name held-out captions' objects, per category; the
per-category table adds up to the set loss's own accuracy over the whole batch."""

from __future__ import annotations

import pytest
import torch

from emf_lightning.data.datamodule import ShardDataModule
from emf_lightning.training.object_supervision import object_set_loss

from helpers import load_tool, tiny_module, tiny_unet, write_shapes_shards

tool = load_tool("slot_names")


@pytest.mark.parametrize("named", [False, True])
def test_the_categories_add_up_to_the_set_loss_over_the_whole_split(tmp_path, named):
    torch.manual_seed(0)
    urls = write_shapes_shards(tmp_path / "shards", n_train=4, n_val=24, per_shard=24)
    module = tiny_module(text_slots=4, object_supervision=0.5, named_slots=named).eval()
    table = tool.slot_names(module, urls["val"], batch_size=64)

    dm = ShardDataModule(val_shards=urls["val"], batch_size=64, num_workers=0, image_size=32)
    dm.setup("validate")
    (batch,) = list(dm.val_dataloader())
    feats = module.batch_text_features(batch)
    connector = module.ema_generator.connector
    if named:
        names = connector.name(connector.read(feats.tokens, feats.mask)[2])
    else:
        names = module.slot_object_head(connector.context(feats.tokens, feats.mask)[0][:, -4:])
    _, stats, _ = object_set_loss(*names, batch["meta"])
    objects = sum(len(m["objects"]) for m in batch["meta"])
    assert table["all"]["objects"] == objects
    for measure in tool.MEASURES:
        assert table["all"][measure] == pytest.approx(float(stats[measure]), abs=1e-5)
    categories = {m["category"] for m in batch["meta"]}
    assert set(table) == categories | {"all"}
    assert sum(table[c]["objects"] for c in categories) == objects


def test_a_layout_model_s_planned_layouts_are_judged_per_category(tmp_path):
    torch.manual_seed(0)
    urls = write_shapes_shards(tmp_path / "shards", n_train=4, n_val=24, per_shard=24)
    module = tiny_module(backbone=tiny_unet(), text_slots=4, object_supervision=0.5, slot_layout=True).eval()
    table = tool.slot_names(module, urls["val"], batch_size=64)
    assert 0.0 <= table["all"]["layout_count"] <= 1.0
    assert "layout_relation" in table["position"] and "layout_relation" not in table["colors"]


def test_a_model_without_object_supervision_is_refused(tmp_path):
    urls = write_shapes_shards(tmp_path / "shards", n_train=4, n_val=4)
    with pytest.raises(SystemExit, match="not trained with model.object_supervision"):
        tool.slot_names(tiny_module(text_slots=2), urls["val"])


def logits_naming(*objects):
    """Logits [1, K, n + 1] per attribute that name ``objects`` (None: nothing) with certainty."""
    from emf_lightning.training.object_supervision import ATTRIBUTES

    out = []
    for a, (_, vocab) in enumerate(ATTRIBUTES):
        t = torch.full((1, len(objects), len(vocab) + 1), -20.0)
        for k, obj in enumerate(objects):
            t[0, k, vocab.index(obj[a]) if obj else len(vocab)] = 20.0
        out.append(t)
    return out


def test_misnamings_name_the_object_and_what_its_matched_slot_said():
    meta = [
        {
            "objects": [
                {"color": "red", "shape": "triangle", "size": "small", "x": 0.2, "y": 0.5},
                {"color": "blue", "shape": "circle", "size": "large", "x": 0.8, "y": 0.5},
            ]
        }
    ]
    place = torch.tensor([[[0.8, 0.5], [0.5, 0.5], [0.2, 0.5]]])
    logits = logits_naming(("blue", "circle", "large"), None, ("red", "square", "small"))
    assert tool.misnamings(logits, place, meta) == {"red triangle small -> red square small": 1}
    right = logits_naming(("blue", "circle", "large"), None, ("red", "triangle", "small"))
    assert tool.misnamings(right, place, meta) == {}


def test_a_planned_layout_is_judged_through_the_slots_matched_to_the_relation_s_objects():
    """Slot 0 names the scene's second object, slot 2 its first; "the red triangle left of the blue circle" holds
    when slot 2 is placed left of slot 0, whatever the slot order."""
    meta = [
        {
            "objects": [
                {"color": "red", "shape": "triangle", "size": "small", "x": 0.2, "y": 0.5},
                {"color": "blue", "shape": "circle", "size": "large", "x": 0.8, "y": 0.5},
            ],
            "relations": [{"a": 0, "rel": "left of", "b": 1}],
        }
    ]
    logits = logits_naming(("blue", "circle", "large"), None, ("red", "triangle", "small"))
    place = torch.tensor([[[0.8, 0.5], [0.5, 0.5], [0.2, 0.5]]])
    present = torch.tensor([[True, False, True]])

    def judge(planned, present=present):
        return {
            k: v[0] for k, v in tool.layout_judgements(logits, place, torch.tensor([planned]), present, meta).items()
        }

    assert judge([[0.7, 0.4], [0.5, 0.5], [0.3, 0.6]]) == {
        "layout_count": 1.0,
        "layout_apart": 1.0,
        "layout_relation": 1.0,
    }
    assert judge([[0.3, 0.4], [0.5, 0.5], [0.7, 0.6]])["layout_relation"] == 0.0  # mirrored
    assert judge([[0.5, 0.2], [0.5, 0.5], [0.4, 0.8]])["layout_relation"] == 0.0  # below, not left of
    assert judge([[0.5, 0.5], [0.5, 0.5], [0.4, 0.5]])["layout_apart"] == 0.0  # 0.1 apart: overlapping
    three = judge([[0.7, 0.4], [0.1, 0.1], [0.3, 0.6]], present=torch.ones(1, 3, dtype=torch.bool))
    assert three["layout_count"] == 0.0
    # the connector's relation reading (model.slot_relations) is judged on the same matched pair: slot 2 to slot 0
    reading = torch.zeros(1, 3, 3, 5)
    reading[0, 2, 0, 0] = 5.0  # "left of"
    planned = torch.tensor([[[0.7, 0.4], [0.5, 0.5], [0.3, 0.6]]])
    judged = tool.layout_judgements(logits, place, planned, present, meta, reading)
    assert judged["layout_relation_read"] == [1.0]
    reading[0, 2, 0, 1] = 9.0  # now it reads "right of"
    assert tool.layout_judgements(logits, place, planned, present, meta, reading)["layout_relation_read"] == [0.0]
