"""The per-worker sample stream over WebDataset shards: shard selection, decoding, shuffling, batching.

Two modes:

* training (`train=True`): an endless stream of shards drawn with replacement
  (`webdataset.ResampledShards`, seeded per epoch, rank and worker), a shuffle buffer, and exactly
  `samples_per_rank` samples per epoch, divided between the DataLoader workers as evenly as possible;
* evaluation (`train=False`): one ordered pass. Shards are split by node (rank) and then by worker,
  `urls[rank::world_size][worker::num_workers]`: each shard is read by exactly one worker of one rank,
  so nothing is duplicated or dropped, and the order is fixed for a fixed number of ranks and workers.
  (With fewer shards than ranks x workers, some workers get none; write more, smaller shards.)

Batches are dicts {"image": [B,3,H,W] in [-1,1], "caption": [str], "meta": [dict|None], "key": [str],
"skipped": {reason: count}} plus "features" / "latent" when requested. "meta" is the sample's .json (without
"captions"); whether it is a shapes-world scene spec is the consumers' question (`shapes.scene_spec_or_none`: the
data layer knows no world). "skipped" holds the skips this
worker counted since its previous batch; a worker whose samples were all bad yields one empty batch
(B = 0) to report its counts, which `ShardDataModule`'s loader consumes and drops.
"""

from __future__ import annotations

import glob
import io
import json
import os
import random
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from itertools import islice
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from emf_lightning.data.health import (
    BAD_FEATURES,
    BAD_JSON,
    BAD_LATENT,
    EMPTY_CAPTION,
    MISSING_IMAGE,
    UNDECODABLE_CAPTION,
    UNDECODABLE_IMAGE,
    SkipCounter,
)
from emf_lightning.data.tar_reader import iter_shard_samples
from emf_lightning.data.transforms import open_rgb, resize_center_crop
from emf_lightning.errors import ConfigError, InputNotFoundError
from emf_lightning.utils.images import from_uint8

IMAGE_KEYS = ("png", "jpg", "jpeg", "webp", "ppm", "bmp")
FEATURE_KEYS = ("features.npz", "features.npy", "features.pth")
LATENT_KEYS = ("latent.npy", "latent.pth")
FLIPPED_LATENT_KEYS = ("latent_flip.npy", "latent_flip.pth")
CAPTION_SAMPLING = ("first", "random")
_REMOTE_PREFIXES = ("pipe:", "http://", "https://", "s3://", "gs://", "ais://", "hf://")


# ----------------------------------------------------------------------------------------------------------------
# Shard lists


def iter_shards(spec: str | Sequence[str], counter: SkipCounter) -> Iterator[dict[str, Any]]:
    """Every raw sample {"__key__", "__url__", ext: bytes} of the shards, in order: the one shard reader (the data
    module's streams, the probe, `emf cache-features`); damage is counted in ``counter``, never raised."""
    for url in expand_shard_urls(spec):
        yield from iter_shard_samples(url, counter)


def caption_text(raw: dict[str, Any]) -> str:
    """A raw sample's .txt as text ("" without one): the one decoding rule, strict UTF-8, because a caption with
    invalid bytes would otherwise be trained or encoded as U+FFFD text. Raises UnicodeDecodeError."""
    return raw["txt"].decode("utf-8") if "txt" in raw else ""


def expand_shard_urls(spec: str | Sequence[str]) -> list[str]:
    """Expand shard URLs the way webdataset does (brace patterns, '::' lists, ${WDS_VAR}), plus globs.

    Local paths must exist. A spec that is empty or matches no file raises an error naming it.
    """
    specs = [spec] if isinstance(spec, str) else list(spec)
    if not specs or all(not str(s).strip() for s in specs):
        raise ConfigError(
            f"empty shard list {spec!r}: give a path, brace pattern (data/train-{{000000..000009}}.tar) or URL"
        )
    urls: list[str] = []
    for one in specs:
        one = str(one).strip()
        if not one:
            continue
        for url in wds.shardlists.expand_urls(one):
            local = url[len("file:") :] if url.startswith("file:") else url
            if url.startswith(_REMOTE_PREFIXES):
                urls.append(url)  # checked when opened; failures are counted as unreadable shards
            elif glob.has_magic(local):
                matches = sorted(glob.glob(local))
                if not matches:
                    raise InputNotFoundError(
                        f"shard pattern {one!r} matches no files (glob {local!r}): check the "
                        "path, or write shards there with `emf shards`"
                    )
                urls.extend(matches)
            else:
                urls.append(local)
        missing = [u for u in urls if not u.startswith(_REMOTE_PREFIXES) and not _exists(u)]
        if missing:
            shown = ", ".join(repr(m) for m in missing[:3]) + (
                f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            )
            raise InputNotFoundError(
                f"shard pattern {one!r}: {len(missing)} shard file(s) not found: {shown}; check "
                "the pattern's range against the files written"
            )
    if not urls:
        raise ConfigError(f"shard list {spec!r} expands to no shards")
    return urls


