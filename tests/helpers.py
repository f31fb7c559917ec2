"""Shared tiny fixtures for tests: shapes-world shards on disk, a fast encoder, tiny module kwargs, stand-ins
for a generator and for the evaluation's metrics.

Import from tests as ``from helpers import ...`` (pytest puts ``tests/`` on ``sys.path``).
"""

from __future__ import annotations

import importlib.util
import math
import sys
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningModule
from torch import nn

from emf_lightning.data.shards import write_shards
from emf_lightning.encoders.base import TextEncoder, TextFeatures
from emf_lightning.evaluation.clip_score import CLIPScorer, clip_scores_from_features
from emf_lightning.meanflow import FlowMatchingLoss, MeanFlowLoss
from emf_lightning.shapes import ShapesWorld, shapes_samples
from emf_lightning.utils.model_helpers import masked_mean

# A generator small enough for a CPU training step in ~0.1 s at 16x16.
TINY_BACKBONE: dict[str, Any] = {"hidden_size": 32, "depth": 1, "num_heads": 2}
# The same as command-line overrides: `--model.backbone=...`, `--model.encoder=...`.
TINY_DIT = (
    '{"class_path": "emf_lightning.models.DiT", "init_args": {"preset": "tiny", "input_size": 16, '
    '"patch_size": 4, "hidden_size": 32, "depth": 1, "num_heads": 2}}'
)
BOW = '{"class_path": "emf_lightning.encoders.BagOfWordsEncoder", "init_args": {"dim": 16}}'


class HashWordEncoder(TextEncoder):
    """A fast deterministic test encoder: one fixed random vector per word (crc32 of the word).

    It builds in microseconds, so module tests don't pay for a transformer; order-aware through a
    position term, so "red circle" and "circle red" differ.
    """

    name = "hashword"

    def __init__(
        self,
        width: int = 16,
        seed: int = 0,
        batch_size: int = 64,
        max_length: int | None = None,
        device: str | None = None,
        dtype: str | None = None,
    ):
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


def tiny_unet(**overrides: Any):
    """A two-level U-Net at 16x16 with attention at 8x8, context width 32 (fast on a CPU)."""
    from emf_lightning.models import UNet

    args = dict(
        input_size=16, base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2,), head_dim=8
    )
    return UNet(**{**args, "context_dim": 32, **overrides})


def tiny_module(optim: dict[str, Any] | None = None, **overrides: Any):
    """An EMFModule with HashWordEncoder and ``tiny_backbone`` (fast on a CPU).

    ``optim`` updates the OptimConfig fields on top of lr 1e-3 and EMA decay 0.99; other keyword arguments go to
    EMFModule (``loss=FlowMatchingLoss()``, ``backbone=...``, ``encoder=...``).
    """
    from emf_lightning.training import EMFModule

    kwargs: dict[str, Any] = dict(
        encoder=HashWordEncoder(), backbone=tiny_backbone(), optim={"lr": 1e-3, "ema_decay": 0.99, **(optim or {})}
    )
    kwargs.update(overrides)
    return EMFModule(**kwargs)


def quiet_trainer(**kwargs: Any):
    """A CPU Lightning Trainer with no logger, checkpointing, progress bar, summary or sanity check (overridable)."""
    import lightning.pytorch as pl

    kwargs.setdefault("logger", False)
    kwargs.setdefault("enable_checkpointing", False)
    kwargs.setdefault("devices", 1)
    return pl.Trainer(
        accelerator="cpu", enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, **kwargs
    )


def write_shapes_shards(
    root: str | Path, n_train: int = 8, n_val: int = 4, resolution: int = 16, seed: int = 0, per_shard: int = 4
) -> dict[str, str]:
    """Write shapes-world train/val shards under ``root``; returns ``{"train": url, "val": url}``.

    The URLs are brace patterns (``.../train-{000000..000001}.tar``) as the datamodule takes them.
    """
    root = Path(root)
    urls = {}
    for split, n in (("train", n_train), ("val", n_val)):
        world = ShapesWorld(seed=seed, resolution=resolution, split=split, size=n)
        result = write_shards(shapes_samples(world), str(root / f"{split}-%06d.tar"), maxcount=per_shard)
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


def assert_backbone_jvp_matches_finite_differences(
    model: torch.nn.Module, z: torch.Tensor, ctx: torch.Tensor, mask: torch.Tensor | None
) -> None:
    """du/dt along (v, 0, 1) by forward-mode AD equals a float64 central difference, and u the plain forward.

    ``model`` must already be float64 with non-zero weights (zero-initialised branches give a trivial 0 = 0).
    """
    from emf_lightning.meanflow.tangent_rules import jvp_safe_attention

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


