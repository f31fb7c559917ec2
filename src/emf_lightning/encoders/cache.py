"""A persistent per-caption cache of text features, keyed by encoder (`cache_key`) and caption.

Frozen encoders are slow on a CPU (an LLM takes tens of milliseconds a caption), and a training run sees
each caption many times. `FeatureCache.encode` computes only captions it has not seen and assembles the
batch exactly as the encoder would (right-padded to the longest caption, zeros in padding).

On disk, `root/<sanitised cache_key>/` holds append-only part files. Each part is one safetensors file:
`tokens` [sum of lengths, D] (only real tokens, concatenated), `pooled` [N, D], `offsets` [N + 1], and
the captions as JSON in the header metadata, so a part is self-describing. Parts are written to a
temporary name and renamed into place, so readers never see half a file and several processes can
add to the same cache at once; duplicates across parts are harmless (the first one loaded wins).
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import Tensor

from emf_lightning.encoders.base import TextEncoder, TextFeatures, check_captions
from emf_lightning.utils.model_helpers import short_hash

log = logging.getLogger(__name__)

FORMAT = "emf-feature-cache"
VERSION = "1"
PART_GLOB = "part-*.safetensors"


def cache_dir_name(cache_key: str) -> str:
    """A filesystem-safe folder name for a cache key; the hash suffix keeps distinct keys distinct even
    when sanitising maps them to the same characters."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", cache_key).strip("._")[:96]
    return f"{safe}-{short_hash(cache_key, 12)}"


