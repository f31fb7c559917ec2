"""`ShardDataModule`: a LightningDataModule over WebDataset shards.

Training reads an endless stream of shards drawn with replacement, shuffled, with exactly
`epoch_length` samples per epoch (summed over ranks); validation, test and predict read every shard once,
in a fixed order, split between ranks and workers without duplicates or gaps (see `data/pipeline.py`).
Bad input is skipped and counted; each loader logs a one-line summary at the end of every epoch, and
`callbacks.data_health.DataHealthCallback` sums the counts over ranks and logs them as metrics.
The training loader is resumable: a fit resumed from a mid-epoch checkpoint continues with exactly the
batches an uninterrupted run would have seen (`ShardLoader.state_dict`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

from emf_lightning.data.health import SkipTally
from emf_lightning.data.pipeline import DecodeOptions, ShardStream, expand_shard_urls
from emf_lightning.errors import ConfigError

log = logging.getLogger("emf_lightning.data")

ShardSpec = str | Sequence[str]


class ShardLoader(DataLoader):
    """A DataLoader over a `ShardStream` that advances the stream's epoch and tallies skipped input.

    Each `iter()` is one epoch: it sets the stream's epoch, sums every batch's "skipped" counts into
    `tally` (dropping the empty batches that only carry counts), and logs `tally.summary()` when the
    epoch ends. `len()` is exact for training streams and undefined (TypeError) for ordered passes.

    `sampler` and `batch_sampler` exist only so that Lightning can re-create the loader (it does for
    every predict loader, passing None for both with an iterable dataset); the stream batches itself.

    Resumable (Lightning's stateful-loader protocol): `state_dict()` is the position, (epoch, batches handed
    out in it), which Lightning stores in every checkpoint of a fit; `load_state_dict()` on resume makes the
    next `iter()` replay that epoch and drop the batches already trained on. The stream is a pure function of
    (seed, epoch, rank, worker) and batches arrive from the workers in a fixed round-robin, so the resumed
    run sees exactly the batches an uninterrupted run would have (same data layout assumed: a different
    number of workers, ranks, batch size or shards is warned about and resumes at the same position only).
    """

    def __init__(
        self,
        stream: ShardStream,
        label: str,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        start_epoch: int = 0,
        timeout: float = 0.0,
        sampler: None = None,
        batch_sampler: None = None,
    ) -> None:
        if sampler is not None or batch_sampler is not None:
            raise ValueError(
                "ShardLoader takes no sampler or batch_sampler: its ShardStream shards, shuffles and batches by itself"
            )
        kwargs: dict[str, Any] = {}
        if num_workers > 0:
            kwargs["persistent_workers"] = persistent_workers
        # batch_size=None: the stream batches inside each worker (far less inter-process traffic)
        super().__init__(
            stream, batch_size=None, num_workers=num_workers, pin_memory=pin_memory, timeout=timeout, **kwargs
        )
        self.label = label
        self.tally = SkipTally()
        self.next_epoch = start_epoch
        self._length = stream.num_batches(num_workers)
        self._position = (start_epoch, 0)  # (epoch, batches handed out in it): what a checkpoint saves
        self._replay = 0  # batches of the next epoch to drop on resume (a restored checkpoint trained on them)

    def __len__(self) -> int:
        if self._length is None:
            raise TypeError(f"the {self.label} loader is an ordered pass over shards of unknown size; it has no len()")
        return self._length

    def __iter__(self) -> Iterator[dict[str, Any]]:  # type: ignore[override]
        stream: ShardStream = self.dataset  # type: ignore[assignment]
        epoch, replay = self.next_epoch, self._replay
        stream.set_epoch(epoch)
        self.next_epoch, self._replay = epoch + 1, 0
        self._position = (epoch, 0)
        self.tally.reset()
        if replay:
            log.info(
                "%s: resuming epoch %d after %d batches: replaying the stream to that point", self.label, epoch, replay
            )
        for batch in super().__iter__():
            self.tally.add(batch.get("skipped"), len(batch["key"]))
            if batch["key"]:
                self._position = (epoch, self._position[1] + 1)
                if self._position[1] <= replay:
                    continue  # trained on before the checkpoint this run resumed from
                yield batch
        message = self.tally.summary(f"{self.label} epoch {stream.epoch}")
        log.log(logging.WARNING if self.tally.counts else logging.INFO, message)

    def _layout(self) -> dict[str, Any]:
        """What, besides (seed, epoch, rank, worker), decides which batch comes when."""
        stream: ShardStream = self.dataset  # type: ignore[assignment]
        return {
            "seed": stream.seed,
            "shards": len(stream.urls),
            "batch_size": stream.batch_size,
            "num_workers": self.num_workers,
            "world_size": stream.world_size,
            "samples_per_rank": stream.samples_per_rank,
            "shuffle_buffer": stream.shuffle_buffer,
            "options": dataclasses.asdict(stream.options),
        }

    def state_dict(self) -> dict[str, Any]:
        """The stream's position: {"epoch", "batches" handed out in that epoch, "layout"}. Every rank is at the
        same position (same batches per epoch), so rank 0's copy in the checkpoint serves all ranks."""
        epoch, batches = self._position
        return {"epoch": epoch, "batches": batches, "layout": self._layout()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved position: the next `iter()` replays its epoch and drops the batches handed out."""
        epoch, batches = int(state["epoch"]), int(state["batches"])
        if self._length is not None and batches >= self._length:
            epoch, batches = epoch + 1, 0  # the saved epoch was complete
        if epoch < self.next_epoch:
            return  # the trainer has moved past that epoch already (e.g. limit_train_batches ended it)
        saved = state.get("layout")
        now = self._layout()
        if saved is not None and saved != now:
            changed = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
            log.warning(
                "%s: resuming at epoch %d batch %d, but the data layout changed since the checkpoint (%s): "
                "the stream continues from the same position, not with the samples an uninterrupted run "
                "would have seen",
                self.label,
                epoch,
                batches,
                ", ".join(changed),
            )
        self.next_epoch, self._replay = epoch, batches


class ShardDataModule(LightningDataModule):
    """WebDataset shards -> batches {"image" [B,3,H,W] in [-1,1], "caption", "meta", "key", "skipped"}.

    "meta" is each sample's .json (without "captions"): a shapes-world scene spec or other datasets' metadata
    (e.g. img2dataset's url/width/height/status); consumers tell them apart (`shapes.scene_spec_or_none`).

    Args:
        train_shards: training shards: a brace pattern ("data/train-{000000..000099}.tar"), a glob, a
            path, any URL webdataset opens (pipe:, http://), or a list of those.
        val_shards: validation shards (same forms); optional for `fit`.
        test_shards: test shards; defaults to `val_shards`.
        predict_shards: shards whose captions `emf predict` generates images for (one ordered pass, like
            test); defaults to `val_shards`.
        batch_size: samples per training batch (per rank).
        val_batch_size: samples per validation/test/predict batch; defaults to `batch_size`.
        num_workers: DataLoader worker processes per rank.
        image_size: output side: resize the shorter side, centre crop, normalise to [-1, 1].
        shuffle_buffer: training samples (encoded) in the shuffle buffer; <= 1 disables shuffling.
        epoch_length: training samples per epoch, summed over all ranks (must divide by world size);
            the stream is endless, so this only sets where an epoch ends. A fit resumed mid-epoch replays
            that epoch's data loading up to where it stopped (see `ShardLoader`), so this also bounds that.
        caption_sampling: "first" = the primary caption (.txt); "random" = a random one among the
            primary caption and the paraphrases in the .json "captions".
        seed: every random choice (shards, shuffle, captions, latent flips) is a function of
            (seed, epoch, rank, worker).
        load_features: read precomputed text features (<key>.features.npz/.npy/.pth) into
            batch["features"] = {"tokens" [B,L,D], "mask" [B,L], "pooled" [B,D]}; they belong to the
            primary caption, so this needs caption_sampling="first". (Condition dropout for classifier-free
            guidance is the loss's ``cond_drop_prob``.)
        load_latents: read precomputed latents (<key>.latent.npy/.pth, written by `emf cache-latents`) into
            batch["latent"]; a sample without one raises `MissingLatentsError` (the shards lack latents).
        latent_flip: training only: take the latent of the mirrored image (<key>.latent_flip.npy, written by
            `emf cache-latents --flip`) half the time, the latent form of a random horizontal flip. Off by
            default: a caption that names left and right no longer matches a mirrored image.
        pin_memory, persistent_workers: passed to the DataLoader.
    """

    def __init__(
        self,
        train_shards: ShardSpec | None = None,
        val_shards: ShardSpec | None = None,
        test_shards: ShardSpec | None = None,
        predict_shards: ShardSpec | None = None,
        batch_size: int = 64,
        val_batch_size: int | None = None,
        num_workers: int = 2,
        image_size: int = 32,
        shuffle_buffer: int = 1000,
        epoch_length: int = 10_000,
        caption_sampling: str = "first",
        seed: int = 0,
        load_features: bool = False,
        load_latents: bool = False,
        latent_flip: bool = False,
        pin_memory: bool = False,
        persistent_workers: bool = False,
    ) -> None:
        super().__init__()
        # the decode options are checked once, here (DecodeOptions), and the streams trust them
        self.decode = DecodeOptions(image_size, caption_sampling, load_features, load_latents, latent_flip)
        for name, value in (("batch_size", batch_size), ("image_size", image_size), ("epoch_length", epoch_length)):
            if value < 1:
                raise ConfigError(f"{name} must be >= 1, got {value}")
        if num_workers < 0:
            raise ConfigError(f"num_workers must be >= 0, got {num_workers}")
        self.save_hyperparameters()
        self.train_shards, self.val_shards, self.test_shards = train_shards, val_shards, test_shards
        self.predict_shards = predict_shards
        self.batch_size, self.val_batch_size = batch_size, val_batch_size or batch_size
        self.num_workers, self.image_size = num_workers, image_size
        self.shuffle_buffer, self.epoch_length, self.seed = shuffle_buffer, epoch_length, seed
        self.pin_memory, self.persistent_workers = pin_memory, persistent_workers
        self.rank, self.world_size = 0, 1
        self.streams: dict[str, ShardStream] = {}
        self.loaders: dict[str, ShardLoader] = {}

    # -- setup -------------------------------------------------------------------------------------------------

    def _distributed(self) -> tuple[int, int]:
        """(rank, world size) of this process: from the Trainer, torch.distributed or the environment."""
        trainer = self.trainer
        if trainer is not None:
            return trainer.global_rank, trainer.world_size
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))

    def _eval_stream(self, spec: ShardSpec, label: str) -> ShardStream:
        urls = expand_shard_urls(spec)
        if len(urls) < self.world_size:
            # A rank with no batch never joins the other ranks' metric sync (sync_dist, all_gather), and they
            # wait for it forever (seen with 1 val shard on 2 DDP ranks): refuse it up front.
            raise ConfigError(
                f"{label}: {len(urls)} shard(s) for {self.world_size} ranks; every rank needs at least "
                "one shard. Write more, smaller shards (emf shards --maxcount)"
            )
        readers = self.world_size * max(1, self.num_workers)
        if len(urls) < readers:
            log.info(
                "%s: %d shard(s) for %d rank(s) x %d worker(s): some readers get no shard (nothing is lost)",
                label,
                len(urls),
                self.world_size,
                max(1, self.num_workers),
            )
        return ShardStream(
            urls,
            self.val_batch_size,
            train=False,
            options=self.decode,
            seed=self.seed,
            rank=self.rank,
            world_size=self.world_size,
        )

    def setup(self, stage: str | None = None) -> None:
        """Expand and check the shard lists needed for `stage` ("fit", "validate", "test", "predict"; None: all
        given)."""
        self.rank, self.world_size = self._distributed()
        if stage in ("fit", None) and (self.train_shards is not None or stage == "fit"):
            if self.train_shards is None:
                raise ConfigError("ShardDataModule: train_shards is required to fit")
            if self.epoch_length % self.world_size:
                raise ConfigError(
                    f"epoch_length={self.epoch_length} must be divisible by the world size "
                    f"{self.world_size} (each rank yields epoch_length / world_size samples)"
                )
            self.streams["train"] = ShardStream(
                expand_shard_urls(self.train_shards),
                self.batch_size,
                train=True,
                options=self.decode,
                samples_per_rank=self.epoch_length // self.world_size,
                shuffle_buffer=self.shuffle_buffer,
                seed=self.seed,
                rank=self.rank,
                world_size=self.world_size,
            )
        if stage in ("fit", "validate", None) and self.val_shards is not None:
            self.streams["val"] = self._eval_stream(self.val_shards, "val")
        if stage == "validate" and self.val_shards is None:
            raise ConfigError("ShardDataModule: val_shards is required to validate")
        test_shards = self.test_shards if self.test_shards is not None else self.val_shards
        if stage in ("test", None) and test_shards is not None:
            self.streams["test"] = self._eval_stream(test_shards, "test")
        if stage == "test" and "test" not in self.streams:
            raise ConfigError("ShardDataModule: test_shards (or val_shards) is required to test")
        predict_shards = self.predict_shards if self.predict_shards is not None else self.val_shards
        if stage in ("predict", None) and predict_shards is not None:
            self.streams["predict"] = self._eval_stream(predict_shards, "predict")
        if stage == "predict" and "predict" not in self.streams:
            raise ConfigError("ShardDataModule: predict_shards (or val_shards) is required to predict")

    # -- loaders -----------------------------------------------------------------------------------------------

    def _loader(self, name: str) -> ShardLoader:
        if name not in self.streams:
            self.setup({"train": "fit", "val": "validate", "test": "test", "predict": "predict"}[name])
        trainer = self.trainer
        start = trainer.current_epoch if (trainer is not None and name == "train") else 0  # resume-aware
        loader = ShardLoader(
            self.streams[name],
            label=name,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
            start_epoch=start,
        )
        self.loaders[name] = loader
        return loader

    def train_dataloader(self) -> ShardLoader:
        """The resampled training stream: `len()` = batches per epoch on this rank (exact)."""
        # Lightning warns that an IterableDataset's len() may be wrong with several workers; ours is
        # exact by construction (each worker yields a fixed share of the epoch).
        warnings.filterwarnings("ignore", message=r".*`IterableDataset` has `__len__` defined.*")
        return self._loader("train")

    def val_dataloader(self) -> ShardLoader:
        """One ordered pass over the validation shards (split by rank and worker)."""
        return self._loader("val")

    def test_dataloader(self) -> ShardLoader:
        """One ordered pass over the test shards (default: the validation shards)."""
        return self._loader("test")

    def predict_dataloader(self) -> ShardLoader:
        """One ordered pass over the predict shards (default: the validation shards), split by rank and
        worker: every caption is generated for exactly once."""
        # Lightning cannot index batches of an iterable dataset; the prediction writers use the batch keys.
        warnings.filterwarnings("ignore", message=r".*Couldn't infer the batch indices fetched from your dataloader.*")
        return self._loader("predict")
