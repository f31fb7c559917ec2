"""``model.object_supervision``: the slot tokens trained to name the objects of each caption's scene (a set loss,
slots matched to objects by least cost), through a training-only namer outside the generator or, with
``model.named_slots``, the connector's own namer whose names the backbone reads instead of the slots (issue 21)."""

from __future__ import annotations

import itertools

import pytest
import torch

from emf_lightning.checkpoint_config import is_structural
from emf_lightning.data.datamodule import ShardDataModule
from emf_lightning.errors import ConfigError
from emf_lightning.inference import MeanFlowGenerator
from emf_lightning.models.connector import TextConnector
from emf_lightning.models.slot_namer import SlotNamer
from emf_lightning.training import EMFModule
from emf_lightning.training.object_supervision import ATTRIBUTES, match_slots, object_set_loss, object_targets

from helpers import quiet_trainer, redraw_connector_blocks, tiny_module, write_shapes_shards

RED_CIRCLE = {"color": "red", "shape": "circle", "size": "small", "x": 0.25, "y": 0.5}
BLUE_SQUARE = {"color": "blue", "shape": "square", "size": "large", "x": 0.75, "y": 0.5}


def index(obj):
    return [vocab.index(obj[name]) for name, vocab in ATTRIBUTES]


def test_targets_pad_each_scene_and_count_what_they_leave_out():
    metas = [
        {"objects": [RED_CIRCLE, BLUE_SQUARE]},
        None,
        {"objects": [RED_CIRCLE] * 3},  # more objects than slots
        {"objects": [{**RED_CIRCLE, "color": "ultraviolet"}]},
        {"category": "colors"},
    ]
    targets, skipped = object_targets(metas, max_objects=2)
    assert targets.rows.tolist() == [True, False, False, False, False]
    assert targets.valid[0].tolist() == [True, True] and not targets.valid[1:].any()
    assert targets.classes[0].tolist() == [index(RED_CIRCLE), index(BLUE_SQUARE)]
    torch.testing.assert_close(targets.place[0], torch.tensor([[0.25, 0.5], [0.75, 0.5]]))
    assert skipped == {"no objects in meta": 2, "more than 2 objects": 1, "object outside the vocabulary": 1}


def test_the_matching_is_the_assignment_of_least_total_cost():
    torch.manual_seed(0)
    cost = torch.rand(3, 4, 3)
    valid = torch.tensor([[True, True, True], [True, False, True], [False, True, False]])
    for row, (slots, objects) in zip(range(3), match_slots(cost, valid)):
        real = valid[row].nonzero().flatten().tolist()
        best = min(
            sum(cost[row, s, o].item() for s, o in zip(perm, real))
            for perm in itertools.permutations(range(4), len(real))
        )
        assert sorted(objects.tolist()) == real and len(set(slots.tolist())) == len(real)
        assert sum(cost[row, s, o].item() for s, o in zip(slots, objects)) == pytest.approx(best)


def _slots_naming(head: SlotNamer, objects: list[dict | None]) -> torch.Tensor:
    """Slot vectors that make ``head`` name exactly ``objects`` (None: no object): the head's class weights set
    to pick one input channel per (attribute, value), and the place read from two more channels."""
    sizes, width = head.sizes, sum(head.sizes) + 2
    assert head.classify.in_features == width
    with torch.no_grad():
        head.classify.weight.copy_(torch.eye(sum(sizes), width) * 20)
        head.classify.bias.zero_()
        head.place.weight.zero_()
        head.place.weight[0, -2] = head.place.weight[1, -1] = 1.0
        head.place.bias.zero_()
    slots = torch.zeros(1, len(objects), width)
    for k, obj in enumerate(objects):
        wanted = index(obj) if obj else [n - 1 for n in sizes]
        for offset, v in zip(itertools.accumulate([0, *sizes[:-1]]), wanted):
            slots[0, k, offset + v] = 1.0
        if obj:
            slots[0, k, -2:] = torch.logit(torch.tensor([obj["x"], obj["y"]]))
    return slots


