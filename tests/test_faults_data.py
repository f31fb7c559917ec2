"""Faults on the data path and in evaluation: other people's WebDatasets, failing evaluations, undecodable
captions, and resuming the training stream mid-epoch. Each test failed before its fix."""

from __future__ import annotations

import hashlib
import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from PIL import Image
from torch import nn

from emf_lightning.callbacks.evaluation import EvaluationCallback
from emf_lightning.data.datamodule import ShardDataModule
from emf_lightning.data.health import SkipCounter
from emf_lightning.data.sources import folder_samples
from emf_lightning.shapes import ShapesWorld, scene_spec_or_none

from helpers import StandInModule

RES = 16


# ------------------------------------------------------------------------------------------------ writers
def _jpeg(seed: int, size: tuple[int, int] = (24, 20)) -> bytes:
    rng = np.random.default_rng(seed)
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(out, format="JPEG")
    return out.getvalue()


def img2dataset_meta(key: str, caption: str, i: int) -> dict:
    """The .json img2dataset writes for a downloaded sample (url/caption columns, hashes on)."""
    return {
        "url": f"https://example.com/img/{i}.jpg",
        "caption": caption,
        "key": key,
        "status": "success",
        "error_message": None,
        "width": 24,
        "height": 20,
        "original_width": 640,
        "original_height": 533,
        "exif": "{}",
        "sha256": hashlib.sha256(str(i).encode()).hexdigest(),
    }


def write_img2dataset_shard(path: Path, shard_id: int, n: int) -> list[str]:
    """One tar laid out as img2dataset's WebDatasetSampleWriter writes it: webdataset's TarWriter with
    {"__key__": "<shard><index>", "jpg": bytes, "txt": str, "json": json.dumps(meta, indent=4)}. Returns the keys."""
    keys = []
    with open(path, "wb") as fd, wds.TarWriter(fd) as sink:
        for i in range(n):
            key = f"{shard_id:05d}{i:04d}"
            caption = f"a photo number {shard_id * 100 + i} of a street"
            sink.write(
                {
                    "__key__": key,
                    "jpg": _jpeg(shard_id * 100 + i),
                    "txt": caption,
                    "json": json.dumps(img2dataset_meta(key, caption, shard_id * 100 + i), indent=4),
                }
            )
            keys.append(key)
    return keys


def write_shapes_shard(pattern: Path, n: int, split: str = "val") -> ShapesWorld:
    from emf_lightning.data.shards import ShardSample, write_shards

    world = ShapesWorld(seed=3, resolution=RES, split=split, size=n)
    write_shards(
        (
            ShardSample(key=s.key, image=s.image, caption=s.caption, captions=s.captions, meta=s.spec)
            for s in (world[i] for i in range(n))
        ),
        str(pattern),
        maxcount=n,
    )
    return world


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)

    def messages(self, level: int = logging.DEBUG) -> list[str]:
        return [r.getMessage() for r in self.records if r.levelno >= level]


@pytest.fixture
def lines():
    """Records of the project's loggers and Lightning's rank-zero logger (which does not propagate)."""
    handler = _Lines()
    names = ("emf_lightning", "lightning.pytorch.utilities.rank_zero")
    saved = {}
    for name in names:
        logger = logging.getLogger(name)
        saved[name] = logger.level
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)
    yield handler
    for name in names:
        logging.getLogger(name).removeHandler(handler)
        logging.getLogger(name).setLevel(saved[name])


# --------------------------------------------------------------------------------- a .json is a spec only if it is one
def test_scene_spec_or_none_accepts_scene_specs_only():
    world = ShapesWorld(seed=0, resolution=RES, split="train", size=2)
    spec = world[0].spec
    assert scene_spec_or_none({**spec, "captions": ["x"]}) == spec  # the stored paraphrases are not part of it
    meta = img2dataset_meta("000000000", "a street", 0)
    assert scene_spec_or_none(meta) is None
    assert scene_spec_or_none({"source": "flickr", "license": "cc-by"}) is None  # `emf shards list` extra columns
    for broken in (
        {"objects": []},
        {"objects": [1], "category": "colors"},
        {"objects": "circle"},
        {**spec, "category": "nonsense"},
        {**spec, "relations": ["left"]},
        {},
        None,
    ):
        assert scene_spec_or_none(broken) is None, broken


