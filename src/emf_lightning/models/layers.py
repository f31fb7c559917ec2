"""What every MeanFlow backbone shares: the forward contract, the two time embedders, fixed position embeddings.

A backbone predicts the average velocity u(x, r, t | context) over [r, t]. MeanFlow's change to a diffusion
backbone is one more time input: the interval t - r gets its own embedder, summed with the embedding of t
(the official code and EMF both do this), so at r = t the interval embedding is that of 0.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn as nn
from torch import Tensor

from emf_lightning.utils.specs import RecordsInitArgs


class Backbone(RecordsInitArgs, nn.Module):
    """Base class of the generator's backbones: ``forward(x, r, t, context, context_mask) -> u``.

    Subclasses set ``input_size`` ((H, W) of x), ``in_channels`` (C of x, also of u) and ``context_dim`` (width
    of the text tokens they read: the text connector maps the encoder's features to it), and implement
    ``forward`` and ``copy_time_embedder_to_interval``. Constructor arguments are recorded (``init_args``), so a
    checkpoint rebuilds the backbone from ``{"class_path", "init_args"}``. ``PRESETS`` maps named sizes to
    constructor arguments; :meth:`preset_args` fills the arguments a caller left as None from one of them.
    """

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {}
    input_size: tuple[int, int]
    in_channels: int
    context_dim: int

    @classmethod
    def preset_args(cls, preset: str | None, **given: Any) -> dict[str, Any]:
        """``given`` with every None filled from ``PRESETS[preset]`` (a clear error for unknown names)."""
        if preset is None:
            values: dict[str, Any] = {}
        elif preset in cls.PRESETS:
            values = dict(cls.PRESETS[preset])
        else:
            raise ValueError(f"unknown {cls.__name__} preset {preset!r}; choose one of {sorted(cls.PRESETS)}")
        missing = [k for k, v in given.items() if v is None and k not in values]
        if missing:
            raise ValueError(f"{cls.__name__}: set {missing} or choose a preset ({sorted(cls.PRESETS)})")
        return {k: values[k] if v is None else v for k, v in given.items()}

    def check_inputs(self, x: Tensor, r: Tensor, t: Tensor, context: Tensor) -> None:
        """x [B, C, H, W], r and t [B], context [B, L, context_dim]; a clear error otherwise."""
        b = x.shape[0]
        c, (h, w) = self.in_channels, self.input_size
        if x.shape[1:] != (c, h, w):
            raise ValueError(f"{type(self).__name__} expects x of shape [B, {c}, {h}, {w}], got {tuple(x.shape)}")
        if r.shape != (b,) or t.shape != (b,):
            raise ValueError(f"r and t must have shape [{b}], got {tuple(r.shape)} and {tuple(t.shape)}")
        if context.ndim != 3 or context.shape[0] != b or context.shape[2] != self.context_dim:
            raise ValueError(f"context must be [{b}, L, {self.context_dim}], got {tuple(context.shape)}")

    def copy_time_embedder_to_interval(self) -> None:
        """Start the interval (t - r) embedder from the trained t embedder (EMF's fine-tuning recipe)."""
        raise NotImplementedError

    def pretrained_state_keys(self) -> list[str]:
        """State-dict keys (relative to the backbone) that its constructor restores exactly from pretrained weights
        and that training does not change (frozen): checkpoints leave them out and rebuild them. None by default."""
        return []

    def export_pretrained(self, directory: Path) -> dict[str, Any] | None:
        """Write the backbone in its own library's format under ``directory`` and return the init_args overrides
        that rebuild it from there (a ``"model"`` path is relative to ``directory``), or None when the backbone's
        weights simply go into the export's safetensors file (the default)."""
        return None

    def sharding_units(self) -> list[nn.Module]:
        """The modules FSDP2 shards as their own units: by default every entry with parameters of the
        backbone's ``nn.ModuleList``s (DiT blocks; U-Net down, mid and up steps); the rest is the root unit."""
        units: list[nn.Module] = []
        for child in self.modules():
            if isinstance(child, nn.ModuleList):
                units.extend(m for m in child if next(m.parameters(), None) is not None)
        return units


class TimestepEmbedder(nn.Module):
    """Scalar time in [0, 1] -> vector: sinusoid of ``scale * t`` followed by a 2-layer MLP.

    The default feeds raw t (scale 1). DiT's 1000x scale (integer diffusion timesteps) makes du/dt, and with it
    the MeanFlow target v - (t - r) du/dt, up to ~1000x larger in the fast channels (docs/architecture.md).
    """

    def __init__(self, hidden_size: int, frequency_dim: int = 256, scale: float = 1.0):
        super().__init__()
        if frequency_dim % 2:
            raise ValueError(f"frequency_dim must be even, got {frequency_dim}")
        self.frequency_dim = frequency_dim
        self.scale = scale
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))
        half = frequency_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
        self.register_buffer("freqs", freqs, persistent=False)

    def sinusoid(self, t: Tensor) -> Tensor:
        """[B] -> [B, frequency_dim] (cos, sin); at least float32, so bf16 inputs do not quantise time."""
        t = t.to(torch.promote_types(t.dtype, torch.float32))
        args = (t * self.scale)[:, None] * self.freqs[None, :].to(t.dtype)
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t: Tensor) -> Tensor:
        """[B] -> [B, hidden_size]."""
        return self.mlp(self.sinusoid(t))


def sincos_1d(positions: Tensor, dim: int) -> Tensor:
    """Fixed sin/cos embedding of float positions [N] -> [N, dim] (dim even), as in the Transformer."""
    if dim % 2:
        raise ValueError(f"sin-cos embedding dim must be even, got {dim}")
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    args = positions.to(torch.float64)[:, None] * omega[None, :]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


def sincos_2d(grid_size: tuple[int, int], dim: int) -> Tensor:
    """Fixed 2D sin/cos position embedding [H*W, dim], row-major: half the channels for y, half for x."""
    if dim % 4:
        raise ValueError(f"2D sin-cos embedding dim must be divisible by 4, got {dim}")
    gh, gw = grid_size
    ys, xs = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    emb = torch.cat([sincos_1d(ys.reshape(-1), dim // 2), sincos_1d(xs.reshape(-1), dim // 2)], dim=1)
    return emb.float()


def init_linears_normal(module: nn.Module, std: float = 0.02) -> None:
    """N(0, std) weights for every nn.Linear inside ``module`` (biases untouched)."""
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            nn.init.normal_(layer.weight, std=std)


def zero_init(module: nn.Module) -> nn.Module:
    """Every parameter of ``module`` set to zero (the end of a residual branch: the block starts as identity)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module
