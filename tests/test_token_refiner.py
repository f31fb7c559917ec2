"""The connector's token refiner (``model.text_refiner_layers``): self-attention among a caption's tokens after the
per-token map, so the tokens the backbone reads can carry which attribute belongs to which object (issue 21); and
the training, checkpoint and export round trip of both kinds of connector block (refiner and slots)."""

from __future__ import annotations

import json

import pytest
import torch

from emf_lightning.checkpoint_config import is_structural
from emf_lightning.data.datamodule import ShardDataModule
from emf_lightning.inference import MeanFlowGenerator
from emf_lightning.meanflow.conditions import null_condition
from emf_lightning.models.connector import TextConnector
from emf_lightning.training import EMFModule

from helpers import quiet_trainer, redraw_connector_blocks, tiny_module, write_shapes_shards

CAPTIONS = ["a red circle and a blue square", "a blue circle and a red square", "two green stars"]


def test_a_new_refiner_is_the_identity_so_training_starts_from_the_per_token_connector():
    torch.manual_seed(0)
    refined = TextConnector(16, 64, refiner_layers=2)
    plain = TextConnector(16, 64)
    plain.load_state_dict({k: v for k, v in refined.state_dict().items() if k.startswith(("fc", "norm"))})
    x = torch.randn(3, 5, 16)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    # only the final RMSNorm (unit weight) stands between them, and the per-token output already has unit RMS
    torch.testing.assert_close(refined(x, mask), plain(x), atol=1e-4, rtol=1e-4)
    assert refined.refiner_layers == 2 and plain.refiner_layers == 0
    assert not any(k.startswith("refiner") for k in plain.state_dict())


def test_the_refiner_mixes_tokens_and_the_per_token_map_does_not():
    torch.manual_seed(0)
    refined = redraw_connector_blocks(TextConnector(8, 64, refiner_layers=1))
    plain = TextConnector(8, 64)
    x = torch.randn(1, 4, 8)
    edited = x.clone()
    edited[0, 0] = torch.randn(8)  # change the first token only ("red" -> "blue")
    # the last token ("square") now tells the two captions apart: the binding a per-token map cannot see
    assert not torch.allclose(refined(x)[0, 3], refined(edited)[0, 3], atol=1e-3)
    torch.testing.assert_close(plain(x)[0, 3], plain(edited)[0, 3])


def test_padding_never_reaches_real_tokens_and_a_null_row_matches_the_null_condition():
    torch.manual_seed(0)
    connector = redraw_connector_blocks(TextConnector(8, 64, refiner_layers=2), seed=1)
    x = torch.randn(2, 6, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0]], dtype=torch.bool)
    x[1] = 0.0  # a null row inside a padded batch: zeros, position 0 attended
    out = connector(x, mask)
    junk = x.clone()
    junk[~mask] = torch.randn(int((~mask).sum()), 8) * 100
    torch.testing.assert_close(connector(junk, mask)[mask], out[mask])
    null_tokens, null_mask = null_condition(1, 8)
    torch.testing.assert_close(out[1, :1], connector(null_tokens, null_mask)[0])
    assert torch.isfinite(out).all()


def test_refiner_layers_must_not_be_negative():
    with pytest.raises(ValueError, match="refiner_layers"):
        TextConnector(8, 64, refiner_layers=-1)


def test_text_refiner_layers_is_an_architecture_key_under_a_checkpoint():
    assert is_structural("text_refiner_layers")


@pytest.mark.parametrize(
    ("option", "value", "blocks", "count"),
    [("text_refiner_layers", 1, "refiner", "refiner_layers"), ("text_slots", 2, "slot_blocks", "slots")],
)
def test_connector_blocks_train_and_survive_checkpoint_and_export(tmp_path, option, value, blocks, count):
    from emf_lightning.commands.export import export

    urls = write_shapes_shards(tmp_path / "shards", n_train=8, n_val=4)
    module = tiny_module(**{option: value})
    before = [p.detach().clone() for p in getattr(module.generator.connector, blocks).parameters()]
    dm = ShardDataModule(train_shards=urls["train"], batch_size=4, num_workers=0, image_size=16, epoch_length=8)
    trainer = quiet_trainer(max_steps=3, limit_val_batches=0)
    trainer.fit(module, datamodule=dm)
    after = list(getattr(module.generator.connector, blocks).parameters())
    assert any(not torch.equal(a, b) for a, b in zip(after, before))  # the new blocks are trained
    ckpt = tmp_path / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    want = module.generate(CAPTIONS, steps=1, seed=3)

    reloaded = EMFModule.load_from_checkpoint(ckpt)
    assert getattr(reloaded.ema_generator.connector, count) == value
    assert torch.equal(reloaded.generate(CAPTIONS, steps=1, seed=3), want)
    out = export(reloaded, tmp_path / "export", global_step=3)
    assert json.loads((out / "config.json").read_text())[option] == value
    exported = MeanFlowGenerator.from_pretrained(out)
    assert getattr(exported.generator.connector, count) == value
    assert torch.equal(exported.generate(CAPTIONS, steps=1, seed=3), want)


def test_a_caption_longer_than_the_position_table_is_refused_with_the_limit():
    from emf_lightning.models.connector import TokenRefinerBlock

    block = TokenRefinerBlock(64, max_tokens=4)
    block(torch.randn(1, 4, 64), None)
    with pytest.raises(ValueError, match="at most 4 text tokens, got 5"):
        block(torch.randn(1, 5, 64), None)
