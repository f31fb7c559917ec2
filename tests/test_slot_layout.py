"""``model.slot_layout``: the connector plans where each slot's object stands (a small flow over the slots' places)
and the U-Net is shown each object's name painted at its place (``models.layout``; issue 21, position)."""

from __future__ import annotations

import math

import pytest
import torch

from emf_lightning.checkpoint_config import is_structural
from emf_lightning.data.datamodule import ShardDataModule
from emf_lightning.encoders.base import TextFeatures
from emf_lightning.errors import ConfigError
from emf_lightning.inference import MeanFlowGenerator, sampling_conditions
from emf_lightning.models.connector import TextConnector
from emf_lightning.models.generator import Generator
from emf_lightning.models.layout import LayoutPlanner, paint_layout
from emf_lightning.training import EMFModule
from emf_lightning.training.object_supervision import matched_places

from helpers import quiet_trainer, tiny_backbone, tiny_module, tiny_unet, write_shapes_shards


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
    places, present = matched_places(logits, place, batch["meta"])
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


def test_a_layout_model_samples_by_seed_and_survives_checkpoint_and_export(tmp_path):
    from emf_lightning.commands.export import export

    dm, _ = _shapes_data(tmp_path)
    module = layout_module()
    trainer = quiet_trainer(max_steps=3, limit_val_batches=0)
    trainer.fit(module, datamodule=dm)
    ckpt = tmp_path / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    captions = ["a red circle to the left of a blue square", "two green triangles"]
    want = module.generate(captions, steps=1, seed=3)
    assert torch.equal(module.generate(captions, steps=1, seed=3), want)
    reloaded = EMFModule.load_from_checkpoint(ckpt)
    assert reloaded.ema_generator.connector.layout
    assert torch.equal(reloaded.generate(captions, steps=1, seed=3), want)
    exported = MeanFlowGenerator.from_pretrained(export(reloaded, tmp_path / "export", global_step=3))
    assert torch.equal(exported.generate(captions, steps=1, seed=3), want)


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
