"""(r, t) for MeanFlow training, and the (start, end) schedules used across the project.

A schedule is a number (constant) or a ``(start, end)`` pair interpolated linearly over training progress in
[0, 1]. EMF schedules the logit-normal's mu -0.5 -> 0.5, sigma 1.0 -> 2.0 and the share of r != t rows
0.25 -> 0.75; ImageNet MeanFlow keeps logit-normal(-0.4, 1.0) with 25 % r != t.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from emf_lightning.errors import require_finite
from emf_lightning.meanflow.draws import draw_device, rand, randn
from emf_lightning.utils.specs import RecordsInitArgs

Schedule = float | Sequence[float]


def as_schedule(name: str, value: Schedule) -> tuple[float, float]:
    """``value`` as a (start, end) pair; a single number means a constant."""
    if isinstance(value, (int, float)):
        return float(value), float(value)
    pair = tuple(float(v) for v in value)
    if len(pair) != 2:
        raise ValueError(f"{name} must be a number or a (start, end) pair, got {value!r}")
    return pair  # type: ignore[return-value]


def scheduled(pair: tuple[float, float], progress: float) -> float:
    """The schedule's value at ``progress`` (clamped to [0, 1])."""
    p = min(max(float(progress), 0.0), 1.0)
    return pair[0] + (pair[1] - pair[0]) * p


class TimeSampler(RecordsInitArgs):
    """Draws (r, t) with r <= t.

    t and r are the max and min of two independent draws from ``distribution`` (logit-normal:
    sigmoid(mu + sigma * n); uniform on [0, 1]). A share ``neq_ratio`` of the batch keeps r < t; the rest gets
    r = t (plain flow matching). The number of r != t rows is floor(B * share) plus one with the remaining
    fractional probability, so the expected share is exact and the JVP subset size barely varies.

    Args:
        distribution: "logit_normal" or "uniform".
        mu, sigma: the logit-normal's parameters (schedules).
        neq_ratio: share of rows with r != t (schedule).
        one_step_share: share of the r != t rows drawn as exactly (r, t) = (0, 1), the interval the 1-step
            sampler uses (schedule; 0 = off, as in the papers). Two logit-normal draws rarely land near both
            ends, so without it the 1-step map is learned by extrapolation from shorter intervals.
    """

    DISTRIBUTIONS = ("logit_normal", "uniform")

    def __init__(
        self,
        distribution: str = "logit_normal",
        mu: Schedule = -0.4,
        sigma: Schedule = 1.0,
        neq_ratio: Schedule = 0.25,
        one_step_share: Schedule = 0.0,
    ):
        if distribution not in self.DISTRIBUTIONS:
            raise ValueError(f"unknown time distribution '{distribution}'; choose one of {self.DISTRIBUTIONS}")
        self.distribution = distribution
        for name, value in dict(mu=mu, sigma=sigma, neq_ratio=neq_ratio, one_step_share=one_step_share).items():
            require_finite(f"time_sampler.{name}", value)
        self.mu = as_schedule("mu", mu)
        self.sigma = as_schedule("sigma", sigma)
        self.neq_ratio = as_schedule("neq_ratio", neq_ratio)
        self.one_step_share = as_schedule("one_step_share", one_step_share)
        if min(self.sigma) <= 0:
            raise ValueError(f"sigma must be positive, got {self.sigma}")
        for name in ("neq_ratio", "one_step_share"):
            if not all(0.0 <= s <= 1.0 for s in getattr(self, name)):
                raise ValueError(f"{name} must lie in [0, 1], got {getattr(self, name)}")

    def __repr__(self) -> str:
        return (
            f"TimeSampler(distribution={self.distribution!r}, mu={self.mu}, sigma={self.sigma}, "
            f"neq_ratio={self.neq_ratio}, one_step_share={self.one_step_share})"
        )

    def params(self, progress: float = 0.0) -> dict[str, float]:
        """The scheduled mu, sigma, r != t share and one-step share at ``progress``."""
        names = ("mu", "sigma", "neq_ratio", "one_step_share")
        return {name: scheduled(getattr(self, name), progress) for name in names}

    def draw(self, n: int, progress: float = 0.0, device=None, generator: torch.Generator | None = None) -> Tensor:
        """n independent float32 times in [0, 1] from the scheduled distribution."""
        p = self.params(progress)
        if self.distribution == "uniform":
            return rand((n,), generator, device)
        return torch.sigmoid(p["mu"] + p["sigma"] * randn((n,), generator, device))

    def __call__(
        self,
        batch_size: int,
        progress: float = 0.0,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> tuple[Tensor, Tensor]:
        """(r, t), each [batch_size] with r <= t, in ``dtype`` (drawn in float32 whatever the dtype)."""
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        a = self.draw(batch_size, progress, device, generator)
        b = self.draw(batch_size, progress, device, generator)
        t, r = torch.maximum(a, b), torch.minimum(a, b)
        params = self.params(progress)
        n_neq = self._count(batch_size, params["neq_ratio"], generator)
        perm = torch.randperm(batch_size, generator=generator, device=draw_device(generator, None)).cpu()
        keep = torch.zeros(batch_size, dtype=torch.bool)
        keep[perm[:n_neq]] = True
        r = torch.where(keep.to(r.device), r, t)
        if params["one_step_share"] > 0 and n_neq > 0:
            ends = torch.zeros(batch_size, dtype=torch.bool)
            ends[perm[: self._count(n_neq, params["one_step_share"], generator)]] = True
            ends = ends.to(r.device)
            r = torch.where(ends, torch.zeros_like(r), r)
            t = torch.where(ends, torch.ones_like(t), t)
        return r.to(dtype), t.to(dtype)

    @staticmethod
    def _count(n: int, share: float, generator: torch.Generator | None) -> int:
        """floor(n * share) plus one with the remaining fractional probability (expected count exact)."""
        exact = round(n * share, 9)  # 10 * 0.3 must give 3 rows, not 3 plus a coin flip
        count = int(math.floor(exact))
        if float(rand((1,), generator, None)) < exact - count:
            count += 1
        return count