def test_a_slot_per_object_in_any_order_scores_best_and_a_swapped_binding_costs():
    head = SlotNamer(sum(len(v) + 1 for _, v in ATTRIBUTES) + 2)

    def loss(slots, meta):
        return object_set_loss(*head(slots), meta)[:2]

    meta = [{"objects": [RED_CIRCLE, BLUE_SQUARE]}]
    right, stats = loss(_slots_naming(head, [BLUE_SQUARE, None, RED_CIRCLE]), meta)
    assert stats["objects_accuracy"] == 1.0 and right.item() < 1e-3  # slot order is free
    swapped = [{**RED_CIRCLE, "color": "blue"}, {**BLUE_SQUARE, "color": "red"}]
    wrong, stats = loss(_slots_naming(head, [swapped[0], swapped[1], None]), meta)
    assert stats["objects_accuracy"] == 0.0 and wrong.item() > 10.0
    missing, _ = loss(_slots_naming(head, [RED_CIRCLE, None, None]), meta)
    assert missing.item() > 10.0  # an object no slot names costs as well


def test_rows_without_objects_give_a_zero_loss_that_still_backpropagates():
    head = SlotNamer(8)
    slots = torch.randn(2, 3, 8, requires_grad=True)
    value, stats, skipped = object_set_loss(*head(slots), [None, {"category": "colors"}])
    value.backward()
    assert value.item() == 0.0 and stats["objects_rows"] == 0 and slots.grad is not None
    assert skipped == {"no objects in meta": 2}


def test_object_supervision_needs_slots_and_a_non_negative_weight():
    with pytest.raises(ConfigError, match="model.text_slots"):
        tiny_module(object_supervision=0.5)
    with pytest.raises(ConfigError, match="object_supervision must be >= 0"):
        tiny_module(object_supervision=-1.0, text_slots=4)
    assert tiny_module(text_slots=2).slot_object_head is None
    assert is_structural("object_supervision")


def _shapes_data(tmp_path) -> tuple[ShardDataModule, dict]:
    """A datamodule over tiny shapes-world shards (their .json has the objects) and its first training batch."""
    urls = write_shapes_shards(tmp_path / "shards", n_train=8, n_val=4)
    dm = ShardDataModule(train_shards=urls["train"], batch_size=4, num_workers=0, image_size=16, epoch_length=8)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert any(m and m.get("objects") for m in batch["meta"])
    return dm, batch


def test_the_term_is_added_to_the_loss_and_trains_the_slots_through_the_generator(tmp_path):
    _, batch = _shapes_data(tmp_path)

    plain, supervised = tiny_module(text_slots=4), tiny_module(text_slots=4, object_supervision=0.5)
    supervised.generator.load_state_dict(plain.generator.state_dict())
    gen = lambda: plain._step_generator("train/0", 0)  # noqa: E731 - the same draws for both
    base, _ = plain.compute_loss(batch, plain.generator, gen(), train=True)
    total, stats = supervised.compute_loss(batch, supervised.generator, gen(), train=True)
    cond = supervised.batch_text_features(batch)
    names = supervised.name_slots(supervised.generator.connector, cond.tokens, cond.mask)
    objects, _ = supervised.object_loss(*names, batch["meta"])
    torch.testing.assert_close(total, base + 0.5 * objects)
    assert {"objects_naming", "objects_placing", "objects_accuracy"} <= stats.keys()
    total.backward()
    slot_grads = [p.grad for p in supervised.generator.connector.slot_blocks.parameters()]
    assert any(g is not None and g.abs().sum() > 0 for g in slot_grads)
    assert all(p.grad is not None for p in supervised.slot_object_head.parameters())
    # evaluation judges the generator alone: no object term outside training
    val, val_stats = supervised.compute_loss(batch, supervised.generator, gen(), train=False)
    assert "objects_naming" not in val_stats


