"""Shared tiny fixtures for tests: shapes-world shards on disk, a fast encoder, tiny module kwargs.

Import from tests as ``from helpers import ...`` (pytest puts ``tests/`` on ``sys.path``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from emf_lightning.data.shapes import ShapesWorld
from emf_lightning.data.shards import ShardSample, write_shards

# A generator small enough for a CPU training step in ~0.1 s at 16x16.
TINY_BACKBONE: dict[str, Any] = {"hidden_size": 32, "depth": 1, "num_heads": 2}


def write_shapes_shards(root: str | Path, n_train: int = 8, n_val: int = 4, resolution: int = 16,
                        seed: int = 0, per_shard: int = 4) -> dict[str, str]:
    """Write shapes-world train/val shards under ``root``; returns ``{"train": url, "val": url}``.

    The URLs are brace patterns (``.../train-{000000..000001}.tar``) as the datamodule takes them.
    """
    root = Path(root)
    urls = {}
    for split, n in (("train", n_train), ("val", n_val)):
        world = ShapesWorld(seed=seed, resolution=resolution, split=split, size=n)
        samples = (
            ShardSample(key=s.key, image=s.image, caption=s.caption, captions=s.captions, meta=s.spec)
            for s in (world[i] for i in range(n))
        )
        result = write_shards(samples, str(root / f"{split}-%06d.tar"), maxcount=per_shard)
        urls[split] = result.urls
    return urls


def shapes_batch(n: int = 4, resolution: int = 16, seed: int = 0) -> dict[str, Any]:
    """An in-memory batch in the datamodule's format: image [-1, 1] BCHW, caption, spec, key."""
    from emf_lightning.utils.images import from_uint8

    world = ShapesWorld(seed=seed, resolution=resolution, split="train", size=n)
    items = [world[i] for i in range(n)]
    return {
        "image": torch.stack([from_uint8(s.image) for s in items]),
        "caption": [s.caption for s in items],
        "spec": [s.spec for s in items],
        "key": [s.key for s in items],
    }
