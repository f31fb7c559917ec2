"""``model.slot_layout``: the connector plans where each slot's object stands (a small flow over the slots' places)
and the U-Net is shown each object's name painted at its place (``models.layout``; issue 21, position)."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from emf_lightning.checkpoint_config import is_structural
from emf_lightning.data.datamodule import ShardDataModule
from emf_lightning.encoders.base import TextFeatures
from emf_lightning.errors import ConfigError
from emf_lightning.inference import MeanFlowGenerator, sampling_conditions
from emf_lightning.models.connector import TextConnector
from emf_lightning.models.generator import Generator
from emf_lightning.models.layout import (
    RELATIONS,
    LayoutPlanner,
    ObjectCount,
    SlotRelations,
    most_object_like,
    paint_layout,
)
from emf_lightning.training import EMFModule
from emf_lightning.training.object_supervision import (
    ATTRIBUTES,
    NOT_JUDGED,
    count_loss,
    matched_layout,
    relation_loss,
    stated_relation_features,
)

from helpers import quiet_trainer, tiny_backbone, tiny_module, tiny_unet, write_shapes_shards

NONE = len(RELATIONS)


def layout_module(**overrides):
    return tiny_module(backbone=tiny_unet(), text_slots=4, object_supervision=0.5, slot_layout=True, **overrides)


def test_the_map_is_each_present_slot_s_content_as_a_gaussian_at_its_place():
    places = torch.tensor([[[0.25, 0.75], [0.9, 0.1], [0.5, 0.5]]])
    present = torch.tensor([[True, True, False]])
    content = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [5.0, 5.0]]])
    painted = paint_layout(places, present, content, (8, 8), sigma=0.1)
    assert painted.shape == (1, 2, 8, 8)

    def blob(x, y, px, py):  # pixel (row py, column px) has its centre at ((px + 0.5) / 8, (py + 0.5) / 8)
        d2 = ((px + 0.5) / 8 - x) ** 2 + ((py + 0.5) / 8 - y) ** 2
        return math.exp(-d2 / (2 * 0.1**2))

    for py, px in [(5, 1), (0, 7), (3, 3)]:
        assert painted[0, 0, py, px].item() == pytest.approx(blob(0.25, 0.75, px, py), rel=1e-5)
        assert painted[0, 1, py, px].item() == pytest.approx(2 * blob(0.9, 0.1, px, py), rel=1e-5)
    # the first slot's blob peaks at its place (x = 0.25 -> column 1 or 2 of 8, y = 0.75 -> row 5 or 6)
    row, col = divmod(int(painted[0, 0].argmax()), 8)
    assert row in (5, 6) and col in (1, 2)


def test_the_planner_learns_a_relation_and_samples_places_rather_than_their_mean():
    """Two slots; the first slot's vector says whether its object stands left (+1) or right (-1) of the other's.
    The true layouts put the pair anywhere along x: a regression of each place would put both near the centre
    (and the pair's x spread near 0); the planner must sample layouts that keep the relation and vary."""
    torch.manual_seed(0)
    planner = LayoutPlanner(slot_dim=4, width=32, layers=2, heads=2)
    opt = torch.optim.Adam(planner.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)

    def batch(n):
        sign = torch.randint(0, 2, (n,), generator=gen).float() * 2 - 1  # +1: first slot left of the second
        left = torch.rand(n, generator=gen) * 0.4 + 0.05
        gap = torch.rand(n, generator=gen) * 0.4 + 0.1
        x_first = torch.where(sign > 0, left, left + gap)
        x_second = torch.where(sign > 0, left + gap, left)
        y = torch.rand(n, 1, generator=gen) * 0.8 + 0.1
        places = torch.stack([torch.stack([x_first, x_second], 1), y.expand(n, 2)], -1)
        slots = torch.zeros(n, 2, 4)
        slots[:, 0, 0], slots[:, 1, 1] = sign, 1.0
        return places, slots, sign

    present = torch.ones(256, 2, dtype=torch.bool)
    for _ in range(400):
        places, slots, _ = batch(256)
        loss = planner.loss(places, present, slots, gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
    _, slots, sign = batch(400)
    drawn = planner.sample(slots, torch.ones(400, 2, dtype=torch.bool), torch.Generator().manual_seed(1))
    kept = ((drawn[:, 0, 0] < drawn[:, 1, 0]) == (sign > 0)).float().mean().item()
    assert kept > 0.9, kept
    assert drawn[:, 0, 0].std().item() > 0.1  # layouts vary: not the regression's one place per relation
    assert drawn.min() >= 0.0 and drawn.max() <= 1.0
    again = planner.sample(slots, torch.ones(400, 2, dtype=torch.bool), torch.Generator().manual_seed(1))
    assert torch.equal(drawn, again)


def test_absent_slots_are_neither_learned_nor_read_and_sample_at_the_centre():
    torch.manual_seed(0)
    planner = LayoutPlanner(slot_dim=4, width=16, layers=1, heads=2)
    places, slots = torch.rand(3, 3, 2), torch.randn(3, 3, 4)
    present = torch.tensor([[True, False, True], [True, True, False], [False, True, True]])
    moved_places, moved_slots = places.clone(), slots.clone()
    moved_places[~present], moved_slots[~present] = 0.9, 7.0
    loss = planner.loss(places, present, slots, torch.Generator().manual_seed(2))
    moved = planner.loss(moved_places, present, moved_slots, torch.Generator().manual_seed(2))
    torch.testing.assert_close(loss, moved)
    drawn = planner.sample(slots, present, torch.Generator().manual_seed(0))
    assert torch.equal(drawn[~present], torch.full_like(drawn[~present], 0.5))
    nothing = planner.loss(places, torch.zeros(3, 3, dtype=torch.bool), slots)
    nothing.backward()
    assert nothing.item() == 0.0


def test_a_layout_generator_reads_the_map_through_a_zero_initialised_convolution():
    torch.manual_seed(0)
    gen = Generator(TextConnector(6, 32, slots=2, layout=True), tiny_unet()).eval()
    z, r, t = torch.randn(2, 3, 16, 16), torch.zeros(2), torch.ones(2)
    tokens, mask = torch.randn(2, 5, 6), torch.ones(2, 5, dtype=torch.bool)
    torch.nn.init.normal_(gen.backbone.out_conv.weight, std=0.1)
    places = torch.tensor([[[0.2, 0.5], [0.8, 0.5]]]).expand(2, -1, -1)
    present = torch.ones(2, 2, dtype=torch.bool)
    plain = gen(z, r, t, tokens, mask)
    assert torch.equal(plain, gen(z, r, t, tokens, mask, *gen.empty_layout(2)))
    assert torch.equal(plain, gen(z, r, t, tokens, mask, places, present))  # zero-initialised: not read yet
    torch.nn.init.normal_(gen.layout_in.weight, std=0.1)
    first = gen(z, r, t, tokens, mask, places, present)
    assert not torch.allclose(first, plain)
    assert not torch.allclose(first, gen(z, r, t, tokens, mask, places.flip(1), present))
    assert torch.equal(plain, gen(z, r, t, tokens, mask, places, torch.zeros_like(present)))


def test_the_layout_needs_a_u_net_object_supervision_and_slots():
    with pytest.raises(ValueError, match="takes no input features"):
        Generator(TextConnector(6, 32, slots=2, layout=True), tiny_backbone(context_dim=32))
    with pytest.raises(ValueError, match="set slots to at least 1"):
        TextConnector(6, 32, layout=True)
    with pytest.raises(ConfigError, match="model.slot_layout places the objects"):
        tiny_module(backbone=tiny_unet(), text_slots=4, slot_layout=True)
    with pytest.raises(ValueError, match="without a slot layout"):
        plain = Generator(TextConnector(6, 32), tiny_unet())
        plain(torch.randn(1, 3, 16, 16), torch.zeros(1), torch.ones(1), torch.randn(1, 2, 6), None, torch.rand(1, 1, 2))
    assert is_structural("slot_layout")
    with pytest.raises(ValueError, match="set layout=True"):
        TextConnector(6, 32, slots=2, relations=True)
    with pytest.raises(ConfigError, match="set model.slot_layout: true as well"):
        tiny_module(backbone=tiny_unet(), text_slots=4, object_supervision=0.5, slot_relations=True)
    assert is_structural("slot_relations")
    with pytest.raises(ValueError, match="counts decide how many"):
        TextConnector(6, 32, slots=2, counts=True)
    with pytest.raises(ConfigError, match="model.slot_count decides how many"):
        tiny_module(backbone=tiny_unet(), text_slots=4, object_supervision=0.5, slot_count=True)
    assert is_structural("slot_count")
    with pytest.raises(ConfigError, match="model.relation_teacher_forcing trains the layout planner"):
        layout_module(relation_teacher_forcing=True)
    assert not is_structural("relation_teacher_forcing")


def _shapes_data(tmp_path):
    urls = write_shapes_shards(tmp_path / "shards", n_train=8, n_val=4)
    dm = ShardDataModule(train_shards=urls["train"], batch_size=4, num_workers=0, image_size=16, epoch_length=8)
    dm.setup("fit")
    return dm, next(iter(dm.train_dataloader()))


def test_training_shows_the_true_places_of_the_matched_objects_and_teaches_the_planner(tmp_path):
    _, batch = _shapes_data(tmp_path)
    module = layout_module()
    assert module.slot_object_head is None  # the connector's namer is taught
    feats = module.batch_text_features(batch)
    logits, place = module.name_slots(module.generator.connector, feats.tokens, feats.mask)
    places, present, _, _, counts = matched_layout(logits, place, batch["meta"])
    assert counts.tolist() == [len(meta["objects"]) for meta in batch["meta"]]
    for row, meta in enumerate(batch["meta"]):  # every object of each scene is shown at its own place
        shown = sorted(places[row][present[row]].tolist())
        want = torch.tensor(sorted([o["x"], o["y"]] for o in meta["objects"]))
        torch.testing.assert_close(torch.tensor(shown), want)
    torch.nn.init.normal_(module.generator.backbone.out_conv.weight, std=0.1)  # let gradients past the zero init
    loss, stats = module.compute_loss(batch, module.generator, module._step_generator("train/0", 0), train=True)
    assert stats["layout_flow"] > 0
    loss.backward()
    connector = module.generator.connector
    for part in (connector.layout_planner, connector.slot_namer, module.generator.layout_in):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())


@pytest.mark.parametrize(
    "relations, counts, pointer, spacing",
    [(False, False, False, 0.0), (True, False, False, 0.0), (True, True, True, 0.45)],
)
def test_a_layout_model_samples_by_seed_and_survives_checkpoint_and_export(
    tmp_path, relations, counts, pointer, spacing
):
    from emf_lightning.commands.export import export

    dm, _ = _shapes_data(tmp_path)
    module = layout_module(slot_relations=relations, slot_count=counts, slot_pointer=pointer, layout_spacing=spacing)
    trainer = quiet_trainer(max_steps=3, limit_val_batches=0)
    trainer.fit(module, datamodule=dm)
    ckpt = tmp_path / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    captions = ["a red circle to the left of a blue square", "two green triangles"]
    want = module.generate(captions, steps=1, seed=3)
    assert torch.equal(module.generate(captions, steps=1, seed=3), want)
    reloaded = EMFModule.load_from_checkpoint(ckpt)
    assert reloaded.ema_generator.connector.layout
    assert reloaded.ema_generator.connector.relations == relations
    assert reloaded.ema_generator.connector.counts == counts
    assert reloaded.ema_generator.connector.pointer == pointer
    assert reloaded.ema_generator.connector.spacing == spacing
    assert torch.equal(reloaded.generate(captions, steps=1, seed=3), want)
    exported = MeanFlowGenerator.from_pretrained(export(reloaded, tmp_path / "export", global_step=3))
    assert exported.generator.connector.spacing == spacing
    assert torch.equal(exported.generate(captions, steps=1, seed=3), want)
    if spacing:  # a sampling-time key: the checkpoint is judged at another spacing as it stands
        respaced = EMFModule.load_from_checkpoint(ckpt, layout_spacing=0.2)
        assert respaced.ema_generator.connector.spacing == 0.2


def test_per_row_seeds_plan_each_row_as_it_would_be_planned_alone():
    torch.manual_seed(0)
    net = Generator(TextConnector(6, 32, slots=3, layout=True), tiny_unet()).eval()
    with torch.no_grad():  # every slot names an object, so every slot is placed
        net.connector.slot_namer.classify.bias.copy_(
            torch.cat([torch.cat([torch.zeros(n - 1), torch.tensor([-9.0])]) for n in net.connector.slot_namer.sizes])
        )
    tokens, mask = torch.randn(3, 4, 6), torch.ones(3, 4, dtype=torch.bool)
    feats = TextFeatures(tokens=tokens, mask=mask, pooled=tokens.mean(1))
    cond, null = sampling_conditions(net, feats, 6, 2.0, [5, 6, 7], "cpu")
    assert len(cond) == 4 and cond[3].all() and len(null) == 4 and not null[3].any()
    for i, seed in enumerate([5, 6, 7]):
        alone, _ = sampling_conditions(
            net, TextFeatures(tokens[i : i + 1], mask[i : i + 1], tokens[i : i + 1, 0]), 6, 1.0, [seed], "cpu"
        )
        torch.testing.assert_close(cond[2][i : i + 1], alone[2])
    batch_seed, _ = sampling_conditions(net, feats, 6, 1.0, 5, "cpu")
    other_seed, _ = sampling_conditions(net, feats, 6, 1.0, 6, "cpu")
    assert not torch.equal(batch_seed[2], other_seed[2])


def _naming_logits(slot_names: list[list[dict | None]]) -> list[torch.Tensor]:
    """Logits per attribute [B, K, n + 1] under which each slot names the given object (None: "no object")."""
    b, k = len(slot_names), len(slot_names[0])
    logits = [torch.zeros(b, k, len(vocab) + 1) for _, vocab in ATTRIBUTES]
    for i, row in enumerate(slot_names):
        for j, obj in enumerate(row):
            for a, (name, vocab) in enumerate(ATTRIBUTES):
                logits[a][i, j, vocab.index(obj[name]) if obj else len(vocab)] = 10.0
    return logits


def test_relation_targets_are_the_stated_relation_both_ways_and_none_between_other_matched_objects():
    red = {"color": "red", "shape": "circle", "size": "large", "x": 0.2, "y": 0.5}
    blue = {"color": "blue", "shape": "square", "size": "small", "x": 0.8, "y": 0.5}
    metas = [
        {"objects": [red, blue], "relations": [{"a": 0, "rel": "left of", "b": 1}]},
        {"objects": [red, blue]},  # two objects, no relation stated
        {"objects": [red, blue], "relations": [{"a": 0, "rel": "near", "b": 1}]},  # unknown: not judged
        None,  # no objects: nothing present, nothing judged
    ]
    # slot 2 names the red circle, slot 0 the blue square, slot 1 nothing
    logits = _naming_logits([[blue, None, red]] * 4)
    layout = matched_layout(logits, torch.full((4, 3, 2), 0.5), metas)
    left, right = RELATIONS.index("left of"), RELATIONS.index("right of")
    want = torch.full((3, 3), NOT_JUDGED)
    want[2, 0], want[0, 2] = left, right  # the red circle (slot 2) is left of the blue square (slot 0)
    assert torch.equal(layout.relations[0], want)
    assert layout.counts.tolist() == [2, 2, 2, NOT_JUDGED]
    want[2, 0] = want[0, 2] = NONE
    assert torch.equal(layout.relations[1], want)
    assert (layout.relations[2:] == NOT_JUDGED).all()
    assert layout.skipped == {"unusable relations in meta": 1}
    torch.testing.assert_close(layout.places[0], torch.tensor([[0.8, 0.5], [0.5, 0.5], [0.2, 0.5]]))
    assert layout.present[:3].tolist() == [[True, False, True]] * 3 and not layout.present[3].any()


def test_the_relation_loss_is_the_cross_entropy_of_the_judged_pairs():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 3, NONE + 1, requires_grad=True)
    targets = torch.full((2, 3, 3), NOT_JUDGED)
    targets[0, 0, 1], targets[0, 1, 0], targets[1, 2, 0], targets[1, 0, 2] = 0, 1, NONE, NONE
    loss, accuracy = relation_loss(logits, targets)
    picked = torch.stack([logits[0, 0, 1], logits[0, 1, 0], logits[1, 0, 2], logits[1, 2, 0]])
    manual = -(picked.log_softmax(-1)[torch.arange(4), torch.tensor([0, 1, NONE, NONE])]).mean()
    torch.testing.assert_close(loss, manual)
    right = (logits[0, 0, 1].argmax() == 0).float() + (logits[0, 1, 0].argmax() == 1).float()
    torch.testing.assert_close(accuracy, right / 2)  # accuracy on the stated relations only
    _, none_stated = relation_loss(logits, torch.where(targets < NONE, NOT_JUDGED, targets))
    assert none_stated is None
    nothing, _ = relation_loss(logits, torch.full_like(targets, NOT_JUDGED))
    nothing.backward()
    assert nothing.item() == 0.0


