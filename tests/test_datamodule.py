"""ShardDataModule: batch format, preprocessing, caption sampling/dropout, determinism, bad input, Lightning."""

from __future__ import annotations

import io
import json
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from lightning.pytorch import LightningModule, Trainer
from PIL import Image

from emf_lightning.callbacks.data_health import DataHealthCallback
from emf_lightning.data.datamodule import ShardDataModule
from emf_lightning.data.shards import write_shards
from emf_lightning.data.throughput import loader_throughput
from emf_lightning.data.transforms import resize_center_crop
from emf_lightning.shapes import ShapesWorld, scene_spec_or_none, shapes_samples
from emf_lightning.utils.images import from_uint8

RES = 16


@pytest.fixture(scope="module")
def world() -> ShapesWorld:
    return ShapesWorld(seed=5, resolution=RES, split="train", size=10)


@pytest.fixture(scope="module")
def shapes_urls(tmp_path_factory, world) -> str:
    root = tmp_path_factory.mktemp("shapes")
    return write_shards(shapes_samples(world), str(root / "train-%06d.tar"), maxcount=4).urls


def _png(value: int | np.ndarray, size: int = RES) -> bytes:
    arr = np.full((size, size, 3), value, np.uint8) if isinstance(value, int) else value
    out = io.BytesIO()
    Image.fromarray(arr).save(out, format="PNG")
    return out.getvalue()


def _sample(key: str, value: int = 100, caption: str = "a caption", doc: dict | None = None, **extra) -> dict:
    s = {"__key__": key, "png": _png(value), "txt": caption.encode()}
    if doc is not None:
        s["json"] = json.dumps(doc).encode()
    s.update(extra)
    return s


def _write_tar(path: Path, samples: list[dict]) -> bytes:
    buf = io.BytesIO()
    with wds.TarWriter(buf, mtime=0, encoder=False) as w:
        for s in samples:
            w.write(s)
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


def _keys(loader) -> list[str]:
    return [k for b in loader for k in b["key"]]


# ------------------------------------------------------------------------------------------------- format


def test_validation_pass_format_order_and_exact_pixels(shapes_urls, world):
    dm = ShardDataModule(val_shards=shapes_urls, batch_size=4, num_workers=0, image_size=RES)
    dm.setup("validate")
    batches = list(dm.val_dataloader())
    assert [len(b["key"]) for b in batches] == [4, 4, 2]
    assert [k for b in batches for k in b["key"]] == [world[i].key for i in range(10)]
    images = torch.cat([b["image"] for b in batches])
    assert images.dtype == torch.float32 and images.shape == (10, 3, RES, RES)
    expected = torch.stack([from_uint8(world[i].image) for i in range(10)])
    assert torch.equal(images, expected)  # PNG round trip + exact [-1, 1] scaling
    assert [c for b in batches for c in b["caption"]] == [world[i].caption for i in range(10)]
    spec0 = scene_spec_or_none(batches[0]["meta"][0])
    assert spec0 == json.loads(json.dumps(world[0].spec)) and "captions" not in spec0
    assert all(b["skipped"] == {} for b in batches)
    with pytest.raises(TypeError, match="no len"):
        len(dm.val_dataloader())
    dm.setup("test")  # test_shards default to the validation shards
    assert _keys(dm.test_dataloader()) == [world[i].key for i in range(10)]


def test_resize_and_centre_crop():
    # 4x8 (h x w): columns 2..5 white. Shorter side is already 4, so the centre crop is all white.
    img = np.zeros((4, 8, 3), np.uint8)
    img[:, 2:6] = 255
    assert (np.array(resize_center_crop(Image.fromarray(img), 4)) == 255).all()
    # 8x8 constant -> 4x4 constant (an antialiasing filter preserves a constant)
    const = Image.fromarray(np.full((8, 8, 3), 77, np.uint8))
    assert (np.array(resize_center_crop(const, 4)) == 77).all()
    # 16x8 portrait: top half red, bottom half blue -> scaled to 8x4 -> centre crop rows 2..5 of 8
    tall = np.zeros((16, 8, 3), np.uint8)
    tall[:8, :, 0] = 255
    tall[8:, :, 2] = 255
    out = np.array(resize_center_crop(Image.fromarray(tall), 4))
    assert out.shape == (4, 4, 3)
    assert (out[0, :, 0] == 255).all() and (out[-1, :, 2] == 255).all()
    same = np.random.default_rng(0).integers(0, 256, (4, 4, 3), dtype=np.uint8)
    assert np.array_equal(np.array(resize_center_crop(Image.fromarray(same), 4)), same)


# ------------------------------------------------------------------------------------------------- captions


