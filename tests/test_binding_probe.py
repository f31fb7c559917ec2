"""tools/binding_probe.py: a shape-keyed attention read recovers each object's colour from features that bind them
(the scene oracle) and not from features without word order (bag of words); reads and the scene split are exact."""

from __future__ import annotations

import numpy as np
import torch

from emf_lightning.encoders import build_encoder
from emf_lightning.shapes import paraphrases
from emf_lightning.shapes.scene import sample_scene

from helpers import load_tool

probe = load_tool("binding_probe")


def colour_attribution_table(n_scenes: int, wordings: int = 2, seed: int = 0) -> dict:
    """caption -> spec, paraphrases of one scene sharing its spec object (as scene_oracle.caption_table makes it)."""
    rng = np.random.default_rng(seed)
    table = {}
    for _ in range(n_scenes):
        spec = sample_scene(rng, "color_attr")
        for caption in paraphrases(spec, wordings, rng):
            table.setdefault(caption, spec)
    return table


def test_each_read_names_one_object_by_shape_with_its_colour_and_the_others():
    table = colour_attribution_table(20)
    reads = probe.binding_reads(table)
    assert reads
    for caption, shape, colour, other in reads:
        objects = {(o["shape"], o["color"]) for o in table[caption]["objects"]}
        assert (probe.ALL_SHAPES[shape], probe.COLOR_NAMES[colour]) in objects
        assert colour != other and probe.COLOR_NAMES[other] in {o["color"] for o in table[caption]["objects"]}
    distinct = [
        c for c, s in table.items() if len({o["shape"] for o in s["objects"]} | {o["color"] for o in s["objects"]}) == 4
    ]
    assert len(reads) == 2 * len(distinct)


def test_the_split_keeps_every_paraphrase_of_a_scene_on_one_side():
    table = colour_attribution_table(50, wordings=3)
    fit, test = probe.split_by_scene(table, test_share=0.2)
    assert set(fit) | set(test) == set(table) and not set(fit) & set(test)
    assert not {id(s) for s in fit.values()} & {id(s) for s in test.values()}
    assert len({id(s) for s in test.values()}) == 10


def test_the_oracle_binds_and_a_bag_of_words_cannot():
    table = colour_attribution_table(250)
    fit_table, test_table = probe.split_by_scene(table)
    fit, test = probe.binding_reads(fit_table), probe.binding_reads(test_table)
    oracle = probe.probe_encoder(probe.encoder_for("oracle", table, None), fit, test, epochs=20)
    bow = probe.probe_encoder(build_encoder("bow").encode, fit, test, epochs=20)
    assert oracle["attend"] > 0.95
    # without word order the two colours can only be told apart by the colour-shape priors of the fitting scenes
    assert bow["attend"] < oracle["attend"] - 0.15, (oracle, bow)


def test_reading_through_a_checkpoint_gives_its_ema_connectors_tokens(tmp_path):
    from emf_lightning.data.datamodule import ShardDataModule

    from helpers import quiet_trainer, tiny_module, write_shapes_shards

    urls = write_shapes_shards(tmp_path / "shards", n_train=8, n_val=4)
    module = tiny_module(text_refiner_layers=1)
    trainer = quiet_trainer(max_steps=1, limit_val_batches=0)
    trainer.fit(
        module, datamodule=ShardDataModule(train_shards=urls["train"], batch_size=4, num_workers=0, image_size=16)
    )
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    captions = ["a red circle and a blue square", "two stars"]
    got = probe.through_connector(str(tmp_path / "last.ckpt"), None)(captions)
    feats = module.encode_text(captions)
    with torch.no_grad():
        want = module.ema_generator.connector(feats.tokens, feats.mask) * feats.mask[..., None]
    torch.testing.assert_close(got.tokens, want)
    assert torch.equal(got.mask, feats.mask)