def _exists(path: str) -> bool:
    return os.path.isfile(path)


def split_shards(urls: Sequence[str], rank: int, world_size: int, worker: int, num_workers: int) -> list[str]:
    """The shards one worker of one rank reads in an ordered pass: by node first, then by worker."""
    if not (0 <= rank < world_size and 0 <= worker < num_workers):
        raise ValueError(f"invalid split rank={rank}/{world_size} worker={worker}/{num_workers}")
    return list(urls)[rank::world_size][worker::num_workers]


def worker_share(total: int, worker: int, num_workers: int) -> int:
    """How many of `total` samples worker `worker` produces: an even split, the first ones take the rest."""
    return total // num_workers + (1 if worker < total % num_workers else 0)


# ----------------------------------------------------------------------------------------------------------------
# Decoding one sample


@dataclass(frozen=True)
class DecodeOptions:
    """How raw tar samples become training samples (see `ShardDataModule` for each field)."""

    image_size: int = 32
    caption_sampling: str = "first"
    load_features: bool = False
    load_latents: bool = False
    latent_flip: bool = False

    def __post_init__(self) -> None:
        if self.caption_sampling not in CAPTION_SAMPLING:
            raise ConfigError(f"caption_sampling must be one of {CAPTION_SAMPLING}, got {self.caption_sampling!r}")
        if self.load_features and self.caption_sampling != "first":
            raise ConfigError(
                "load_features=True needs caption_sampling='first': precomputed features belong to "
                "the primary caption, not to a random paraphrase"
            )


class MissingLatentsError(ConfigError):
    """A sample has no precomputed latent although the data module was asked to load latents (the wrong shards:
    ``emf`` reports it as one line, exit 2, also from inside DataLoader workers)."""


def _first_key(raw: dict[str, Any], keys: Iterable[str]) -> str | None:
    return next((k for k in keys if k in raw), None)


def _load_array(data: bytes, ext: str) -> Any:
    if ext.endswith(".npz"):
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            return {k: torch.from_numpy(z[k].copy()) for k in z.files}
    if ext.endswith(".npy"):
        return torch.from_numpy(np.load(io.BytesIO(data), allow_pickle=False).copy())
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)  # no arbitrary pickles


def _features(data: bytes, ext: str) -> dict[str, torch.Tensor]:
    obj = _load_array(data, ext)
    tokens = obj["tokens"] if isinstance(obj, dict) else obj
    if not isinstance(tokens, torch.Tensor) or tokens.ndim != 2 or tokens.shape[0] == 0:
        raise ValueError(f"features must hold tokens [L > 0, D], got {getattr(tokens, 'shape', type(tokens))}")
    pooled = obj.get("pooled") if isinstance(obj, dict) else None
    pooled = tokens.float().mean(0) if pooled is None else pooled
    return {"tokens": tokens.float(), "pooled": pooled.float().reshape(-1)}