class FeatureCache:
    """Caches `encoder.encode` per caption, in memory and (with `root`) on disk.

    Args:
        encoder: the frozen text encoder whose features are cached.
        root: cache folder; features live in `root/<sanitised cache_key>/` and are loaded on construction.
            None keeps the cache in memory only.
        part_size: at most this many captions per part file written by `save()`.
    """

    def __init__(self, encoder: TextEncoder, root: str | os.PathLike | None = None, part_size: int = 50_000):
        self.encoder = encoder
        self.cache_key = encoder.cache_key
        self.dim = encoder.dim
        self.part_size = int(part_size)
        self.dir = Path(root).expanduser() / cache_dir_name(self.cache_key) if root is not None else None
        self._tokens: dict[str, Tensor] = {}  # caption -> [l, D] CPU tensor (real tokens only)
        self._pooled: dict[str, Tensor] = {}  # caption -> [D] CPU tensor
        self._unsaved: list[str] = []
        self._loaded_parts: set[str] = set()
        self.hits = 0  # caption lookups answered without a new encoder computation
        self.misses = 0  # captions computed by the encoder
        self.skipped_parts = 0
        if self.dir is not None and self.dir.is_dir():
            self.reload()

    # -- queries -----------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._pooled)

    def __contains__(self, caption: object) -> bool:
        return caption in self._pooled

    @property
    def unsaved(self) -> int:
        """Captions computed since the last `save()`."""
        return len(self._unsaved)

    def encode(self, captions: list[str]) -> TextFeatures:
        """Features for `captions`, equal to `encoder.encode(captions)`; only uncached captions are computed
        (each once, even if repeated in the call)."""
        captions = check_captions(captions)
        if not captions:
            raise ValueError("encode() got an empty caption list")
        missing = list(dict.fromkeys(c for c in captions if c not in self._pooled))
        self.hits += len(captions) - len(missing)
        if missing:
            self._add(missing, self.encoder.encode(missing))
        return self._assemble(captions)

    def precompute(
        self,
        captions: Iterable[str],
        batch_size: int | None = None,
        log_every: int = 10,
        advance: Callable[[int], None] | None = None,
    ) -> int:
        """Encode every not-yet-cached unique caption in chunks of `batch_size` (default: the encoder's);
        saves each chunk when the cache has a root, so an interrupted run keeps its work.
        `advance(n)` is called after each chunk with its size (a progress bar's counter).
        Returns how many captions were computed."""
        todo = [c for c in dict.fromkeys(check_captions(list(captions))) if c not in self._pooled]
        todo.sort(key=len)  # batches of similar length: less padding to compute
        step = int(batch_size or self.encoder.batch_size)
        start = time.perf_counter()
        for i, lo in enumerate(range(0, len(todo), step)):
            chunk = todo[lo : lo + step]
            self._add(chunk, self.encoder.encode(chunk))
            if self.dir is not None:
                self.save()
            if advance is not None:
                advance(len(chunk))
            if log_every and (i + 1) % log_every == 0:
                done = lo + len(chunk)
                rate = done / max(time.perf_counter() - start, 1e-9)
                log.info("feature cache: %d/%d captions (%.1f/s)", done, len(todo), rate)
        return len(todo)

    # -- persistence -------------------------------------------------------------------------------
    def save(self) -> Path | None:
        """Write captions computed since the last save as new part file(s); returns the cache folder
        (None for an in-memory cache)."""
        if self.dir is None or not self._unsaved:
            return self.dir
        from safetensors.torch import save_file

        self.dir.mkdir(parents=True, exist_ok=True)
        self._write_key_file()
        for lo in range(0, len(self._unsaved), self.part_size):
            chunk = self._unsaved[lo : lo + self.part_size]
            rows = [self._tokens[c] for c in chunk]
            lengths = torch.tensor([0] + [r.shape[0] for r in rows], dtype=torch.long)
            tensors = {
                "tokens": torch.cat(rows).contiguous(),
                "pooled": torch.stack([self._pooled[c] for c in chunk]).contiguous(),
                "offsets": lengths.cumsum(0),
            }
            metadata = {
                "format": FORMAT,
                "version": VERSION,
                "cache_key": self.cache_key,
                "captions": json.dumps(chunk),
            }
            name = f"part-{time.time_ns()}-{os.getpid()}-{uuid.uuid4().hex[:8]}.safetensors"
            tmp = self.dir / f".tmp-{name}"
            save_file(tensors, str(tmp), metadata=metadata)
            os.replace(tmp, self.dir / name)  # atomic: readers see the whole part or nothing
            self._loaded_parts.add(name)
        self._unsaved.clear()
        return self.dir

    def reload(self) -> int:
        """Load part files not loaded yet (e.g. written by another process); returns captions added.
        An unreadable or foreign part is skipped with a warning and counted in `skipped_parts`."""
        if self.dir is None or not self.dir.is_dir():
            return 0
        from safetensors import safe_open

        added = 0
        for path in sorted(self.dir.glob(PART_GLOB)):
            if path.name in self._loaded_parts:
                continue
            try:
                with safe_open(str(path), framework="pt") as f:
                    meta = f.metadata() or {}
                    if meta.get("format") != FORMAT or meta.get("cache_key") != self.cache_key:
                        raise ValueError(f"not a part of this cache (cache_key {meta.get('cache_key')!r})")
                    captions = json.loads(meta["captions"])
                    tokens, pooled, offsets = f.get_tensor("tokens"), f.get_tensor("pooled"), f.get_tensor("offsets")
                if pooled.shape != (len(captions), self.dim) or offsets.shape != (len(captions) + 1,):
                    raise ValueError(f"inconsistent shapes {tuple(pooled.shape)}, {tuple(offsets.shape)}")
                if int(offsets[-1]) != tokens.shape[0] or tokens.shape[1:] != (self.dim,):
                    raise ValueError(f"offsets do not match tokens {tuple(tokens.shape)}")
            except Exception as err:  # corrupt, truncated, foreign or vanished file: skip, never crash
                self.skipped_parts += 1
                log.warning("feature cache: skipping unreadable part %s (%s)", path, err)
                continue
            self._loaded_parts.add(path.name)
            bounds = offsets.tolist()
            for i, caption in enumerate(captions):
                if caption not in self._pooled:
                    self._tokens[caption] = tokens[bounds[i] : bounds[i + 1]]
                    self._pooled[caption] = pooled[i]
                    added += 1
        return added

    def compact(self) -> Path | None:
        """Rewrite all parts as one set of parts (fewer files to open); returns the cache folder."""
        if self.dir is None:
            return None
        self.reload()
        old = [p for p in self.dir.glob(PART_GLOB)]
        self._unsaved = list(self._pooled)
        self.save()
        for path in old:
            path.unlink(missing_ok=True)
            self._loaded_parts.discard(path.name)
        return self.dir

    # -- internals ---------------------------------------------------------------------------------
    def _write_key_file(self) -> None:
        key_file = self.dir / "cache_key.json"
        if not key_file.exists():
            tmp = self.dir / f".tmp-key-{uuid.uuid4().hex[:8]}"
            tmp.write_text(
                json.dumps({"cache_key": self.cache_key, "dim": self.dim, "format": FORMAT, "version": VERSION})
            )
            os.replace(tmp, key_file)

    def _add(self, captions: list[str], features: TextFeatures) -> None:
        """Store each row trimmed to its real tokens (padding is zeros, so trimming loses nothing)."""
        if features.dim != self.dim:
            raise ValueError(f"encoder returned width {features.dim}, cache expects {self.dim}")
        tokens, pooled = features.tokens.detach().cpu(), features.pooled.detach().cpu()
        lengths = features.mask.sum(1).tolist()
        for i, caption in enumerate(captions):
            self._tokens[caption] = tokens[i, : lengths[i]].clone()
            self._pooled[caption] = pooled[i].clone()
            self._unsaved.append(caption)
        self.misses += len(captions)

    def _assemble(self, captions: list[str]) -> TextFeatures:
        rows = [self._tokens[c] for c in captions]
        length = max(r.shape[0] for r in rows)
        first = rows[0]
        tokens = torch.zeros(len(rows), length, self.dim, dtype=first.dtype)
        mask = torch.zeros(len(rows), length, dtype=torch.bool)
        for i, r in enumerate(rows):
            tokens[i, : r.shape[0]] = r
            mask[i, : r.shape[0]] = True
        pooled = torch.stack([self._pooled[c] for c in captions])
        device = self.encoder.device
        return TextFeatures(tokens.to(device), mask.to(device), pooled.to(device))