def test_each_slot_reads_its_relation_probabilities_to_the_other_present_slots_summed():
    relations = SlotRelations(slot_dim=4, hidden=8)
    chances = torch.tensor([0.1, 0.2, 0.3, 0.15, 0.25])  # left of, right of, above, below, none
    with torch.no_grad():  # every pair reads these probabilities
        relations.mlp[2].weight.zero_()
        relations.mlp[2].bias.copy_(chances.log())
    present = torch.tensor([[True, True, False], [True, True, True]])
    features = relations.features(torch.randn(2, 3, 4), present)
    others = torch.tensor([[1.0, 1.0, 0.0], [2.0, 2.0, 2.0]])  # present slots besides itself; absent: nothing
    torch.testing.assert_close(features, others[..., None] * chances[:4])


def test_a_planner_given_the_relations_learns_to_keep_them():
    """As the planner's relation test, but the slots are all alike: only the relation features say which slot's
    object stands left."""
    torch.manual_seed(0)
    planner = LayoutPlanner(slot_dim=4, width=32, layers=2, heads=2, relation_channels=NONE)
    opt = torch.optim.Adam(planner.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    present = torch.ones(256, 2, dtype=torch.bool)

    def batch(n):
        first_left = torch.rand(n, generator=gen) < 0.5
        left = torch.rand(n, generator=gen) * 0.4 + 0.05
        right = left + torch.rand(n, generator=gen) * 0.4 + 0.1
        x = torch.stack([torch.where(first_left, left, right), torch.where(first_left, right, left)], 1)
        places = torch.stack([x, torch.full((n, 2), 0.5)], -1)
        rel = torch.zeros(n, 2, NONE)
        rel[first_left, 0, 0] = rel[first_left, 1, 1] = 1.0  # first left of second, second right of first
        rel[~first_left, 0, 1] = rel[~first_left, 1, 0] = 1.0
        return places, rel, first_left

    slots = torch.ones(256, 2, 4)
    for _ in range(300):
        places, rel, _ = batch(256)
        loss = planner.loss(places, present, slots, gen, relations=rel)
        opt.zero_grad()
        loss.backward()
        opt.step()
    _, rel, first_left = batch(256)
    drawn = planner.sample(slots, present, torch.Generator().manual_seed(1), relations=rel)
    kept = ((drawn[:, 0, 0] < drawn[:, 1, 0]) == first_left).float().mean().item()
    assert kept > 0.9, kept
    with pytest.raises(ValueError, match="pass relations exactly"):
        planner.sample(slots, present)
    with pytest.raises(ValueError, match="pass relations exactly"):
        LayoutPlanner(slot_dim=4, width=32, heads=2).sample(slots, present, relations=rel)


def test_the_relation_loss_reaches_the_slots_and_the_planner_reads_the_relations(tmp_path):
    _, batch = _shapes_data(tmp_path)
    module = layout_module(slot_relations=True)
    connector = module.generator.connector
    assert connector.relations and connector.layout_planner.relation_in is not None
    feats = module.batch_text_features(batch)
    logits, place, slots = module.read_slot_names(connector, feats.tokens, feats.mask)
    layout = matched_layout(logits, place, batch["meta"])
    two = [i for i, m in enumerate(batch["meta"]) if len(m["objects"]) >= 2]
    assert two, "the test data needs a scene of two objects"
    layout.relations[two[0]][layout.relations[two[0]] == NONE] = 0  # as if it stated a relation
    layout = layout._replace(skipped=Counter({"unusable relations in meta": 1}))
    stats = {}
    loss = module.layout_loss(connector, slots, layout, module._step_generator("train/0", 0), stats)
    assert {"layout_flow", "layout_relations", "layout_relations_accuracy"} <= set(stats)
    assert module.objects_skipped == {"unusable relations in meta": 1}
    plain = layout_module()  # without relations, rows are not left out of anything: nothing counted
    plain_slots = plain.read_slot_names(plain.generator.connector, feats.tokens, feats.mask)[2]
    plain.layout_loss(plain.generator.connector, plain_slots, layout, plain._step_generator("train/0", 0), {})
    assert not plain.objects_skipped
    loss.backward()
    for part in (connector.slot_relations, connector.layout_planner.relation_in, connector.slot_blocks):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())
    # the planner reads the relations without passing gradient to the slots through them
    present = torch.ones(1, 4, dtype=torch.bool)
    probe = slots[:1].detach().requires_grad_(True)
    assert not connector.relation_features(probe, present).requires_grad