def test_caption_sampling_first_random_and_dropout(shapes_urls, world):
    by_key = {world[i].key: world[i] for i in range(10)}
    common = dict(
        train_shards=shapes_urls,
        val_shards=shapes_urls,
        batch_size=8,
        num_workers=0,
        image_size=8,
        epoch_length=80,
        shuffle_buffer=4,
        seed=1,
    )

    dm = ShardDataModule(caption_sampling="first", **common)
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert all(c == by_key[k].caption for b in batches for k, c in zip(b["key"], b["caption"]))

    dm = ShardDataModule(caption_sampling="random", **common)
    dm.setup("fit")
    pairs = [(k, c) for b in dm.train_dataloader() for k, c in zip(b["key"], b["caption"])]
    assert all(c in by_key[k].captions for k, c in pairs)
    assert len({c for _, c in pairs}) > len({k for k, _ in pairs})  # paraphrases, not only primaries

    # condition dropout is the loss's cond_drop_prob (tests/test_meanflow.py), not the data's
    with pytest.raises(TypeError, match="caption_dropout"):
        ShardDataModule(caption_dropout=0.5, **common)


# ------------------------------------------------------------------------------------------------- determinism


def test_training_stream_is_seeded_exact_and_varies_by_epoch(shapes_urls):
    def make(seed: int) -> ShardDataModule:
        dm = ShardDataModule(
            train_shards=shapes_urls,
            batch_size=4,
            num_workers=0,
            image_size=8,
            epoch_length=18,
            shuffle_buffer=5,
            seed=seed,
        )
        dm.setup("fit")
        return dm

    loader_a, loader_b = make(0).train_dataloader(), make(0).train_dataloader()
    epoch0, epoch1 = _keys(loader_a), _keys(loader_a)
    assert epoch0 == _keys(loader_b)  # same seed, same stream
    assert len(epoch0) == len(epoch1) == 18
    assert epoch0 != epoch1  # a new epoch draws new shards and a new shuffle
    assert len(loader_a) == 5 == len(list(loader_a))  # 4+4+4+4+2
    assert _keys(make(1).train_dataloader()) != epoch0


# ------------------------------------------------------------------------------------------------- bad input


def _bad_shards(root: Path) -> tuple[str, list[str]]:
    """Four shards with every kind of bad input; returns (brace URL, keys that must survive, in order)."""
    root.mkdir(parents=True, exist_ok=True)
    _write_tar(root / "bad-0.tar", [_sample(f"a{i}") for i in range(4)])
    _write_tar(
        root / "bad-1.tar",
        [
            _sample("b0"),
            {**_sample("b1"), "png": b"\x89PNG\r\n\x1a\n garbage"},  # undecodable image
            _sample("b2", caption="   "),  # empty caption
            {**_sample("b3"), "json": b"{broken"},  # bad json
        ],
    )
    # truncated inside c3's image: c0..c2 survive; c3 keeps only its .json -> no caption
    raw = _write_tar(root / "bad-2.tar", [_sample(f"c{i}", doc={"n": i}) for i in range(4)])
    with tarfile.open(fileobj=io.BytesIO(raw)) as tf:
        c3_png = tf.getmember("c3.png")
    (root / "bad-2.tar").write_bytes(raw[: c3_png.offset_data + 20])
    # damaged header of d1.png: the reader resyncs; d1 has no image, d2 and d3 survive
    raw = bytearray(_write_tar(root / "bad-3.tar", [_sample(f"d{i}") for i in range(4)]))
    with tarfile.open(fileobj=io.BytesIO(bytes(raw))) as tf:
        d1_png = tf.getmember("d1.png")
    raw[d1_png.offset : d1_png.offset + 64] = b"\xff" * 64
    (root / "bad-3.tar").write_bytes(bytes(raw))
    survivors = ["a0", "a1", "a2", "a3", "b0", "c0", "c1", "c2", "d0", "d2", "d3"]
    return str(root / "bad-{0..3}.tar"), survivors


EXPECTED_SKIPS = {"undecodable_image": 1, "empty_caption": 2, "bad_json": 1, "corrupt_shard": 2, "missing_image": 1}


def test_bad_input_is_skipped_counted_and_nothing_else_is_lost(tmp_path, caplog):
    urls, survivors = _bad_shards(tmp_path)
    dm = ShardDataModule(val_shards=urls, batch_size=3, num_workers=0, image_size=8)
    dm.setup("validate")
    loader = dm.val_dataloader()
    with caplog.at_level(logging.INFO, logger="emf_lightning.data"):
        keys = _keys(loader)
    assert keys == survivors
    assert dict(loader.tally.counts) == EXPECTED_SKIPS
    assert loader.tally.samples == len(survivors)
    warnings_ = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    # one warning per kind (empty_caption happened twice), then the end-of-epoch summary
    assert sum("skipping input (empty_caption)" in m for m in warnings_) == 1
    summary = warnings_[-1]
    assert summary.startswith("val epoch 0: 11 samples delivered; skipped: ")
    assert "corrupt_shard=2 shards" in summary and "empty_caption=2 samples" in summary
    # webdataset's own reader with warn_and_continue loses d2 and d3 after the damaged header
    wds_keys = [
        s["__key__"]
        for s in wds.WebDataset(str(tmp_path / "bad-3.tar"), shardshuffle=False, handler=wds.warn_and_continue)
    ]
    assert "d3" not in wds_keys and {"d2", "d3"} <= set(keys)