def decode_sample(
    raw: dict[str, Any], opts: DecodeOptions, rng: random.Random, counter: SkipCounter, train: bool
) -> dict[str, Any] | None:
    """A raw tar sample -> {"image", "caption", "meta", "key"[, "features", "latent"]}, or None (counted).

    "image" is uint8 [H, W, 3] here; `collate` converts whole batches to [-1, 1] floats at once.
    """
    key = raw["__key__"]
    where = f"{raw.get('__url__', '?')}:{key}"
    doc: dict[str, Any] | None = None
    if "json" in raw:
        try:
            doc = json.loads(raw["json"].decode("utf-8"))
            if not isinstance(doc, dict):
                raise ValueError(f"expected a JSON object, got {type(doc).__name__}")
        except (ValueError, UnicodeDecodeError) as exn:
            counter.skip(BAD_JSON, f"{where}: {exn}")
            return None
    paraphrases = [c.strip() for c in (doc or {}).get("captions", []) or [] if isinstance(c, str) and c.strip()]
    try:
        primary = caption_text(raw).strip()
    except UnicodeDecodeError as exn:
        counter.skip(UNDECODABLE_CAPTION, f"{where}.txt: not UTF-8: {exn}")
        return None
    primary = primary or (paraphrases[0] if paraphrases else "")
    if not primary:
        counter.skip(EMPTY_CAPTION, f"{where}: no caption (.txt missing or empty, no 'captions' in .json)")
        return None
    image_key = _first_key(raw, IMAGE_KEYS)
    if image_key is None:
        counter.skip(
            MISSING_IMAGE,
            f"{where}: no image ({', '.join(IMAGE_KEYS)}) in sample with "
            f"members {sorted(k for k in raw if not k.startswith('__'))}",
        )
        return None
    try:
        image = np.array(resize_center_crop(open_rgb(raw[image_key]), opts.image_size), dtype=np.uint8)
    except Exception as exn:  # Pillow raises many types for damaged data
        counter.skip(UNDECODABLE_IMAGE, f"{where}.{image_key}: {type(exn).__name__}: {exn}")
        return None
    out: dict[str, Any] = {"image": image, "key": key}
    if opts.load_features:
        fkey = _first_key(raw, FEATURE_KEYS)
        try:
            if fkey is None:
                raise KeyError(f"no precomputed features ({', '.join(FEATURE_KEYS)})")
            out["features"] = _features(raw[fkey], fkey)
        except Exception as exn:
            counter.skip(BAD_FEATURES, f"{where}: {type(exn).__name__}: {exn}")
            return None
    if opts.load_latents:
        lkey = _first_key(raw, LATENT_KEYS)
        if lkey is None:  # not bad data but the wrong shards: stop with what to do instead of skipping everything
            raise MissingLatentsError(
                f"{where}: no precomputed latent ({', '.join(LATENT_KEYS)}) but latents were asked for "
                "(load_latents=True): these shards were written without latents. Encode them once with "
                "`emf cache-latents --vae NAME --shards URLS --out PATTERN` and train on its output shards, or set "
                "data.load_latents=false to encode the images with model.autoencoder on the fly"
            )
        flipped = _first_key(raw, FLIPPED_LATENT_KEYS) if opts.latent_flip and train else None
        if flipped is not None and rng.random() < 0.5:  # the mirrored image's latent, half the time
            lkey = flipped
        try:
            latent = _load_array(raw[lkey], lkey)
            if not isinstance(latent, torch.Tensor):
                raise ValueError(f"latent must be a tensor, got {type(latent).__name__}")
            out["latent"] = latent.float()
        except Exception as exn:
            counter.skip(BAD_LATENT, f"{where}: {type(exn).__name__}: {exn}")
            return None
    caption = primary
    if opts.caption_sampling == "random":
        pool = [primary] + [c for c in paraphrases if c != primary]
        caption = pool[rng.randrange(len(pool))]
    out["caption"] = caption
    meta = {k: v for k, v in (doc or {}).items() if k != "captions"}
    out["meta"] = meta or None
    return out


# ----------------------------------------------------------------------------------------------------------------
# Batching


def collate(samples: list[dict[str, Any]], skipped: dict[str, int], image_size: int) -> dict[str, Any]:
    """Stack samples into a batch; variable-length feature tokens are right-padded with zeros and masked."""
    if not samples:
        return {
            "image": torch.empty(0, 3, image_size, image_size),
            "caption": [],
            "meta": [],
            "key": [],
            "skipped": skipped,
        }
    batch: dict[str, Any] = {
        "image": from_uint8(np.stack([s["image"] for s in samples])),
        "caption": [s["caption"] for s in samples],
        "meta": [s["meta"] for s in samples],
        "key": [s["key"] for s in samples],
        "skipped": skipped,
    }
    if "features" in samples[0]:
        toks = [s["features"]["tokens"] for s in samples]
        dims = {t.shape[1] for t in toks}
        if len(dims) != 1:
            raise ValueError(
                f"precomputed features of different widths in one batch: {sorted(dims)}; the shards mix encoders"
            )
        length = max(t.shape[0] for t in toks)
        tokens = torch.zeros(len(toks), length, dims.pop())
        mask = torch.zeros(len(toks), length, dtype=torch.bool)
        for i, t in enumerate(toks):
            tokens[i, : t.shape[0]] = t
            mask[i, : t.shape[0]] = True
        batch["features"] = {
            "tokens": tokens,
            "mask": mask,
            "pooled": torch.stack([s["features"]["pooled"] for s in samples]),
        }
    if "latent" in samples[0]:
        batch["latent"] = torch.stack([s["latent"] for s in samples])
    return batch