def test_the_count_loss_is_the_cross_entropy_of_the_judged_rows():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, requires_grad=True)
    counts = torch.tensor([2, NOT_JUDGED, 4])
    loss, accuracy = count_loss(logits, counts)
    manual = -(logits[0].log_softmax(-1)[2] + logits[2].log_softmax(-1)[4]) / 2
    torch.testing.assert_close(loss, manual)
    right = (logits[0].argmax() == 2).float() + (logits[2].argmax() == 4).float()
    torch.testing.assert_close(accuracy, right / 2)
    nothing, none = count_loss(logits, torch.full_like(counts, NOT_JUDGED))
    nothing.backward()
    assert nothing.item() == 0.0 and none is None


def test_the_count_places_the_slots_least_likely_to_name_nothing():
    nothing = torch.tensor([[0.9, 0.2, 0.6, 0.1], [0.3, 0.3, 0.8, 0.05], [0.5, 0.5, 0.5, 0.5]])
    present = most_object_like(nothing, torch.tensor([2, 1, 3]))
    assert present.tolist() == [
        [False, True, False, True],
        [False, False, False, True],
        [True, True, True, False],  # ties go to the earlier slot
    ]
    assert not most_object_like(nothing, torch.zeros(3, dtype=torch.long)).any()


def test_the_count_is_read_from_the_caption_s_pooled_tokens_not_its_padding():
    torch.manual_seed(0)
    head = ObjectCount(text_dim=6, slots=4, hidden=8)
    tokens, mask = torch.randn(2, 5, 6), torch.tensor([[True] * 3 + [False] * 2, [True] * 5])
    padded = tokens.clone()
    padded[0, 3:] = 100.0  # padding is not read
    torch.testing.assert_close(head(padded, mask), head(tokens, mask))
    torch.testing.assert_close(head(tokens, mask)[:1], head(tokens[:1, :3]))
    assert head(tokens, mask).shape == (2, 5)