def test_skip_counts_cross_worker_processes(tmp_path):
    urls, survivors = _bad_shards(tmp_path)
    # bad-1 and bad-3 go to worker 1; its counts travel on its batches to the main process
    dm = ShardDataModule(val_shards=urls, batch_size=3, num_workers=2, image_size=8)
    dm.setup("validate")
    loader = dm.val_dataloader()
    keys = _keys(loader)
    assert sorted(keys) == sorted(survivors)
    assert dict(loader.tally.counts) == EXPECTED_SKIPS
    # worker 1 reads only a shard whose samples are all bad: it sends one empty batch, which the loader drops
    _write_tar(tmp_path / "all-0.tar", [_sample("g0"), _sample("g1")])
    _write_tar(tmp_path / "all-1.tar", [_sample("h0", caption=""), _sample("h1", caption="")])
    dm = ShardDataModule(val_shards=str(tmp_path / "all-{0..1}.tar"), batch_size=4, num_workers=2, image_size=8)
    dm.setup("validate")
    loader = dm.val_dataloader()
    batches = list(loader)
    assert [b["key"] for b in batches] == [["g0", "g1"]]
    assert dict(loader.tally.counts) == {"empty_caption": 2}


def test_endless_stream_over_only_bad_shards_stops_with_an_error(tmp_path):
    _write_tar(tmp_path / "x-0.tar", [_sample("x0", caption="")])
    dm = ShardDataModule(
        train_shards=str(tmp_path / "x-0.tar"), batch_size=2, num_workers=0, epoch_length=4, shuffle_buffer=0
    )
    dm.setup("fit")
    with pytest.raises(RuntimeError, match="no valid sample decoded while reading the last 120 shards"):
        list(dm.train_dataloader())


def test_shard_list_errors(tmp_path, shapes_urls):
    with pytest.raises(ValueError, match="empty shard list ''"):
        ShardDataModule(train_shards="").setup("fit")
    with pytest.raises(ValueError, match="empty shard list"):
        ShardDataModule(train_shards=[]).setup("fit")
    with pytest.raises(FileNotFoundError, match=r"shard pattern '.*/nothing-\*\.tar' matches no files"):
        ShardDataModule(train_shards=str(tmp_path / "nothing-*.tar")).setup("fit")
    pattern = shapes_urls.replace("000002}", "000004}")
    with pytest.raises(FileNotFoundError, match=r"2 shard file\(s\) not found: .*train-000003\.tar"):
        ShardDataModule(val_shards=pattern).setup("validate")
    with pytest.raises(ValueError, match="train_shards is required to fit"):
        ShardDataModule(val_shards=shapes_urls).setup("fit")
    with pytest.raises(ValueError, match="val_shards is required to validate"):
        ShardDataModule(train_shards=shapes_urls).setup("validate")
    with pytest.raises(ValueError, match="caption_sampling must be one of"):
        ShardDataModule(train_shards=shapes_urls, caption_sampling="all")
    with pytest.raises(ValueError, match="load_features=True needs caption_sampling='first'"):
        ShardDataModule(train_shards=shapes_urls, caption_sampling="random", load_features=True)


