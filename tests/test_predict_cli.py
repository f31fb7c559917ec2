"""`emf predict`: ShardDataModule's predict pass (ordered, finite, every caption once) through the CLI.

The predict data is one ordered pass over `data.predict_shards` (default: the validation shards);
`EMFModule.predict_step` samples each caption and `predict_writer.SamplePNGWriter` saves the PNGs.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from emf_lightning import cli
from emf_lightning.data.datamodule import ShardDataModule
from emf_lightning.shapes import ShapesWorld
from emf_lightning.training import EMFModule
from emf_lightning.utils.images import to_uint8

from helpers import write_shapes_shards

BOW = {"class_path": "emf_lightning.encoders.BagOfWordsEncoder", "init_args": {"dim": 16}}
WRITER = "emf_lightning.predict_writer.SamplePNGWriter"


@pytest.fixture(scope="module")
def partial_shards(tmp_path_factory) -> dict[str, str]:
    # 5 validation samples in shards of 2: the last shard and the last batch are partial.
    return write_shapes_shards(tmp_path_factory.mktemp("shards"), n_train=4, n_val=5, resolution=16, per_shard=2)


def shard_captions(n: int, split: str = "val") -> dict[str, str]:
    """key -> primary caption of the shapes samples `write_shapes_shards` wrote (seed 0, 16 px)."""
    world = ShapesWorld(seed=0, resolution=16, split=split, size=n)
    return {s.key: s.caption for s in (world[i] for i in range(n))}


def write_config(root: Path, shards: dict[str, str], out_dir: Path) -> Path:
    """A CPU-sized predict config: tiny generator, bag-of-words encoder, the PNG writer callback."""
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "logger": False,
            "enable_progress_bar": False,
            "default_root_dir": str(root),
            "callbacks": [{"class_path": WRITER, "init_args": {"output_dir": str(out_dir)}}],
        },
        "model": {
            "encoder": BOW,
            "sample_steps": [1, 2],
            "feature_cache_dir": None,
            "backbone": {
                "class_path": "emf_lightning.models.DiT",
                "init_args": {
                    "preset": "tiny",
                    "input_size": 16,
                    "patch_size": 4,
                    "hidden_size": 32,
                    "depth": 1,
                    "num_heads": 2,
                },
            },
        },
        "data": {"val_shards": shards["val"], "val_batch_size": 2, "num_workers": 0, "image_size": 16},
    }
    path = root / "predict.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def read_index(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "captions-rank0.jsonl").read_text().splitlines()]


def test_predict_stage_is_one_ordered_pass_over_the_val_shards_by_default(partial_shards):
    dm = ShardDataModule(val_shards=partial_shards["val"], val_batch_size=2, num_workers=0, image_size=16)
    dm.setup("predict")
    passes = [[(k, c) for b in dm.predict_dataloader() for k, c in zip(b["key"], b["caption"])] for _ in range(2)]
    assert passes[0] == passes[1]  # finite and repeatable: the same order every time
    assert sorted(passes[0]) == sorted(shard_captions(5).items())
    explicit = ShardDataModule(
        val_shards=partial_shards["val"], predict_shards=partial_shards["train"], num_workers=0, image_size=16
    )
    explicit.setup("predict")
    assert sorted(k for b in explicit.predict_dataloader() for k in b["key"]) == sorted(shard_captions(4, "train"))


def test_predict_without_shards_is_a_clear_error(partial_shards):
    with pytest.raises(ValueError, match=r"predict_shards \(or val_shards\) is required to predict"):
        ShardDataModule(train_shards=partial_shards["train"]).setup("predict")


def test_emf_predict_writes_one_png_per_caption_and_step_count(partial_shards, tmp_path):
    out_dir = tmp_path / "samples"
    config = write_config(tmp_path, partial_shards, out_dir)
    assert cli.main(["predict", "--config", str(config), "--return_predictions=false"]) == 0
    expected = shard_captions(5)
    for steps in (1, 2):
        pngs = sorted((out_dir / f"steps{steps}").glob("*.png"))
        assert [p.stem for p in pngs] == sorted(expected)
        assert all(np.asarray(Image.open(p)).shape == (16, 16, 3) for p in pngs)
    index = read_index(out_dir)
    assert sorted((r["key"], r["steps"]) for r in index) == sorted((k, s) for k in expected for s in (1, 2))
    assert all(r["caption"] == expected[r["key"]] for r in index)


def test_emf_predict_from_a_checkpoint_matches_generate(partial_shards, tmp_path):
    """fit one step, then `emf predict --ckpt` (data config from the checkpoint) on other shards."""
    config = write_config(tmp_path, partial_shards, tmp_path / "unused")
    fit = [
        "fit",
        "--config",
        str(config),
        f"--data.train_shards={partial_shards['train']}",
        "--data.batch_size=2",
        "--data.epoch_length=2",
        "--trainer.max_steps=1",
        "--trainer.limit_val_batches=0",
        "--trainer.callbacks=[]",
        "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
        "--trainer.callbacks.save_last=true",
    ]
    assert cli.main(fit) == 0
    (ckpt,) = tmp_path.rglob("last.ckpt")
    out_dir = tmp_path / "from_ckpt"
    rc = cli.main(
        [
            "predict",
            "--ckpt",
            str(ckpt),
            f"--data.predict_shards={partial_shards['train']}",
            "--data.val_batch_size=4",
            "--trainer.logger=false",
            "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={tmp_path}",
            f"--trainer.callbacks+={WRITER}",
            f"--trainer.callbacks.output_dir={out_dir}",
            "--return_predictions=false",
        ]
    )
    assert rc == 0
    # The 4 training samples are one predict batch (index 0, so noise seed 0), in shard order.
    index = [r for r in read_index(out_dir) if r["steps"] == 1]
    keys, captions = [r["key"] for r in index], [r["caption"] for r in index]
    assert sorted(keys) == sorted(shard_captions(4, "train"))
    module = EMFModule.load_from_checkpoint(ckpt, map_location="cpu")
    want = to_uint8(module.generate(captions, steps=1, cfg_scale=1.0, seed=0))
    got = np.stack([np.asarray(Image.open(out_dir / "steps1" / f"{k}.png").convert("RGB")) for k in keys])
    assert np.array_equal(got, want)
