"""Serve text features that `emf cache-features` computed earlier, with no text model in memory.

Why: the text model is often the largest thing in a run (a Qwen3 is GBs) or cannot be loaded on the
training machine at all (no hub, no weights there). Encode once where the model is, copy the cache folder,
and train anywhere. A caption that is not in the cache is an error naming it, never a silent zero.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from emf_lightning.encoders.base import TextEncoder, TextFeatures
from emf_lightning.encoders.cache import FeatureCache


class MissingCaptionError(KeyError):
    """A caption asked of a PrecomputedEncoder is not in its cache folder."""


class _SourceKey(TextEncoder):
    """Stands in for the original encoder so FeatureCache can read its parts (never encodes)."""

    name = "source"

    def __init__(self, cache_key: str, dim: int):
        super().__init__()
        self._key, self._dim = cache_key, dim

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def cache_key(self) -> str:  # the folder's own key, so its parts are accepted
        return self._key

    def _encode_batch(self, captions: list[str]) -> tuple[TextFeatures, int]:
        shown = ", ".join(repr(c) for c in captions[:3])
        raise MissingCaptionError(
            f"{len(captions)} caption(s) are not in the precomputed feature cache (e.g. {shown}). "
            f"Run `emf cache-features` with the original encoder over these captions first."
        )


class PrecomputedEncoder(TextEncoder):
    """Text features read from a feature-cache folder written by `emf cache-features` / FeatureCache.

    Args:
        cache_dir: the folder holding ``cache_key.json`` and ``part-*.safetensors`` (i.e.
            ``<root>/<sanitised cache_key>/``), or a root holding exactly one such folder.
        batch_size: captions per lookup chunk (lookups are cheap; kept for the common interface).
        device: where features are returned.
    """

    name = "precomputed"

    def __init__(self, cache_dir: str, batch_size: int = 256, device: torch.device | str | None = None):
        super().__init__(batch_size=batch_size, device=device)
        self.cache_dir = resolve_cache_folder(cache_dir)
        info = json.loads((self.cache_dir / "cache_key.json").read_text())
        self.source_key: str = info["cache_key"]
        self._dim = int(info["dim"])
        self._store = FeatureCache(_SourceKey(self.source_key, self._dim))
        self._store.dir = self.cache_dir
        self._store.reload()
        if len(self._store) == 0:
            raise FileNotFoundError(f"feature cache folder {self.cache_dir} holds no readable captions")
        self._finish_init()

    @property
    def dim(self) -> int:
        return self._dim

    def __len__(self) -> int:
        return len(self._store)

    def _key_parts(self) -> list[str]:
        # A key of its own: a FeatureCache in front of this encoder keeps float32 copies apart from the source.
        return [self.source_key]

    @classmethod
    def weights_available(cls, cache_dir: str | None = None, **kwargs: Any) -> bool:
        if cache_dir is None:
            return False
        try:
            resolve_cache_folder(cache_dir)
        except FileNotFoundError:
            return False
        return True

    def _encode_batch(self, captions: list[str]) -> tuple[TextFeatures, int]:
        missing = [c for c in captions if c not in self._store]
        if missing:
            self._store.encoder.encode(missing)  # raises MissingCaptionError naming them
        features = self._store.encode(captions)
        device = self.device
        return TextFeatures(
            features.tokens.to(device=device, dtype=torch.float32),
            features.mask.to(device),
            features.pooled.to(device=device, dtype=torch.float32),
        ), 0


def resolve_cache_folder(path: str | os.PathLike) -> Path:
    """The cache folder itself, or the single cache folder inside a root."""
    path = Path(path).expanduser()
    if (path / "cache_key.json").is_file():
        return path
    inner = sorted(p.parent for p in path.glob("*/cache_key.json")) if path.is_dir() else []
    if len(inner) == 1:
        return inner[0]
    if len(inner) > 1:
        names = ", ".join(p.name for p in inner)
        raise FileNotFoundError(f"{path} holds several feature caches ({names}); name one of them")
    raise FileNotFoundError(f"no feature cache (cache_key.json) at {path}; write one with `emf cache-features`")


def export_features(
    cache_dir: str | os.PathLike,
    out_root: str | os.PathLike,
    captions: list[str] | None = None,
    dtype: torch.dtype | str = torch.float16,
) -> Path:
    """Copy a feature cache (all of it, or only ``captions``) to ``out_root``, stored as ``dtype``.

    Half precision halves what has to travel to a training machine; PrecomputedEncoder returns float32
    whatever the stored dtype. Returns the new cache folder.
    """
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    source = PrecomputedEncoder(str(cache_dir))
    wanted = list(dict.fromkeys(captions)) if captions is not None else list(source._store._pooled)
    missing = [c for c in wanted if c not in source._store]
    if missing:
        raise MissingCaptionError(
            f"{len(missing)} caption(s) to export are not in {source.cache_dir}, e.g. {missing[:3]}"
        )
    out = FeatureCache(_SourceKey(source.source_key, source.dim), root=out_root)
    for caption in wanted:
        out._tokens[caption] = source._store._tokens[caption].to(dtype)
        out._pooled[caption] = source._store._pooled[caption].to(dtype)
        out._unsaved.append(caption)
    return out.save()