def test_img2dataset_shards_give_metadata_and_no_spec(tmp_path):
    keys = write_img2dataset_shard(tmp_path / "00000.tar", 0, 3) + write_img2dataset_shard(tmp_path / "00001.tar", 1, 2)
    dm = ShardDataModule(val_shards=str(tmp_path / "{00000..00001}.tar"), batch_size=4, num_workers=0, image_size=RES)
    dm.setup("validate")
    batches = list(dm.val_dataloader())
    assert [k for b in batches for k in b["key"]] == keys
    assert all(spec is None for b in batches for spec in b["spec"])
    metas = [m for b in batches for m in b["meta"]]
    assert metas[1]["url"] == "https://example.com/img/1.jpg" and metas[1]["status"] == "success"
    assert metas[4]["key"] == "000010001" and metas[4]["width"] == 24
    assert batches[0]["caption"][0] == "a photo number 0 of a street"
    assert batches[0]["image"].shape == (4, 3, RES, RES)


class BlackGenerator(StandInModule):
    """The generate() contract with black images (ShapesEval finds no object in them)."""

    def generate(self, captions, steps=1, cfg_scale=1.0, seed=0, use_ema=True):
        return -torch.ones(len(captions), 3, RES, RES)


def _validate(tmp_path: Path, val_shards, callback: EvaluationCallback) -> dict:
    dm = ShardDataModule(val_shards=val_shards, batch_size=4, num_workers=0, image_size=RES)
    trainer = Trainer(
        default_root_dir=tmp_path,
        max_steps=1,
        callbacks=[callback],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    return trainer.validate(BlackGenerator(), datamodule=dm, verbose=False)[0]


def test_validate_on_img2dataset_shards_skips_shapes_eval_in_one_line(tmp_path, lines):
    """Was: SceneError: spec['objects'] must be a non-empty list (ShapesEval on every img2dataset .json)."""
    write_img2dataset_shard(tmp_path / "00000.tar", 0, 6)
    cb = EvaluationCallback(
        num_samples=8,
        batch_size=4,
        steps=(1,),
        fid=False,
        clip_score=False,
        grid_prompts=0,
        output_dir=str(tmp_path / "eval"),
    )  # shapes_eval=True, the default of every config
    out = _validate(tmp_path, str(tmp_path / "00000.tar"), cb)
    assert not [k for k in out if "shapes" in k]
    said = [m for m in lines.messages(logging.INFO) if "ShapesEval" in m]
    assert said == ["ShapesEval judges 0 of 6 held-out samples (the others carry no shapes-world scene spec)"]
    assert "shapes" in cb.last_result.skipped


def test_shapes_eval_judges_only_the_samples_with_a_spec(tmp_path, lines):
    """A held-out set mixing shapes shards, img2dataset shards and `emf shards list` output with extra columns."""
    from emf_lightning.commands.shards import main as shards_main

    write_shapes_shard(tmp_path / "shapes-%06d.tar", 4)
    write_img2dataset_shard(tmp_path / "00000.tar", 0, 3)
    (tmp_path / "imgs").mkdir()
    rows = []
    for i in range(2):
        Image.open(io.BytesIO(_jpeg(50 + i))).save(tmp_path / "imgs" / f"p{i}.png")
        rows.append(
            {
                "image": f"imgs/p{i}.png",
                "caption": f"listed picture {i}",
                "url": f"https://x/{i}",
                "width": 24,
                "height": 20,
                "status": "success",
                "objects": "two",
            }
        )
    (tmp_path / "list.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert shards_main(["list", str(tmp_path / "list.jsonl"), "--out", str(tmp_path / "list-%06d.tar")]) == 0

    shards = [str(tmp_path / "shapes-000000.tar"), str(tmp_path / "00000.tar"), str(tmp_path / "list-000000.tar")]
    dm = ShardDataModule(val_shards=shards, batch_size=16, num_workers=0, image_size=RES)
    dm.setup("validate")
    (batch,) = list(dm.val_dataloader())
    assert [s is not None for s in batch["spec"]] == [True] * 4 + [False] * 5
    assert batch["meta"][-1] == {"url": "https://x/1", "width": 24, "height": 20, "status": "success", "objects": "two"}

    cb = EvaluationCallback(
        num_samples=16,
        batch_size=4,
        steps=(1,),
        fid=False,
        clip_score=False,
        grid_prompts=0,
        output_dir=str(tmp_path / "eval"),
    )
    out = _validate(tmp_path, shards, cb)
    said = [m for m in lines.messages(logging.INFO) if "ShapesEval" in m]
    assert said == ["ShapesEval judges 4 of 9 held-out samples (the others carry no shapes-world scene spec)"]
    assert out["eval/shapes_overall@real"] == 1.0  # the real shapes images, judged against their own specs
    assert out["eval/shapes_overall@1step_cfg1.0"] == 0.0  # black images hold no object


# --------------------------------------------------------------------------------- an evaluation never costs a checkpoint
class FailingShapesEval:
    """Raises on every call; records whether the final checkpoint was already on disk at that moment."""

    def __init__(self, last: Path):
        self.last, self.seen_last_at = last, []

    def evaluate(self, images, specs):
        self.seen_last_at.append(
            torch.load(self.last, weights_only=False)["global_step"] if self.last.exists() else None
        )
        raise ValueError("spec['objects'] must be a non-empty list")


def test_fit_whose_evaluations_raise_still_writes_the_final_checkpoint(tmp_path, lines):
    from emf_lightning.callbacks.checkpoint import FinalModelCheckpoint
    from emf_lightning.training import EMFModule

    from helpers import tiny_module, write_shapes_shards

    urls = write_shapes_shards(tmp_path / "shards", n_train=8, n_val=4, resolution=16)
    dm = ShardDataModule(
        train_shards=urls["train"],
        val_shards=urls["val"],
        batch_size=4,
        image_size=16,
        num_workers=0,
        epoch_length=8,
        shuffle_buffer=0,
    )
    ckpt_dir = tmp_path / "ckpt"
    failing = FailingShapesEval(ckpt_dir / "last.ckpt")
    cb = EvaluationCallback(
        every_n_steps=2,
        on_train_end=True,
        num_samples=4,
        batch_size=4,
        steps=(1,),
        fid=False,
        clip_score=False,
        grid_prompts=0,
        shapes_evaluator=failing,
        output_dir=str(tmp_path / "eval"),
    )
    checkpoint = FinalModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=2, save_last=True, save_top_k=0)
    module = tiny_module()
    trainer = Trainer(
        default_root_dir=tmp_path,
        max_steps=3,
        callbacks=[cb, checkpoint],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        accelerator="cpu",
    )
    trainer.fit(module, datamodule=dm)  # was: ValueError from the evaluation at step 2, and no last.ckpt

    assert trainer.global_step == 3 and cb.failed_evaluations == 2
    assert trainer.callback_metrics["eval/failed_evaluations"].item() == 2
    errors = lines.messages(logging.ERROR)
    assert len(errors) == 2 and errors[1] == (
        "EvaluationCallback: evaluation at step 3 failed: ValueError: spec['objects'] must be a non-empty list. "
        "Training goes on and checkpoints are still written (traceback at DEBUG level, logger "
        "'emf_lightning.callbacks.evaluation')."
    )
    tracebacks = [r for r in lines.records if r.levelno == logging.DEBUG and r.exc_info and "failed" in r.getMessage()]
    assert len(tracebacks) == 2
    # step 2: the periodic evaluation runs before that step's checkpoint (Lightning runs checkpoint callbacks
    # last) and its failure is caught; step 3: the end-of-training evaluation runs after the final checkpoint
    assert failing.seen_last_at == [None, 3]
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["last.ckpt"]
    loaded = EMFModule.load_from_checkpoint(ckpt_dir / "last.ckpt", map_location="cpu")
    assert torch.load(ckpt_dir / "last.ckpt", weights_only=False)["global_step"] == 3
    for a, b in zip(loaded.generator.state_dict().values(), module.generator.state_dict().values()):
        assert torch.equal(a, b.cpu())

    # under validate, evaluation is the job: the same failure stops it
    val = EvaluationCallback(
        num_samples=4,
        batch_size=4,
        steps=(1,),
        fid=False,
        clip_score=False,
        grid_prompts=0,
        shapes_evaluator=FailingShapesEval(tmp_path / "none"),
        output_dir=str(tmp_path / "v"),
    )
    val_trainer = Trainer(
        default_root_dir=tmp_path,
        max_steps=3,
        callbacks=[val],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=1,
        accelerator="cpu",
    )
    with pytest.raises(ValueError, match="non-empty list"):
        val_trainer.validate(loaded, datamodule=dm, verbose=False)


# --------------------------------------------------------------------------------- undecodable captions
def _png(seed: int) -> bytes:
    out = io.BytesIO()
    Image.open(io.BytesIO(_jpeg(seed, (RES, RES)))).save(out, format="PNG")
    return out.getvalue()


def test_invalid_utf8_caption_is_skipped_and_counted(tmp_path, lines):
    """Was: trained as 'caf\\ufffd au lait'."""
    samples = [
        {"__key__": "a", "png": _png(0), "txt": b"a red circle"},
        {"__key__": "b", "png": _png(1), "txt": "café au lait".encode("latin-1")},
        {"__key__": "c", "png": _png(2), "txt": "naïve blue square".encode()},
    ]
    with wds.TarWriter(str(tmp_path / "t-0.tar"), encoder=False) as sink:
        for s in samples:
            sink.write(s)
    dm = ShardDataModule(val_shards=str(tmp_path / "t-0.tar"), batch_size=4, num_workers=0, image_size=RES)
    dm.setup("validate")
    loader = dm.val_dataloader()
    batches = list(loader)
    assert [c for b in batches for c in b["caption"]] == ["a red circle", "naïve blue square"]
    assert dict(loader.tally.counts) == {"undecodable_caption": 1}
    assert any(
        "skipping input (undecodable_caption)" in m and ":b.txt: not UTF-8" in m
        for m in lines.messages(logging.WARNING)
    )

    (tmp_path / "imgs").mkdir()
    for name, text in (("a", b"a red circle"), ("b", "caf\xe9".encode("latin-1"))):
        (tmp_path / "imgs" / f"{name}.png").write_bytes(_png(3))
        (tmp_path / "imgs" / f"{name}.txt").write_bytes(text)
    counter = SkipCounter("folder")
    assert [s.key for s in folder_samples(tmp_path / "imgs", counter)] == ["a"]  # `emf shards folder`
    assert counter.drain() == {"undecodable_caption": 1}


# --------------------------------------------------------------------------------- resuming the training stream
@pytest.fixture(scope="module")
def train_urls(tmp_path_factory) -> str:
    from helpers import write_shapes_shards

    return write_shapes_shards(tmp_path_factory.mktemp("resume"), n_train=12, n_val=4, resolution=8, per_shard=3)[
        "train"
    ]


def _train_dm(urls: str, num_workers: int) -> ShardDataModule:
    # 10 samples per epoch in batches of 3: 4 batches (3, 3, 3, 1), split over the workers
    return ShardDataModule(
        train_shards=urls,
        batch_size=3,
        num_workers=num_workers,
        image_size=8,
        epoch_length=10,
        shuffle_buffer=4,
        caption_sampling="random",
        caption_dropout=0.3,
        seed=7,
    )


def _batches(loader, n: int | None = None) -> list[tuple[tuple[str, ...], tuple[str, ...]]]:
    out = []
    for batch in loader:
        out.append((tuple(batch["key"]), tuple(batch["caption"])))
        if n is not None and len(out) == n:
            break
    return out


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_state_resumes_mid_epoch_exactly(train_urls, num_workers):
    dm = _train_dm(train_urls, num_workers)
    dm.setup("fit")
    loader = dm.train_dataloader()
    whole = [_batches(loader) for _ in range(2)]
    assert [len(e) for e in whole] == [4, 4]

    first = _train_dm(train_urls, num_workers)
    first.setup("fit")
    interrupted = first.train_dataloader()
    _batches(interrupted)  # epoch 0
    assert _batches(interrupted, 2) == whole[1][:2]
    state = interrupted.state_dict()
    assert (state["epoch"], state["batches"]) == (1, 2)

    second = _train_dm(train_urls, num_workers)
    second.setup("fit")
    resumed = second.train_dataloader()
    resumed.load_state_dict(state)
    assert _batches(resumed) == whole[1][2:]  # the rest of epoch 1, keys, captions and dropouts alike
    assert resumed.tally.samples == 10  # the replayed part counts towards the epoch's tally
    assert resumed.state_dict()["batches"] == 4

    done = _train_dm(train_urls, num_workers)
    done.setup("fit")
    after_epoch = done.train_dataloader()
    after_epoch.load_state_dict({**state, "batches": 4})  # a checkpoint at the end of epoch 1
    reference = _train_dm(train_urls, num_workers)
    reference.setup("fit")
    ref = reference.train_dataloader()
    ref.next_epoch = 2
    assert _batches(after_epoch) == _batches(ref)


def test_loader_warns_when_the_data_layout_changed(train_urls, lines):
    dm = _train_dm(train_urls, 0)
    dm.setup("fit")
    state = dm.train_dataloader().state_dict()
    state["layout"] = {**state["layout"], "num_workers": 4}
    dm.train_dataloader().load_state_dict(state)
    assert any(
        "the data layout changed since the checkpoint (num_workers)" in m for m in lines.messages(logging.WARNING)
    )


class KeyRecorder(LightningModule):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.steps: list[tuple[str, ...]] = []

    def training_step(self, batch, batch_idx):
        self.steps.append(tuple(batch["key"]))
        return (self.w - batch["image"].mean()).pow(2).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(root: Path, urls: str, max_steps: int, num_workers: int, ckpt_path: str | None = None) -> KeyRecorder:
    module = KeyRecorder()
    every = ModelCheckpoint(dirpath=root / "ckpt", filename="{step}", every_n_train_steps=1, save_top_k=-1)
    trainer = Trainer(
        default_root_dir=root,
        max_steps=max_steps,
        callbacks=[every],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(module, datamodule=_train_dm(urls, num_workers), ckpt_path=ckpt_path)
    assert trainer.global_step == max_steps
    return module


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resumed_fit_sees_the_batches_of_an_uninterrupted_fit(tmp_path, train_urls, num_workers):
    """Was: a fit resumed mid-epoch restarted the epoch's stream and trained on its first batches again."""
    whole = _fit(tmp_path, train_urls, 10, num_workers).steps  # 2.5 epochs of 4 batches
    assert len(whole) == 10 and len(set(whole[:4])) == 4
    for k in (2, 4, 5):  # mid-epoch 0, the end of epoch 0, mid-epoch 1
        resumed = _fit(
            tmp_path / f"r{k}", train_urls, 10, num_workers, ckpt_path=str(tmp_path / "ckpt" / f"step={k}.ckpt")
        ).steps
        assert resumed == whole[k:], k


def test_probe_on_img2dataset_shards_takes_relevance_from_images_not_specs(tmp_path):
    """Was: every img2dataset .json taken for an (empty) scene: every caption 'relevant' to every other."""
    from emf_lightning.probe.sets import shard_probe_set

    write_img2dataset_shard(tmp_path / "00000.tar", 0, 4)
    probe = shard_probe_set(str(tmp_path / "00000.tar"), n=4, image_encoder="pixels", resolution=16)
    assert probe.relevance_source == "image features (pixels) cosine, clamped to [0, 1]"
    assert probe.relevance.shape == (4, 4) and probe.relevance.min() < 1.0


def test_a_held_out_read_failure_on_rank_0_reaches_every_rank():
    """Rank 0 alone reads the held-out set; the others wait in its broadcast. They must get its error (and fail
    or, during fit, recover alike) instead of receiving nothing and evaluating on None."""
    from types import SimpleNamespace

    sent = []

    def broadcast(obj, src=0):
        sent.append(obj)
        return obj

    class NoData:
        def __iter__(self):
            raise OSError("val shard vanished")

    rank0 = SimpleNamespace(
        is_global_zero=True,
        world_size=2,
        strategy=SimpleNamespace(broadcast=broadcast),
        datamodule=SimpleNamespace(val_dataloader=NoData),
    )
    with pytest.raises(OSError, match="vanished"):
        EvaluationCallback()._held_out_set(rank0)
    assert sent == [(None, "OSError: val shard vanished")]
    rank1 = SimpleNamespace(
        is_global_zero=False, world_size=2, strategy=SimpleNamespace(broadcast=lambda obj, src=0: sent[0])
    )
    with pytest.raises(RuntimeError, match="rank 0 could not read the held-out set: OSError: val shard vanished"):
        EvaluationCallback()._held_out_set(rank1)


class RankKeys(Callback):
    """Every rank writes the keys of the batches it trained on (spawned processes share no memory)."""

    def __init__(self, out: Path):
        self.out, self.keys = out, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.keys.append(tuple(batch["key"]))

    def on_train_end(self, trainer, pl_module):
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.keys))