def assert_padded_text_tokens_do_not_change_output(
    model: torch.nn.Module, z: torch.Tensor, ctx: torch.Tensor, mask: torch.Tensor
) -> None:
    """Masked-out tokens (row 0 has 3 real ones), however large, and extra padding leave u unchanged."""
    r, t = torch.tensor([0.1, 0.3]), torch.tensor([0.5, 0.8])
    u = model(z, r, t, ctx, mask)
    ctx2 = ctx.clone()
    ctx2[0, 3:] = torch.randn(ctx.shape[1] - 3, ctx.shape[2]) * 10
    padded = torch.cat([ctx2, torch.randn(ctx.shape[0], 4, ctx.shape[2])], dim=1)
    mask2 = torch.cat([mask, torch.zeros(mask.shape[0], 4, dtype=torch.bool)], dim=1)
    torch.testing.assert_close(model(z, r, t, padded, mask2), u, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- stand-ins for a generator and the metrics
EVAL_RES = 8  # side of the stand-in images


class StandInModule(LightningModule):
    """The least a Trainer fits and validates: one weight pulled towards 1. Subclasses add ``generate``."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))

    def training_step(self, batch, batch_idx):
        return (self.w - 1).pow(2).sum()

    def validation_step(self, batch, batch_idx):
        return None

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def eval_items(n: int = 6, seed: int = 0) -> list[dict]:
    """``n`` held-out samples: random [-1, 1] images, captions ``prompt number i``, a spec, a key."""
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "image": torch.rand(3, EVAL_RES, EVAL_RES, generator=g) * 2 - 1,
            "caption": f"prompt number {i}",
            "spec": {"objects": [i]},
            "key": f"k{i:03d}",
        }
        for i in range(n)
    ]


class LookupGenerator:
    """The Evaluator's model contract, no Lightning: ``generate`` returns the real image of each caption
    (``mode="real"``) or seeded noise (``"noise"``), and records every call."""

    def __init__(self, items: list[dict], mode: str = "real", objective: str = "meanflow"):
        self.lookup = {x["caption"]: x["image"] for x in items}
        self.mode = mode
        self.objective = FlowMatchingLoss() if objective == "flow_matching" else MeanFlowLoss()
        self.calls: list[tuple] = []

    def generate(self, captions, steps=1, cfg_scale=1.0, seed=0, use_ema=True):
        self.calls.append((tuple(captions), steps, cfg_scale, seed, use_ema))
        if self.mode == "real":
            return torch.stack([self.lookup[c] for c in captions])
        g = torch.Generator().manual_seed(seed)
        return torch.rand(len(captions), 3, EVAL_RES, EVAL_RES, generator=g) * 2 - 1


class CountingFeatures(nn.Module):
    """Random conv features (uint8 [B, 3, H, W] -> [B, 5]) that count how many images they saw."""

    def __init__(self, feature_id: str | None = None):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(3, 5, 3), nn.Tanh(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.seen = 0
        if feature_id is not None:
            self.feature_id = feature_id

    def forward(self, x):
        self.seen += x.shape[0]
        return self.net(x.float() / 127.5 - 1)


class MeanColourCLIP(nn.Module):
    """encode_image: mean colour; encode_text: a fixed direction per caption."""

    def encode_image(self, pixels):
        return pixels.mean(dim=(2, 3))

    def encode_text(self, tokens):
        return tokens


def _text_vec(caption: str) -> torch.Tensor:
    i = int(caption.split()[-1])
    return torch.tensor([1.0, math.cos(i), math.sin(i)])


def mean_colour_clip() -> CLIPScorer:
    """A CLIPScorer over MeanColourCLIP for ``prompt number i`` captions."""
    tok = lambda caps: torch.stack([_text_vec(c) for c in caps])  # noqa: E731
    return CLIPScorer(MeanColourCLIP(), tok, image_size=EVAL_RES, mean=(0, 0, 0), std=(1, 1, 1))


def expected_clip(images: torch.Tensor, captions: list[str]) -> float:
    """What ``mean_colour_clip`` scores, computed directly."""
    colour = ((images + 1) / 2).mean(dim=(2, 3))
    return float(clip_scores_from_features(colour, torch.stack([_text_vec(c) for c in captions])).mean())


class MeanPixelShapes:
    """Stand-in ShapesEval: 'accuracy' = mean pixel / 255, plus how many specs it was given."""

    def evaluate(self, images, specs):
        assert images.dtype == np.uint8 and images.shape[1:] == (EVAL_RES, EVAL_RES, 3)
        return {"overall": float(images.mean() / 255.0), "n": float(len(specs))}


def redraw_connector_blocks(connector, seed: int = 0):
    """``connector`` with every refiner and slot weight redrawn (norm weights near 1), so its zero-initialised
    blocks no longer start as the identity and what they read shows in the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in connector.named_parameters():
            if name.startswith(("refiner.", "slot_blocks.")):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3 + (1.0 if "norm" in name else 0.0))
    return connector


def load_tool(name: str):
    """The script ``tools/<name>.py`` imported as a module (the tools are scripts, not a package). It is registered
    in ``sys.modules`` first, as dataclasses and pickling look a class's module up there."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
