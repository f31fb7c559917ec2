"""Class labels as a text encoder, to reproduce class-conditional MeanFlow with the same pipeline.

A caption maps to a class id, either by exact lookup in a class list or by a stable hash of the whole
caption into `num_classes` buckets. Each class has one fixed (not learned) embedding: rows of a seeded
random orthogonal matrix scaled to unit RMS per entry, so classes are equally far apart. L = 1.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import torch

from emf_lightning.encoders.base import TextEncoder, TextFeatures
from emf_lightning.utils.model_helpers import short_hash

DEFAULT_NUM_CLASSES = 1000


def orthogonal_table(rows: int, dim: int, seed: int) -> torch.Tensor:
    """[rows, dim] with orthonormal rows when rows <= dim (else unit rows from orthonormal columns),
    scaled by sqrt(dim) so each entry has RMS 1. Deterministic for a seed."""
    gen = torch.Generator().manual_seed(seed)
    tall = torch.randn(max(rows, dim), min(rows, dim), generator=gen, dtype=torch.float64)
    q, r = torch.linalg.qr(tall)
    q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)  # unique QR: the table depends only on the seed
    table = q.T if rows <= dim else q
    table = table / table.norm(dim=1, keepdim=True)
    return (table * dim**0.5).to(torch.float32).contiguous()


def hash_class(caption: str, num_classes: int) -> int:
    """Stable class id of a caption: blake2b of the UTF-8 string, modulo num_classes."""
    digest = hashlib.blake2b(caption.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") % num_classes


class LabelEncoder(TextEncoder):
    """Caption -> class id -> fixed embedding; tokens [B, 1, dim], pooled = the same vector.

    Args:
        classes: the class names (a caption must equal one of them exactly), or a path to a text file
            with one class per line. Mutually exclusive with `num_classes`.
        num_classes: hash whole captions into this many classes instead (default 1000, as ImageNet).
        dim: embedding width.
        seed: seed of the orthogonal table.
    """

    name = "label"

    def __init__(
        self,
        classes: Sequence[str] | str | None = None,
        num_classes: int | None = None,
        dim: int = 256,
        seed: int = 0,
        batch_size: int = 1024,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
    ):
        super().__init__(batch_size=batch_size, max_length=1, device=device, dtype=dtype)
        if classes is not None and num_classes is not None:
            raise ValueError("LabelEncoder takes `classes` (a list or file) or `num_classes`, not both")
        if classes is None and num_classes is None:
            num_classes = DEFAULT_NUM_CLASSES
        if isinstance(classes, (str, Path)):
            classes = [
                line.rstrip("\n") for line in Path(classes).read_text(encoding="utf-8").splitlines() if line.strip()
            ]
        self.classes = list(classes) if classes is not None else None
        if self.classes is not None:
            if len(set(self.classes)) != len(self.classes):
                raise ValueError("LabelEncoder classes contain duplicates")
            self._index = {c: i for i, c in enumerate(self.classes)}
            num_classes = len(self.classes)
        if not num_classes or num_classes < 1:
            raise ValueError(f"LabelEncoder needs at least one class, got {num_classes}")
        self.num_classes = int(num_classes)
        self.seed = int(seed)
        self._dim = int(dim)
        self.register_buffer("table", orthogonal_table(self.num_classes, self._dim, self.seed), persistent=False)
        self._finish_init()

    @property
    def dim(self) -> int:
        return self._dim

    def _key_parts(self) -> list[str]:
        source = f"classes-{short_hash(chr(0).join(self.classes))}" if self.classes is not None else "hash"
        return [source, f"n{self.num_classes}", f"dim{self._dim}", f"seed{self.seed}"]

    def class_ids(self, captions: list[str]) -> torch.Tensor:
        """Class id per caption, [B] long; unknown captions raise ValueError naming them."""
        if self.classes is None:
            return torch.tensor([hash_class(c, self.num_classes) for c in captions], dtype=torch.long)
        missing = [c for c in captions if c not in self._index]
        if missing:
            raise ValueError(f"{len(missing)} captions are not in the class list, e.g. {missing[0]!r}")
        return torch.tensor([self._index[c] for c in captions], dtype=torch.long)

    def _encode_batch(self, captions: list[str]) -> tuple[TextFeatures, int]:
        pooled = self.table[self.class_ids(captions).to(self.table.device)]
        mask = torch.ones(len(captions), 1, dtype=torch.bool, device=pooled.device)
        return TextFeatures(pooled.unsqueeze(1).clone(), mask, pooled), 0
