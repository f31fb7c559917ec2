"""Optimiser, learning-rate schedule and EMA settings of a run, and the schedule they define."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

from emf_lightning.errors import require_finite

LR_DECAYS = ("constant", "cosine", "linear")


@dataclass
class OptimConfig:
    """AdamW on the generator, linear warm-up, then a decay, and the EMA used for sampling."""

    lr: float = 1e-4
    """Peak learning rate."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    warmup_steps: int = 0
    """Linear learning-rate warm-up from 0 over this many optimiser steps."""
    lr_decay: Literal["constant", "cosine", "linear"] = "constant"
    """After warm-up: keep the rate, or decay it (cosine / linear) to ``min_lr_ratio * lr`` at the schedule's end.
    A decayed rate lets a short run's last weights (and their EMA) settle instead of jittering at the peak."""
    min_lr_ratio: float = 0.0
    """The decayed learning rate's floor, as a fraction of ``lr``."""
    schedule_steps: int | None = None
    """Steps that the schedules span (lr decay, the time sampler's (start, end) schedules): progress =
    step / schedule_steps. None takes the trainer's max_steps, else its estimate of the run's optimiser steps."""
    ema_decay: float = 0.9999
    """EMA decay, with the warm-up min(ema_decay, (1 + step) / (10 + step))."""

    def __post_init__(self) -> None:
        for name in ("lr", "betas", "weight_decay", "min_lr_ratio", "ema_decay"):
            require_finite(f"optim.{name}", getattr(self, name))
        if self.lr < 0:
            raise ValueError(f"optim.lr must be >= 0, got {self.lr}")
        if self.lr_decay not in LR_DECAYS:
            raise ValueError(f"optim.lr_decay must be one of {LR_DECAYS}, got {self.lr_decay!r}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"optim.ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.schedule_steps is not None and self.schedule_steps < 1:
            raise ValueError(f"optim.schedule_steps must be >= 1 or null, got {self.schedule_steps}")
        self.betas = (float(self.betas[0]), float(self.betas[1]))

    @classmethod
    def from_any(cls, value: OptimConfig | dict[str, Any] | None) -> OptimConfig:
        """An OptimConfig from itself, a dict of its fields (checkpoints, YAML) or None (the defaults)."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise TypeError(f"optim must be an OptimConfig or a dict of its fields, got {type(value).__name__}")
        unknown = set(value) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown optim setting(s) {sorted(unknown)}; known: {[f.name for f in fields(cls)]}")
        return cls(**value)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (tuples as lists), as checkpoints keep it."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def lr_factor(self, step: int, total: int | None) -> float:
        """Multiplier of ``lr`` for optimiser step ``step`` (0-based) of a schedule ``total`` steps long.

        Warm-up: (step + 1) / warmup_steps. After it, "constant" keeps 1; "cosine" and "linear" fall to
        ``min_lr_ratio`` at ``total``.
        """
        warmup = self.warmup_steps
        if warmup and step < warmup:
            return (step + 1) / warmup
        if self.lr_decay == "constant" or not total or total <= warmup:
            return 1.0
        frac = min(1.0, (step - warmup) / (total - warmup))
        shape = 0.5 * (1.0 + math.cos(math.pi * frac)) if self.lr_decay == "cosine" else 1.0 - frac
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * shape