def test_epoch_length_must_divide_by_world_size(shapes_urls, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    dm = ShardDataModule(train_shards=shapes_urls, epoch_length=10)
    with pytest.raises(ValueError, match="epoch_length=10 must be divisible by the world size 4"):
        dm.setup("fit")


# ------------------------------------------------------------------------------------------------- features


def test_precomputed_features_and_latents(tmp_path):
    def feats(n_tokens: int, base: float) -> bytes:
        buf = io.BytesIO()
        np.savez(buf, tokens=np.full((n_tokens, 3), base, np.float32), pooled=np.full(3, -base, np.float32))
        return buf.getvalue()

    def latent(v: float) -> bytes:
        buf = io.BytesIO()
        np.save(buf, np.full((2, 2, 2), v, np.float32))
        return buf.getvalue()

    _write_tar(
        tmp_path / "f-0.tar",
        [
            _sample("k0", **{"features.npz": feats(2, 1.0), "latent.npy": latent(0.5)}),
            _sample("k1", **{"features.npz": feats(4, 2.0), "latent.npy": latent(1.5)}),
            _sample("k2", **{"latent.npy": latent(2.5)}),  # no features: skipped when features are required
        ],
    )
    dm = ShardDataModule(
        val_shards=str(tmp_path / "f-0.tar"),
        batch_size=4,
        num_workers=0,
        image_size=8,
        load_features=True,
        load_latents=True,
    )
    dm.setup("validate")
    loader = dm.val_dataloader()
    (batch,) = list(loader)
    assert batch["key"] == ["k0", "k1"]
    f = batch["features"]
    assert f["tokens"].shape == (2, 4, 3)
    assert f["mask"].tolist() == [[True, True, False, False], [True] * 4]
    assert torch.equal(f["tokens"][0], torch.tensor([[1.0] * 3] * 2 + [[0.0] * 3] * 2))
    assert torch.equal(f["pooled"], torch.tensor([[-1.0] * 3, [-2.0] * 3]))
    assert torch.equal(batch["latent"], torch.stack([torch.full((2, 2, 2), 0.5), torch.full((2, 2, 2), 1.5)]))
    assert dict(loader.tally.counts) == {"bad_features": 1}
    # without load_features, the same shards give plain batches
    dm = ShardDataModule(val_shards=str(tmp_path / "f-0.tar"), batch_size=4, num_workers=0, image_size=8)
    dm.setup("validate")
    (plain,) = list(dm.val_dataloader())
    assert plain["key"] == ["k0", "k1", "k2"] and "features" not in plain and "latent" not in plain


# ------------------------------------------------------------------------------------------------- Lightning


class _TinyModule(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(3, 1)
        self.seen: list[int] = []

    def training_step(self, batch, batch_idx):
        self.seen.append(len(batch["key"]))
        return self.layer(batch["image"].mean((2, 3))).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.layer(batch["image"].mean((2, 3))).pow(2).mean(), batch_size=len(batch["key"]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_lightning_fit_with_data_health_callback(tmp_path, shapes_urls):
    _write_tar(tmp_path / "v-0.tar", [_sample("v0"), _sample("v1", caption=""), _sample("v2")])
    dm = ShardDataModule(
        train_shards=shapes_urls,
        val_shards=str(tmp_path / "v-0.tar"),
        batch_size=4,
        num_workers=0,
        image_size=8,
        epoch_length=10,
        shuffle_buffer=4,
    )
    module = _TinyModule()
    trainer = Trainer(
        max_epochs=2,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[DataHealthCallback()],
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=dm)
    assert module.seen == [4, 4, 2, 4, 4, 2]  # exactly epoch_length samples per epoch, len() known
    assert trainer.num_training_batches == 3
    m = trainer.callback_metrics
    assert m["data/train_samples"].item() == 10
    assert m["data/val_samples"].item() == 2
    assert m["data/val_skipped_empty_caption"].item() == 1
    assert dm.loaders["train"].next_epoch == 2


def test_loader_throughput(shapes_urls):
    dm = ShardDataModule(train_shards=shapes_urls, batch_size=4, num_workers=0, image_size=8, epoch_length=8)
    rate = loader_throughput(dm, n_batches=5, warmup=1)  # spans epochs: 2 batches per epoch
    assert np.isfinite(rate) and rate > 0


def test_pipe_urls_are_read_and_a_failing_command_is_counted(shapes_urls, world):
    first = wds.shardlists.expand_urls(shapes_urls)[0]
    dm = ShardDataModule(val_shards=[f"pipe:cat {first}", "pipe:false"], batch_size=8, num_workers=0, image_size=RES)
    dm.setup("validate")
    loader = dm.val_dataloader()
    assert _keys(loader) == [world[i].key for i in range(4)]
    assert dict(loader.tally.counts) == {"unreadable_shard": 1}


def test_persistent_workers_see_each_new_epoch(shapes_urls):
    dm = ShardDataModule(
        train_shards=shapes_urls,
        batch_size=4,
        num_workers=1,
        persistent_workers=True,
        image_size=8,
        epoch_length=12,
        shuffle_buffer=4,
        seed=2,
    )
    dm.setup("fit")
    loader = dm.train_dataloader()
    epochs = [_keys(loader) for _ in range(3)]
    assert all(len(e) == 12 for e in epochs)
    assert epochs[0] != epochs[1] != epochs[2]  # the epoch reached the long-lived worker (shared memory)
    fresh = ShardDataModule(
        train_shards=shapes_urls, batch_size=4, num_workers=0, image_size=8, epoch_length=12, shuffle_buffer=4, seed=2
    )
    fresh.setup("fit")
    reference = fresh.train_dataloader()
    assert [_keys(reference) for _ in range(3)] == epochs  # same stream with or without worker processes