def test_with_counts_the_layout_places_as_many_slots_as_the_caption_states():
    """Every slot names an object, so without counts all four are placed; the count head says two: the two
    slots least likely to name nothing are placed, and the count's loss reaches only its head."""
    torch.manual_seed(0)
    connector = TextConnector(6, 32, slots=4, layout=True, counts=True)
    with torch.no_grad():
        connector.slot_namer.classify.bias.copy_(
            torch.cat([torch.cat([torch.zeros(n - 1), torch.tensor([-9.0])]) for n in connector.slot_namer.sizes])
        )
        connector.object_count.mlp[-1].weight.zero_()
        connector.object_count.mlp[-1].bias.copy_(torch.tensor([0.0, 0.0, 5.0, 0.0, 0.0]))
    tokens, mask = torch.randn(3, 5, 6), torch.ones(3, 5, dtype=torch.bool)
    _, _, reading = connector.read(tokens, mask)
    places, present = connector.plan_layout(reading, torch.Generator().manual_seed(0), tokens, mask)
    assert present.sum(1).tolist() == [2, 2, 2]
    nothing = torch.stack([p[..., -1] for p in connector.slot_namer.probabilities(reading.slots)], -1).mean(-1)
    torch.testing.assert_close(present, most_object_like(nothing, torch.full((3,), 2)))
    assert connector.objects_present(reading).all()  # the per-slot rule would place all four
    with pytest.raises(ValueError, match="pass tokens"):
        connector.plan_layout(reading)
    with pytest.raises(ValueError, match="without counts=True"):
        TextConnector(6, 32, slots=4, layout=True).count_objects(tokens, mask)


