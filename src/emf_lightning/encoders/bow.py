"""Bag-of-words baseline: an order-blind negative control for attribute binding.

Every lowercase word gets a fixed pseudo-random vector derived from a hash of (seed, word), so there is
no vocabulary to build and no collisions to worry about. A caption's tokens are its words' vectors in
sorted word order, so "a red circle left of a blue square" and "a blue circle left of a red square"
give *identical* features. A generator conditioned on this encoder cannot tell them apart; comparing it
with real encoders measures how much of a result comes from binding rather than from word presence.
"""

from __future__ import annotations

import hashlib
import re

import torch

from emf_lightning.encoders.base import TextEncoder, TextFeatures

WORD = re.compile(r"\w+(?:'\w+)?", re.UNICODE)
NO_WORDS = "<no-words>"  # stands in for captions made only of punctuation


def caption_words(caption: str) -> list[str]:
    """The caption's lowercase words, sorted: the canonical order that makes features order-blind."""
    return sorted(WORD.findall(caption.lower())) or [NO_WORDS]


class BagOfWordsEncoder(TextEncoder):
    """One fixed random vector per word (entries ~ N(0, 1)); tokens are the sorted words' vectors.

    Args:
        dim: feature width.
        seed: changes every word vector.
        max_length: words kept per caption (the first ones in sorted order, so truncation stays
            order-blind too); longer captions warn.
    """

    name = "bow"

    def __init__(
        self,
        dim: int = 256,
        seed: int = 0,
        max_length: int = 256,
        batch_size: int = 256,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
    ):
        super().__init__(batch_size=batch_size, max_length=max_length, device=device, dtype=dtype)
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        self._dim = int(dim)
        self.seed = int(seed)
        self._vectors: dict[str, torch.Tensor] = {}
        # An empty buffer so .to(device) moves this module (and its outputs) like any other encoder.
        self.register_buffer("_anchor", torch.empty(0), persistent=False)
        self._finish_init()

    @property
    def dim(self) -> int:
        return self._dim

    def _key_parts(self) -> list[str]:
        return [f"dim{self._dim}", f"seed{self.seed}", f"len{self.max_length}"]

    def word_vector(self, word: str) -> torch.Tensor:
        """The fixed vector of `word` (CPU float32), the same in every process."""
        vec = self._vectors.get(word)
        if vec is None:
            digest = hashlib.blake2b(f"{self.seed}\x00{word}".encode(), digest_size=8).digest()
            gen = torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))
            vec = torch.randn(self._dim, generator=gen)
            self._vectors[word] = vec
        return vec

    def _encode_batch(self, captions: list[str]) -> tuple[TextFeatures, int]:
        words = [caption_words(c) for c in captions]
        truncated = sum(len(w) > self.max_length for w in words)
        words = [w[: self.max_length] for w in words]
        length = max(len(w) for w in words)
        tokens = torch.zeros(len(words), length, self._dim)
        mask = torch.zeros(len(words), length, dtype=torch.bool)
        for i, ws in enumerate(words):
            tokens[i, : len(ws)] = torch.stack([self.word_vector(w) for w in ws])
            mask[i, : len(ws)] = True
        pooled = tokens.sum(1) / mask.sum(1, keepdim=True)
        device = self.device
        return TextFeatures(tokens.to(device), mask.to(device), pooled.to(device)), truncated