@pytest.mark.slow
def test_resumed_ddp_fit_sees_the_batches_of_an_uninterrupted_fit_on_every_rank(tmp_path, train_urls):
    """Two gloo ranks: rank 0's loader position in the checkpoint serves both ranks (same batches per epoch)."""

    def fit(out: Path, ckpt_path: str | None = None) -> list[list[list[str]]]:
        # 16 samples per epoch over 2 ranks in batches of 3: 3 batches (3, 3, 2) per rank and epoch
        dm = ShardDataModule(
            train_shards=train_urls,
            batch_size=3,
            num_workers=1,
            image_size=8,
            epoch_length=16,
            shuffle_buffer=4,
            seed=7,
        )
        every = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{step}", every_n_train_steps=1, save_top_k=-1)
        trainer = Trainer(
            default_root_dir=tmp_path,
            max_steps=7,
            accelerator="cpu",
            devices=2,
            strategy="ddp_spawn",
            callbacks=[every, RankKeys(out)],
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(KeyRecorder(), datamodule=dm, ckpt_path=ckpt_path)
        return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]

    whole = fit(tmp_path / "whole")
    assert [len(w) for w in whole] == [7, 7] and whole[0][:3] != whole[1][:3]
    resumed = fit(tmp_path / "resumed", ckpt_path=str(tmp_path / "ckpt" / "step=4.ckpt"))  # mid-epoch 1
    assert resumed == [w[4:] for w in whole]
