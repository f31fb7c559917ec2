"""Writing standard WebDataset tar shards, plus a JSON manifest next to them.

A sample in a shard is a group of tar members sharing a key:

    <key>.png | .jpg | .webp   the image, stored as encoded (no re-encoding of JPEGs)
    <key>.txt                  the primary caption (UTF-8)
    <key>.json                 optional: scene spec / metadata, plus "captions" (all phrasings, primary first)
    <key>.features.npz         optional: precomputed text features {"tokens": [L, D], "pooled": [D]}
    <key>.latent.npy           optional: a precomputed autoencoder latent [C, h, w]

Plain `tar -tf`, Python's `tarfile` and `webdataset.WebDataset` all read these shards. The tar headers
use a fixed mtime and owner, so the same samples give byte-identical shards.
"""

from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds

from emf_lightning.data.transforms import encode_png

_PRINTF_INT = re.compile(r"%(0?)(\d*)d")
MANIFEST_FORMAT = "emf-lightning-shards/1"


@dataclass
class ShardSample:
    """One sample to write. `image` is encoded bytes (with `image_format` its extension) or uint8 HxWx3."""

    key: str
    image: bytes | np.ndarray
    caption: str
    image_format: str = "png"
    captions: list[str] | None = None  # every phrasing, primary first; stored in the .json
    meta: dict[str, Any] | None = None  # e.g. the shapes-world scene spec; stored in the .json
    features: dict[str, np.ndarray] | None = None  # {"tokens": [L, D], "pooled": [D]}
    latent: np.ndarray | None = None

    def to_wds(self) -> dict[str, Any]:
        """The sample as a webdataset dict of bytes, e.g. {"__key__": k, "png": b"...", "txt": b"..."}."""
        key = sanitize_key(self.key)
        if not self.caption or not self.caption.strip():
            raise ValueError(f"sample {self.key!r} has an empty caption")
        if isinstance(self.image, np.ndarray):
            ext, image = "png", encode_png(self.image)
        else:
            ext, image = normalize_image_ext(self.image_format), bytes(self.image)
        out: dict[str, Any] = {"__key__": key, ext: image, "txt": self.caption.encode("utf-8")}
        doc = dict(self.meta or {})
        if self.captions:
            doc["captions"] = list(self.captions)
        if doc:
            # sort_keys: the same sample always gives the same bytes
            out["json"] = json.dumps(doc, sort_keys=True, ensure_ascii=False).encode("utf-8")
        if self.features is not None:
            buf = io.BytesIO()
            np.savez(buf, **{k: np.asarray(v) for k, v in self.features.items()})
            out["features.npz"] = buf.getvalue()
        if self.latent is not None:
            buf = io.BytesIO()
            np.save(buf, np.asarray(self.latent), allow_pickle=False)
            out["latent.npy"] = buf.getvalue()
        return out


def sanitize_key(key: str) -> str:
    """Make a key safe for WebDataset: it ends at the first dot of a file name, so dots become '_'."""
    parts = [p for p in str(key).replace("\\", "/").split("/") if p not in ("", ".", "..")]
    if not parts:
        raise ValueError(f"invalid sample key {key!r}")
    parts[-1] = parts[-1].replace(".", "_")
    key = "/".join(parts)
    if key.startswith("__"):  # webdataset reserves __name__ for metadata
        key = "k" + key
    return key


def normalize_image_ext(fmt: str) -> str:
    """'JPEG' / '.jpeg' / 'jpg' -> 'jpg'; 'PNG' -> 'png'; the extension readers look for."""
    fmt = fmt.lower().lstrip(".")
    return {"jpeg": "jpg"}.get(fmt, fmt)


def manifest_path(pattern: str) -> Path:
    """Where the manifest of `pattern` lives: 'out/train-%06d.tar' -> 'out/train.manifest.json'."""
    p = Path(pattern)
    stem = _PRINTF_INT.split(p.name)[0].rstrip("-_.")
    return p.parent / (f"{stem}.manifest.json" if stem else "manifest.json")


def brace_url(pattern: str, n_shards: int) -> str:
    """The brace pattern covering shards 0..n-1 of a printf pattern: 'a-%06d.tar' -> 'a-{000000..000009}.tar'."""
    m = _PRINTF_INT.search(pattern)
    if m is None:
        raise ValueError(f"shard pattern {pattern!r} needs an integer field such as %06d")
    if n_shards == 1:
        return pattern % 0
    width = int(m.group(2)) if m.group(1) == "0" and m.group(2) else 0
    span = "{" + f"{0:0{width}d}..{n_shards - 1:0{width}d}" + "}" if width else "{" + f"0..{n_shards - 1}" + "}"
    return pattern[: m.start()] + span + pattern[m.end() :]


@dataclass
class WriteResult:
    """What `write_shards` wrote; also saved as the manifest JSON."""

    pattern: str
    urls: str  # brace pattern of every shard written, ready for ShardDataModule
    shards: list[dict[str, Any]] = field(default_factory=list)  # [{"name", "count"}]
    total: int = 0
    source: dict[str, Any] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    features: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        """The manifest document."""
        doc = {
            "format": MANIFEST_FORMAT,
            "pattern": self.pattern,
            "urls": self.urls,
            "total": self.total,
            "shards": self.shards,
            "source": self.source,
            "skipped": self.skipped,
        }
        if self.features is not None:
            doc["features"] = self.features
        return doc


