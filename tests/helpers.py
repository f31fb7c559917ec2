"""Shared tiny fixtures for tests: shapes-world shards on disk, a fast encoder, tiny module kwargs.

Import from tests as ``from helpers import ...`` (pytest puts ``tests/`` on ``sys.path``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import zlib

import torch

from emf_lightning.data.shapes import ShapesWorld
from emf_lightning.data.shards import ShardSample, write_shards
from emf_lightning.encoders.base import TextEncoder, TextFeatures, masked_mean

# A generator small enough for a CPU training step in ~0.1 s at 16x16.
TINY_BACKBONE: dict[str, Any] = {"hidden_size": 32, "depth": 1, "num_heads": 2}
# The same as command-line overrides: `--model.backbone=...`, `--model.encoder=...`.
TINY_DIT = ('{"class_path": "emf_lightning.models.DiT", "init_args": {"preset": "tiny", "input_size": 16, '
            '"patch_size": 4, "hidden_size": 32, "depth": 1, "num_heads": 2}}')
BOW = '{"class_path": "emf_lightning.encoders.BagOfWordsEncoder", "init_args": {"dim": 16}}'


class HashWordEncoder(TextEncoder):
    """A fast deterministic test encoder: one fixed random vector per word (crc32 of the word).

    It builds in microseconds, so module tests don't pay for a transformer; order-aware through a
    position term, so "red circle" and "circle red" differ.
    """

    name = "hashword"

    def __init__(self, width: int = 16, seed: int = 0, batch_size: int = 64, max_length: int | None = None,
                 device: str | None = None, dtype: str | None = None):
        super().__init__(batch_size=batch_size, max_length=max_length, device=device, dtype=dtype)
        self.width, self.seed = int(width), int(seed)
        gen = torch.Generator().manual_seed(self.seed)
        self.table = torch.nn.Parameter(torch.randn(1024, self.width, generator=gen))
        self.position = torch.nn.Parameter(0.1 * torch.randn(64, self.width, generator=gen))
        self._finish_init()

    @property
    def dim(self) -> int:
        return self.width

    def _key_parts(self) -> list[str]:
        return [f"w{self.width}", f"s{self.seed}"]

    def _encode_batch(self, captions: list[str]) -> tuple[TextFeatures, int]:
        ids = [[zlib.crc32(w.encode()) % 1024 for w in c.lower().split()][:64] or [0] for c in captions]
        length = max(map(len, ids))
        tokens = torch.zeros(len(ids), length, self.width, device=self.table.device)
        mask = torch.zeros(len(ids), length, dtype=torch.bool, device=self.table.device)
        for i, row in enumerate(ids):
            idx = torch.tensor(row, device=self.table.device)
            tokens[i, : len(row)] = self.table[idx] + self.position[: len(row)]
            mask[i, : len(row)] = True
        return TextFeatures(tokens, mask, masked_mean(tokens, mask)), 0


class FixedBatches(torch.utils.data.Dataset):
    """Pre-made batches, one per index (DataLoader(batch_size=None) yields them as they are)."""

    def __init__(self, batches: list[dict]):
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> dict:
        return self.batches[i]


def tiny_backbone(**overrides: Any):
    """A one-block DiT at 16x16 with patch 4 (fast on a CPU)."""
    from emf_lightning.models import DiT

    return DiT(**{"preset": "tiny", "input_size": 16, "patch_size": 4, **TINY_BACKBONE, **overrides})


def tiny_module(optim: dict[str, Any] | None = None, **overrides: Any):
    """An EMFModule with HashWordEncoder and ``tiny_backbone`` (fast on a CPU).

    ``optim`` updates the OptimConfig fields on top of lr 1e-3 and EMA decay 0.99; other keyword arguments go to
    EMFModule (``loss=FlowMatchingLoss()``, ``backbone=...``, ``encoder=...``).
    """
    from emf_lightning.training import EMFModule

    kwargs: dict[str, Any] = dict(encoder=HashWordEncoder(), backbone=tiny_backbone(),
                                  optim={"lr": 1e-3, "ema_decay": 0.99, **(optim or {})})
    kwargs.update(overrides)
    return EMFModule(**kwargs)


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


def assert_backbone_jvp_matches_finite_differences(model: torch.nn.Module, z: torch.Tensor, ctx: torch.Tensor,
                                                   mask: torch.Tensor | None) -> None:
    """du/dt along (v, 0, 1) by forward-mode AD equals a float64 central difference, and u the plain forward.

    ``model`` must already be float64 with non-zero weights (zero-initialised branches give a trivial 0 = 0).
    """
    from emf_lightning.models import jvp_safe_attention

    z, ctx = z.double(), ctx.double()
    r, t = torch.tensor([0.1, 0.3], dtype=torch.float64), torch.tensor([0.5, 0.8], dtype=torch.float64)
    v = torch.randn_like(z)

    def f(z_, r_, t_):
        return model(z_, r_, t_, ctx, mask)

    with jvp_safe_attention():
        u, dudt = torch.func.jvp(f, (z, r, t), (v, torch.zeros_like(r), torch.ones_like(t)))
    # Small step: float64 keeps the round-off of a central difference near 1e-9 at h = 1e-7.
    h = 1e-7
    fd = (f(z + h * v, r, t + h) - f(z - h * v, r, t - h)) / (2 * h)
    torch.testing.assert_close(dudt, fd, atol=1e-7, rtol=1e-5)
    torch.testing.assert_close(u, f(z, r, t))


def assert_padded_text_tokens_do_not_change_output(model: torch.nn.Module, z: torch.Tensor, ctx: torch.Tensor,
                                                   mask: torch.Tensor) -> None:
    """Masked-out tokens (row 0 has 3 real ones), however large, and extra padding leave u unchanged."""
    r, t = torch.tensor([0.1, 0.3]), torch.tensor([0.5, 0.8])
    u = model(z, r, t, ctx, mask)
    ctx2 = ctx.clone()
    ctx2[0, 3:] = torch.randn(ctx.shape[1] - 3, ctx.shape[2]) * 10
    padded = torch.cat([ctx2, torch.randn(ctx.shape[0], 4, ctx.shape[2])], dim=1)
    mask2 = torch.cat([mask, torch.zeros(mask.shape[0], 4, dtype=torch.bool)], dim=1)
    torch.testing.assert_close(model(z, r, t, padded, mask2), u, atol=1e-5, rtol=1e-5)