def batches(
    samples: Iterable[dict[str, Any]], batch_size: int, counter: SkipCounter, image_size: int
) -> Iterator[dict[str, Any]]:
    """Group samples into batches (the last may be partial), each carrying the skips counted so far.

    One full batch is held back until the next one is complete or the stream ends, so skips that
    happen after the last sample still ride on the final batch. With no sample at all but some skips,
    one empty batch carries the counts.
    """
    ready: list[dict[str, Any]] | None = None
    buf: list[dict[str, Any]] = []
    for sample in samples:
        buf.append(sample)
        if len(buf) == batch_size:
            if ready is not None:
                yield collate(ready, counter.drain(), image_size)
            ready, buf = buf, []
    tail = [b for b in (ready, buf) if b]
    for chunk in tail:
        yield collate(chunk, counter.drain(), image_size)
    if not tail and counter:
        yield collate([], counter.drain(), image_size)


# ----------------------------------------------------------------------------------------------------------------
# The dataset


class ShardStream(IterableDataset):
    """An iterable of batches over WebDataset shards, for one rank; split between DataLoader workers.

    Args:
        urls: expanded shard URLs (see `expand_shard_urls`).
        batch_size: samples per batch (the last batch of a worker may be smaller).
        train: resampled endless shards + shuffle + caption dropout, `samples_per_rank` per epoch;
            otherwise one ordered pass split by rank and worker.
        samples_per_rank: training only: samples this rank yields per epoch.
        options: decoding options.
        shuffle_buffer: training only: samples in the shuffle buffer (0 or 1: no shuffle).
        seed: base seed; the stream is a deterministic function of (seed, epoch, rank, worker).
        rank, world_size: this process's place in the distributed job (captured in the main process,
            because DataLoader workers may not see torch.distributed).
    """

    def __init__(
        self,
        urls: Sequence[str],
        batch_size: int,
        train: bool,
        options: DecodeOptions,
        samples_per_rank: int | None = None,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        super().__init__()
        # batch size and decode options are checked where the user sets them (ShardDataModule, DecodeOptions)
        if train and (samples_per_rank is None or samples_per_rank < 1):
            raise ValueError(f"a training stream needs samples_per_rank >= 1, got {samples_per_rank}")
        self.urls = list(urls)
        self.batch_size = batch_size
        self.train = train
        self.options = options
        self.samples_per_rank = samples_per_rank
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.rank, self.world_size = rank, world_size
        # Shared memory, so the epoch the main process sets reaches persistent and fresh workers alike.
        self._epoch = torch.zeros(1, dtype=torch.int64).share_memory_()
        self._counter: SkipCounter | None = None  # one per process (each worker has its own copy)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch: training streams draw different shards, shuffles and dropouts per epoch."""
        self._epoch[0] = int(epoch)

    @property
    def epoch(self) -> int:
        """The current epoch."""
        return int(self._epoch[0])

    def num_batches(self, num_workers: int) -> int | None:
        """Batches per epoch on this rank (training: exact; evaluation: unknown -> None)."""
        if not self.train or self.samples_per_rank is None:
            return None
        workers = max(1, num_workers)
        return sum(-(-worker_share(self.samples_per_rank, w, workers) // self.batch_size) for w in range(workers))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if self._counter is None:
            self._counter = SkipCounter(f"data rank {self.rank} worker {worker}")
        counter = self._counter
        counter.drain()  # counts left over from an abandoned previous iteration belong to no batch of this one
        seed = wds.utils.make_seed(self.seed, self.epoch, self.rank, worker)
        rng = random.Random(seed)
        progress = _Progress()
        if self.train:
            assert self.samples_per_rank is not None
            # worker_seed: webdataset would read the rank from the environment; ours is explicit in `seed`.
            shards = wds.ResampledShards(self.urls, seed=seed, worker_seed=partial(int, 0), deterministic=True)
            # Tiny shards could all sit in the shuffle buffer before anything is decoded: allow for that.
            limit = 20 * len(self.urls) + self.shuffle_buffer + 100
            raw = _read_shards((d["url"] for d in shards), counter, progress, limit)
            if self.shuffle_buffer > 1:
                # shuffle encoded samples, before decoding: a buffer of raw bytes is far smaller than of tensors
                # start yielding after 100 samples (webdataset's default) while the buffer keeps filling:
                # each epoch restarts the stream, and a full fill first would delay every epoch's start
                raw = wds.shuffle(
                    self.shuffle_buffer, initial=min(100, self.shuffle_buffer), rng=random.Random(seed + 1)
                )(raw)
            samples = _decode_all(raw, self.options, rng, counter, progress, train=True)
            samples = islice(samples, worker_share(self.samples_per_rank, worker, num_workers))
        else:
            urls = split_shards(self.urls, self.rank, self.world_size, worker, num_workers)
            raw = _read_shards(iter(urls), counter, progress, limit=None)
            samples = _decode_all(raw, self.options, rng, counter, progress, train=False)
        yield from batches(samples, self.batch_size, counter, self.options.image_size)


class _Progress:
    """Good samples decoded so far in this iteration (read by the shard reader's no-progress guard)."""

    def __init__(self) -> None:
        self.good = 0


def _read_shards(
    urls: Iterator[str], counter: SkipCounter, progress: _Progress, limit: int | None
) -> Iterator[dict[str, Any]]:
    """Raw samples of each shard in turn. With `limit`, stop with an error after that many consecutive
    shards during which no good sample was decoded: an endless resampled stream over shards that are
    all bad would otherwise spin forever (a few bad shards never trip it)."""
    barren, seen_good, first = 0, -1, None
    for url in urls:
        first = first or url
        yield from iter_shard_samples(url, counter)
        barren = barren + 1 if progress.good == seen_good else 0
        seen_good = progress.good
        if limit is not None and barren >= limit:
            raise RuntimeError(
                f"no valid sample decoded while reading the last {barren} shards (e.g. {first!r}); "
                f"skipped: {counter.drain()}"
            )


def _decode_all(
    raw: Iterable[dict[str, Any]],
    opts: DecodeOptions,
    rng: random.Random,
    counter: SkipCounter,
    progress: _Progress,
    train: bool,
) -> Iterator[dict[str, Any]]:
    for r in raw:
        sample = decode_sample(r, opts, rng, counter, train)
        if sample is not None:
            progress.good += 1
            yield sample


__all__ = [
    "ShardStream",
    "DecodeOptions",
    "MissingLatentsError",
    "expand_shard_urls",
    "split_shards",
    "worker_share",
    "decode_sample",
    "collate",
    "batches",
    "IMAGE_KEYS",
]


def captions_from_shards(spec: str, skipped: Counter, paraphrases: bool = True) -> Iterator[str]:
    """Captions of WebDataset shards: each sample's .txt, plus its .json 'captions' list unless disabled. Read as
    the data module reads them (``data.pipeline.iter_shards``, ``caption_text``); unreadable shards or samples
    are skipped, counted and logged."""
    counter = SkipCounter("cache-features")
    for sample in iter_shards(spec, counter):
        try:
            found = [caption_text(sample)]
        except UnicodeDecodeError:  # training skips such a sample: no features for a caption it never sees
            skipped["caption not UTF-8"] += 1
            continue
        if paraphrases and sample.get("json") is not None:
            try:
                doc = json.loads(sample["json"])
            except (json.JSONDecodeError, UnicodeDecodeError):
                skipped["bad .json"] += 1
                doc = {}
            found.extend(c for c in (doc.get("captions") or []) if isinstance(c, str))
        found = [c.strip() for c in found if c.strip()]
        if not found:
            skipped["sample without caption"] += 1
        yield from found
    skipped.update(counter.drain())  # damaged or unreadable shards, by the data module's reasons