def write_shards(
    samples: Iterable[ShardSample],
    pattern: str,
    maxcount: int = 1000,
    maxsize: float = 1e9,
    source: dict[str, Any] | None = None,
    skipped: Callable[[], dict[str, int]] | None = None,
    features: dict[str, Any] | None = None,
    mtime: int = 0,
) -> WriteResult:
    """Write `samples` into tar shards named by the printf `pattern` (e.g. 'out/train-%06d.tar').

    A new shard starts after `maxcount` samples or `maxsize` bytes. Keys must be unique. `source`
    (how the samples were made: kind, seed, ...) and `skipped()` (the source's skip counts, read after
    the last sample) go into the manifest, written last, at `manifest_path(pattern)`. `mtime` is
    the tar members' time stamp: an integer, since a fractional one makes tarfile add a PAX header
    to every member (twice the headers, slower reading).
    """
    if _PRINTF_INT.search(pattern) is None:
        raise ValueError(f"shard pattern {pattern!r} needs an integer field such as %06d (e.g. out/train-%06d.tar)")
    if maxcount < 1:
        raise ValueError(f"maxcount must be >= 1, got {maxcount}")
    it = iter(samples)
    first = next(it, None)
    if first is None:
        raise ValueError(f"no samples to write to {pattern!r} (the source is empty or every sample was skipped)")
    Path(pattern).parent.mkdir(parents=True, exist_ok=True)
    result = WriteResult(pattern=pattern, urls="", source=dict(source or {}), features=features)
    seen: set[str] = set()
    writer: wds.ShardWriter | None = None

    def finished(fname: str) -> None:
        assert writer is not None
        result.shards.append({"name": os.path.basename(fname), "count": writer.count})

    # encoder=False: we hand over bytes we encoded ourselves (deterministic PNG/JSON, no pickle)
    writer = wds.ShardWriter(
        pattern,
        maxcount=maxcount,
        maxsize=maxsize,
        post=finished,
        verbose=0,
        encoder=False,
        mtime=int(mtime),
        user="emf",
        group="emf",
        mode=0o644,
    )
    try:
        for sample in _chain(first, it):
            record = sample.to_wds()
            if record["__key__"] in seen:
                raise ValueError(f"duplicate sample key {record['__key__']!r}: keys must be unique")
            seen.add(record["__key__"])
            writer.write(record)
            result.total += 1
    finally:
        writer.close()
    result.urls = str(Path(pattern).parent / brace_url(Path(pattern).name, len(result.shards)))
    if skipped is not None:
        result.skipped = dict(skipped())
    write_manifest(manifest_path(pattern), result.to_json())  # a manifest exists only for a complete set of shards
    return result


def write_manifest(path: Path, doc: dict[str, Any]) -> None:
    """Atomic rewrite: a reader never sees half a manifest."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def read_manifest(pattern_or_path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a manifest given its path or the shard pattern it belongs to."""
    p = Path(pattern_or_path)
    if not p.name.endswith(".json"):
        p = manifest_path(str(p))
    return json.loads(p.read_text())


def latent_cache_keys(urls: Iterable[str]) -> dict[str, str]:
    """``{manifest path: autoencoder cache key}`` of the ``emf cache-latents`` manifests that list any of the
    (local) shard ``urls``: the autoencoder their latents were made with."""
    by_folder: dict[Path, set[str]] = {}
    for url in urls:
        path = Path(url)
        if ":" not in url.split("/", 1)[0] and path.is_file():  # local files only (no pipe:, http:)
            by_folder.setdefault(path.parent, set()).add(path.name)
    found: dict[str, str] = {}
    for folder, names in by_folder.items():
        for manifest in sorted(folder.glob("*manifest.json")):
            try:
                doc = json.loads(manifest.read_text())
            except (OSError, ValueError):
                continue
            key = (doc.get("latent") or {}).get("cache_key") if isinstance(doc, dict) else None
            if key and names & {s.get("name") for s in doc.get("shards", []) if isinstance(s, dict)}:
                found[str(manifest)] = str(key)
    return found


def _chain(first: ShardSample, rest: Iterator[ShardSample]) -> Iterator[ShardSample]:
    yield first
    yield from rest


def attach_features(
    samples: Iterable[ShardSample], encode: Callable[[list[str]], Any], batch_size: int = 64, dtype: str = "float32"
) -> Iterator[ShardSample]:
    """Add precomputed text features of each sample's primary caption, computed `batch_size` at a time.

    `encode(captions)` returns an object with `tokens` [B, L, D], `mask` [B, L] and `pooled` [B, D]
    (an `encoders.base.TextFeatures`). Only the real tokens (mask True) are stored.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    it = iter(samples)
    while chunk := list(islice(it, batch_size)):
        feats = encode([s.caption for s in chunk])
        tokens, mask, pooled = (feats.tokens.detach().cpu(), feats.mask.detach().cpu(), feats.pooled.detach().cpu())
        for i, sample in enumerate(chunk):
            sample.features = {
                "tokens": tokens[i][mask[i]].float().numpy().astype(dtype),
                "pooled": pooled[i].float().numpy().astype(dtype),
            }
            yield sample