def test_the_head_trains_and_survives_a_checkpoint_but_stays_out_of_the_generator(tmp_path):
    urls = write_shapes_shards(tmp_path / "shards", n_train=8, n_val=4)
    module = tiny_module(text_slots=4, object_supervision=1.0)
    before = [p.detach().clone() for p in module.slot_object_head.parameters()]
    dm = ShardDataModule(train_shards=urls["train"], batch_size=4, num_workers=0, image_size=16, epoch_length=8)
    trainer = quiet_trainer(max_steps=3, limit_val_batches=0)
    trainer.fit(module, datamodule=dm)
    assert all(not torch.equal(a, b) for a, b in zip(module.slot_object_head.parameters(), before))
    assert not any("slot_object_head" in k for k in module.generator.state_dict())
    ckpt = tmp_path / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    reloaded = EMFModule.load_from_checkpoint(ckpt)
    for a, b in zip(reloaded.slot_object_head.parameters(), module.slot_object_head.parameters()):
        assert torch.equal(a, b)


def test_named_slots_give_the_backbone_each_slot_s_name_and_nothing_else():
    torch.manual_seed(0)
    connector = redraw_connector_blocks(TextConnector(8, 32, slots=3, named_slots=True))
    x, mask = torch.randn(2, 5, 8), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    context, context_mask = connector.context(x, mask)
    assert context.shape == (2, 8, 32) and context_mask.shape == (2, 8) and connector.named_slots
    torch.testing.assert_close(context[:, :5], connector(x, mask))  # the caption's tokens are untouched
    # the slot tokens are the names (class probabilities, then place) mapped to the width and normalised
    logits, place = connector.name(connector.read(x, mask)[2])
    names = torch.cat([*(t.softmax(-1) for t in logits), place], -1)
    torch.testing.assert_close(context[:, 5:], connector.slot_norm(connector.slot_name_embed(names)))
    assert not torch.allclose(context[0, 5:], context[1, 5:], atol=1e-3)  # the captions' names differ
    # a bottleneck: whatever else the slots hold, a namer that names every slot alike gives the same tokens
    with torch.no_grad():
        for p in connector.slot_namer.parameters():
            p.zero_()
    blind, _ = connector.context(x, mask)
    torch.testing.assert_close(blind[:, 5:], blind[:1, 5:6].expand(2, 3, 32))


def test_named_slots_are_checked_and_a_structural_key():
    with pytest.raises(ValueError, match="named_slots names the slot tokens"):
        TextConnector(8, 32, named_slots=True)
    assert not TextConnector(8, 32, slots=2).has_namer  # free slots: the module's training-only head names them
    with pytest.raises(ConfigError, match="model.object_supervision > 0"):
        tiny_module(text_slots=4, named_slots=True)
    assert is_structural("named_slots")


def test_named_slots_are_taught_through_the_connector_and_survive_checkpoint_and_export(tmp_path):
    from emf_lightning.commands.export import export

    dm, batch = _shapes_data(tmp_path)
    module = tiny_module(text_slots=4, object_supervision=0.5, named_slots=True)
    assert module.slot_object_head is None  # the connector's namer is the one taught
    cond = module.batch_text_features(batch)
    names = module.name_slots(module.generator.connector, cond.tokens, cond.mask)
    objects, stats = module.object_loss(*names, batch["meta"])
    objects.backward()
    namer = module.generator.connector.slot_namer
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in namer.parameters())
    assert stats["objects_rows"] > 0

    trainer = quiet_trainer(max_steps=3, limit_val_batches=0)
    before = [p.detach().clone() for p in namer.parameters()]
    trainer.fit(module, datamodule=dm)
    assert all(not torch.equal(a, b) for a, b in zip(namer.parameters(), before))
    ckpt = tmp_path / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    captions = ["a red circle and a blue square", "two green stars"]
    want = module.generate(captions, steps=1, seed=3)
    reloaded = EMFModule.load_from_checkpoint(ckpt)
    assert reloaded.ema_generator.connector.named_slots
    assert torch.equal(reloaded.generate(captions, steps=1, seed=3), want)
    exported = MeanFlowGenerator.from_pretrained(export(reloaded, tmp_path / "export", global_step=3))
    assert exported.generator.connector.named_slots
    assert torch.equal(exported.generate(captions, steps=1, seed=3), want)