def test_the_count_loss_trains_the_count_head_on_the_scenes_object_counts(tmp_path):
    _, batch = _shapes_data(tmp_path)
    module = layout_module(slot_count=True)
    connector = module.generator.connector
    torch.nn.init.normal_(module.generator.backbone.out_conv.weight, std=0.1)
    loss, stats = module.compute_loss(batch, module.generator, module._step_generator("train/0", 0), train=True)
    feats = module.batch_text_features(batch)
    want = torch.tensor([len(meta["objects"]) for meta in batch["meta"]])
    manual, _ = count_loss(connector.count_objects(feats.tokens, feats.mask), want)
    torch.testing.assert_close(stats["layout_count"], manual.detach())
    assert "layout_count_accuracy" in stats
    connector.zero_grad()
    (stats["layout_count"] * 0 + manual).backward()
    assert all(p.grad is not None for p in connector.object_count.parameters())
    assert all(p.grad is None for name, p in connector.named_parameters() if not name.startswith("object_count."))


def test_the_stated_relation_features_are_what_a_perfect_classifier_would_be_read_as():
    left, right, above, below = (RELATIONS.index(r) for r in ("left of", "right of", "above", "below"))
    relations = torch.full((2, 3, 3), NOT_JUDGED)
    relations[0, 0, 1], relations[0, 1, 0] = left, right  # slot 0 left of slot 1
    relations[0, 2, 0], relations[0, 0, 2] = above, below  # slot 2 above slot 0
    relations[1, 0, 1] = relations[1, 1, 0] = NONE  # two objects, none stated
    present = torch.tensor([[True, True, True], [True, True, False]])
    want = torch.zeros(2, 3, NONE)
    want[0, 0, left] = want[0, 0, below] = want[0, 1, right] = want[0, 2, above] = 1.0
    torch.testing.assert_close(stated_relation_features(relations, present), want)
    # a classifier whose logits say exactly the stated relations is read the same way
    classifier = SlotRelations(slot_dim=4, hidden=8)
    logits = torch.full((2, 3, 3, NONE + 1), -30.0)
    judged = relations != NOT_JUDGED
    logits[judged] = logits[judged].scatter(-1, relations[judged][:, None], 30.0)
    logits[~judged] = logits[~judged].index_fill(-1, torch.tensor([NONE]), 30.0)
    classifier.forward = lambda slots: logits
    torch.testing.assert_close(classifier.features(torch.zeros(2, 3, 4), present), want)
    # an absent slot neither reads nor is read
    absent = present.clone()
    absent[0, 1] = False
    assert stated_relation_features(relations, absent)[0, :, left].sum() == 0


def test_with_teacher_forcing_the_planner_learns_from_the_stated_relations(tmp_path):
    _, batch = _shapes_data(tmp_path)
    module = layout_module(slot_relations=True, relation_teacher_forcing=True)
    connector = module.generator.connector
    feats = module.batch_text_features(batch)
    logits, place, slots = module.read_slot_names(connector, feats.tokens, feats.mask)
    layout = matched_layout(logits, place, batch["meta"])
    seen = []
    original = connector.layout_planner.loss
    connector.layout_planner.loss = lambda *a, relations=None, **k: (
        seen.append(relations) or original(*a, relations=relations, **k)
    )
    module.layout_loss(connector, slots, layout, module._step_generator("train/0", 0), {})
    torch.testing.assert_close(seen[0], stated_relation_features(layout.relations, layout.present))
