"""MeanFlow (Geng et al., 2025) and flow matching for conditional generators: time sampling, losses, samplers.

Pure torch, no Lightning. Conventions (docs/architecture.md): z_t = (1 - t) x + t e with e ~ N(0, I), t = 1 is
noise, v = e - x; the network ``net(z, r, t, *cond)`` predicts the average velocity over [r, t], and
``net(z, t, t, *cond)`` is the instantaneous velocity. ``cond`` is a tuple of batch-first tensors (for the
text generator: ``(text_tokens, text_mask)``), sliced together with the batch when only some samples run.

MeanFlow target (MeanFlow identity): u_tgt = v - (t - r) du/dt, with du/dt the total derivative along
(dz/dt, dr/dt, dt/dt) = (v, 0, 1), computed by forward-mode AD (``torch.func.jvp``) and treated as a constant.
Improved MeanFlow (``jvp_tangent="predicted"``) takes dz/dt = the network's own u(z, t, t) instead of v.
Where r = t the target is v itself, so those samples need no JVP: the *selective* JVP runs the JVP only on
the r != t subset (through the JVP-safe math attention) and a plain forward with fused attention on the rest.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

from .models.attention import jvp_safe_attention
from .models.jvp_ops import fast_tangents

Net = Callable[..., Tensor]
JVP_STRATEGIES = ("joint", "detached")
JVP_TANGENTS = ("conditional", "predicted")
Cond = tuple[Tensor, ...]
Schedule = float | Sequence[float]

__all__ = [
    "FlowMatchingLoss",
    "MeanFlowLoss",
    "TimeSampler",
    "cfg_velocity",
    "concat_conditions",
    "make_noise",
    "merge_conditions",
    "sample_flow_matching",
    "sample_meanflow",
]


# ----------------------------------------------------------------------------------------------------------
# randomness helpers


def _generator_device(generator: torch.Generator | None, device: torch.device | str | None) -> torch.device:
    """Draw on the generator's device (torch requires it), else on the target device."""
    if generator is not None:
        return generator.device
    return torch.device(device) if device is not None else torch.device("cpu")


def _randn(shape: Sequence[int], generator: torch.Generator | None, device, dtype=torch.float32) -> Tensor:
    out = torch.randn(tuple(shape), generator=generator, device=_generator_device(generator, device), dtype=dtype)
    return out.to(device) if device is not None else out


def _rand(shape: Sequence[int], generator: torch.Generator | None, device) -> Tensor:
    out = torch.rand(tuple(shape), generator=generator, device=_generator_device(generator, device))
    return out.to(device) if device is not None else out


def make_noise(
    shape: Sequence[int],
    seed: int | torch.Generator = 0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Standard normal noise for the samplers, reproducible from an integer seed or a torch.Generator.

    An integer seed draws on the CPU, so the same seed gives the same noise on every device.
    """
    if isinstance(seed, int):
        seed = torch.Generator().manual_seed(seed)
    return _randn(shape, seed, device, dtype)


# ----------------------------------------------------------------------------------------------------------
# (r, t) sampling


def _as_pair(name: str, value: Schedule) -> tuple[float, float]:
    if isinstance(value, (int, float)):
        return float(value), float(value)
    pair = tuple(float(v) for v in value)
    if len(pair) != 2:
        raise ValueError(f"{name} must be a number or a (start, end) pair, got {value!r}")
    return pair  # type: ignore[return-value]


def _interpolate(pair: tuple[float, float], progress: float) -> float:
    return pair[0] + (pair[1] - pair[0]) * progress


class TimeSampler:
    """Draws (r, t) with r <= t for MeanFlow training.

    t and r are the max and min of two independent draws from ``distribution`` (logit-normal:
    sigmoid(mu + sigma * n); uniform on [0, 1]). A share ``neq_ratio`` of the batch keeps r < t; the rest
    gets r = t (plain flow matching). The number of r != t samples is floor(B * share) plus one with the
    remaining fractional probability, so the expected share is exact and the JVP subset size barely varies.

    ``one_step_share`` of the r != t rows get exactly (r, t) = (0, 1), the interval the 1-step sampler
    uses: two logit-normal draws land within 0.05 of both ends for under 1 % of the r != t rows, so
    without it the 1-step map is learned only by extrapolation from shorter intervals (0 = off, the papers).

    ``mu``, ``sigma``, ``neq_ratio`` and ``one_step_share`` are each a number or a (start, end) pair
    interpolated linearly over training progress in [0, 1] (EMF: mu -0.5 -> 0.5, sigma 1.0 -> 2.0, share
    0.25 -> 0.75).
    """

    DISTRIBUTIONS = ("logit_normal", "uniform")

    def __init__(
        self,
        distribution: str = "logit_normal",
        mu: Schedule = (-0.4, -0.4),
        sigma: Schedule = (1.0, 1.0),
        neq_ratio: Schedule = (0.25, 0.25),
        one_step_share: Schedule = (0.0, 0.0),
    ):
        if distribution not in self.DISTRIBUTIONS:
            raise ValueError(f"unknown time distribution '{distribution}'; choose one of {self.DISTRIBUTIONS}")
        self.distribution = distribution
        self.mu = _as_pair("mu", mu)
        self.sigma = _as_pair("sigma", sigma)
        self.neq_ratio = _as_pair("neq_ratio", neq_ratio)
        if min(self.sigma) <= 0:
            raise ValueError(f"sigma must be positive, got {self.sigma}")
        if not all(0.0 <= s <= 1.0 for s in self.neq_ratio):
            raise ValueError(f"neq_ratio must lie in [0, 1], got {self.neq_ratio}")
        self.one_step_share = _as_pair("one_step_share", one_step_share)
        if not all(0.0 <= s <= 1.0 for s in self.one_step_share):
            raise ValueError(f"one_step_share must lie in [0, 1], got {self.one_step_share}")

    def __repr__(self) -> str:
        return (
            f"TimeSampler(distribution={self.distribution!r}, mu={self.mu}, sigma={self.sigma}, "
            f"neq_ratio={self.neq_ratio}, one_step_share={self.one_step_share})"
        )

    def params(self, progress: float = 0.0) -> dict[str, float]:
        """The scheduled mu, sigma and r != t share at ``progress`` (clamped to [0, 1])."""
        p = min(max(float(progress), 0.0), 1.0)
        return {
            "mu": _interpolate(self.mu, p),
            "sigma": _interpolate(self.sigma, p),
            "neq_ratio": _interpolate(self.neq_ratio, p),
            "one_step_share": _interpolate(self.one_step_share, p),
        }

    def draw(self, n: int, progress: float = 0.0, device=None, generator: torch.Generator | None = None) -> Tensor:
        """n independent times in [0, 1] from the scheduled distribution."""
        p = self.params(progress)
        if self.distribution == "uniform":
            return _rand((n,), generator, device)
        return torch.sigmoid(p["mu"] + p["sigma"] * _randn((n,), generator, device))

    def __call__(
        self,
        batch_size: int,
        progress: float = 0.0,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Returns (r, t), each [batch_size] float32 with r <= t."""
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        a = self.draw(batch_size, progress, device, generator)
        b = self.draw(batch_size, progress, device, generator)
        t, r = torch.maximum(a, b), torch.minimum(a, b)
        params = self.params(progress)
        n_neq = self._count(batch_size, params["neq_ratio"], generator)
        keep = torch.zeros(batch_size, dtype=torch.bool)
        perm = torch.randperm(batch_size, generator=generator, device=_generator_device(generator, None)).cpu()
        keep[perm[:n_neq]] = True
        r = torch.where(keep.to(r.device), r, t)
        if params["one_step_share"] > 0 and n_neq > 0:  # no extra draw when off: seeds reproduce older runs
            ends = torch.zeros(batch_size, dtype=torch.bool)
            ends[perm[: self._count(n_neq, params["one_step_share"], generator)]] = True
            ends = ends.to(r.device)
            r = torch.where(ends, torch.zeros_like(r), r)
            t = torch.where(ends, torch.ones_like(t), t)
        return r, t

    @staticmethod
    def _count(n: int, share: float, generator: torch.Generator | None) -> int:
        """floor(n * share) plus one with the remaining fractional probability (expected count exact)."""
        exact = round(n * share, 9)  # 10 * 0.3 must give 3 rows, not 3 plus a coin flip
        count = int(math.floor(exact))
        if float(_rand((1,), generator, None)) < exact - count:
            count += 1
        return count


# ----------------------------------------------------------------------------------------------------------
# conditions


def _expand_rows(tensors: Cond, batch: int) -> Cond:
    """Broadcast batch-1 tensors (a shared null condition) to ``batch`` rows."""
    out = []
    for x in tensors:
        if x.shape[0] == batch:
            out.append(x)
        elif x.shape[0] == 1:
            out.append(x.expand(batch, *x.shape[1:]))
        else:
            raise ValueError(f"condition tensor has {x.shape[0]} rows, expected {batch} or 1")
    return tuple(out)


def _pad_dim1(x: Tensor, length: int) -> Tensor:
    """Right-pad dim 1 with zeros (False for masks): padded text positions are masked out."""
    if x.shape[1] == length:
        return x
    pad = x.new_zeros((x.shape[0], length - x.shape[1], *x.shape[2:]))
    return torch.cat([x, pad], dim=1)


def _align(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Make two condition tensors concatenable: equal beyond dim 1, pad the shorter sequence dim."""
    if a.shape[1:] == b.shape[1:]:
        return a, b
    if a.ndim < 2 or a.ndim != b.ndim or a.shape[2:] != b.shape[2:]:
        raise ValueError(f"condition tensors of shapes {tuple(a.shape)} and {tuple(b.shape)} cannot be aligned")
    length = max(a.shape[1], b.shape[1])
    return _pad_dim1(a, length), _pad_dim1(b, length)


def _check_pair(cond: Cond, null_cond: Cond) -> None:
    if len(cond) != len(null_cond):
        raise ValueError(f"cond has {len(cond)} tensors but null_cond has {len(null_cond)}")


def merge_conditions(cond: Cond, null_cond: Cond, use_null: Tensor) -> Cond:
    """Per-sample choice between cond and null_cond (condition dropout). use_null: [B] bool."""
    _check_pair(cond, null_cond)
    batch = use_null.shape[0]
    out = []
    for c, n in zip(_expand_rows(cond, batch), _expand_rows(null_cond, batch), strict=True):
        c, n = _align(c, n)
        sel = use_null.to(c.device).view(batch, *([1] * (c.ndim - 1)))
        out.append(torch.where(sel, n, c))
    return tuple(out)


def concat_conditions(first: Cond, second: Cond) -> Cond:
    """Stack two conditions along the batch (for one forward over cond and null), padding sequences."""
    _check_pair(first, second)
    out = []
    for a, b in zip(first, second, strict=True):
        a, b = _align(a, b)
        out.append(torch.cat([a, b], dim=0))
    return tuple(out)


def _take(cond: Cond, index: Tensor) -> Cond:
    return tuple(c.index_select(0, index.to(c.device)) for c in cond)


def _acc(x: Tensor) -> Tensor:
    """At least float32 for the loss arithmetic (bf16/fp16 network outputs), float64 stays float64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _bcast(v: Tensor, like: Tensor) -> Tensor:
    """[B] -> [B, 1, ..., 1] broadcastable against ``like``."""
    return v.view(v.shape[0], *([1] * (like.ndim - 1)))


# ----------------------------------------------------------------------------------------------------------
# losses


class _ConditionalObjective:
    """Shared parts of the two objectives: the path, condition dropout, training-time guidance, weighting."""

    def __init__(
        self,
        time_sampler: TimeSampler | None = None,
        adaptive_p: float = 1.0,
        adaptive_c: float = 1e-3,
        guidance_omega: float = 1.0,
        guidance_kappa: float = 0.0,
        guidance_interval: Sequence[float] = (0.0, 1.0),
        cond_drop_prob: float = 0.0,
    ):
        self.time_sampler = time_sampler if time_sampler is not None else TimeSampler()
        if adaptive_p < 0 or adaptive_c <= 0:
            raise ValueError(f"adaptive weight needs p >= 0 and c > 0, got p={adaptive_p}, c={adaptive_c}")
        if not 0.0 <= cond_drop_prob < 1.0:
            raise ValueError(f"cond_drop_prob must lie in [0, 1), got {cond_drop_prob}")
        lo, hi = (float(x) for x in guidance_interval)
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"guidance_interval must satisfy 0 <= start <= end <= 1, got {guidance_interval}")
        self.adaptive_p = float(adaptive_p)
        self.adaptive_c = float(adaptive_c)
        self.guidance_omega = float(guidance_omega)
        self.guidance_kappa = float(guidance_kappa)
        self.guidance_interval = (lo, hi)
        self.cond_drop_prob = float(cond_drop_prob)

    @property
    def uses_guidance(self) -> bool:
        """Whether the target mixes in the network's own velocities (official MeanFlow's training CFG)."""
        return self.guidance_omega != 1.0 or self.guidance_kappa != 0.0

    def _check_null(self, null_cond: Cond | None, drop_mask: Tensor | None) -> None:
        if null_cond is None and (self.uses_guidance or self.cond_drop_prob > 0 or drop_mask is not None):
            raise ValueError(
                "null_cond is required for training-time guidance (omega != 1 or kappa != 0) "
                "and for condition dropout"
            )

    def draw(
        self, x: Tensor, progress: float, generator: torch.Generator | None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """Noise e, times (r, t) and, when cond_drop_prob > 0, the per-sample dropout mask."""
        b = x.shape[0]
        r, t = self.time_sampler(b, progress, x.device, generator)
        e = _randn(x.shape, generator, x.device, x.dtype)
        drop = _rand((b,), generator, x.device) < self.cond_drop_prob if self.cond_drop_prob > 0 else None
        return e, r, t, drop

    @torch.no_grad()
    def own_velocities(
        self, net: Net, z: Tensor, t: Tensor, cond: Cond, null_cond: Cond | None, with_cond: bool, with_null: bool
    ) -> tuple[Tensor | None, Tensor | None]:
        """The network's instantaneous velocities u(z, t, t, c) and/or u(z, t, t, null): constants of the
        target (no gradient), run with fused attention, both in one batch when both are asked for."""
        b = z.shape[0]
        if with_cond and with_null:
            assert null_cond is not None
            null = _expand_rows(null_cond, b)
            both = net(torch.cat([z, z]), torch.cat([t, t]), torch.cat([t, t]), *concat_conditions(cond, null))
            u_cond, u_null = _acc(both).chunk(2)
            return u_cond, u_null
        if with_null:
            assert null_cond is not None
            return None, _acc(net(z, t, t, *_expand_rows(null_cond, b)))
        if with_cond:
            return _acc(net(z, t, t, *cond)), None
        return None, None

    def guide(
        self, v: Tensor, u_cond: Tensor | None, u_null: Tensor | None, t: Tensor, dropped: Tensor | None
    ) -> Tensor:
        """omega v + (1 - omega - kappa) u_null + kappa u_cond inside the guidance t-interval, v elsewhere and
        for samples whose condition was dropped."""
        if not self.uses_guidance:
            return v
        assert u_null is not None and (u_cond is not None or self.guidance_kappa == 0.0)
        omega, kappa = self.guidance_omega, self.guidance_kappa
        v_g = omega * _acc(v) + (1.0 - omega - kappa) * u_null
        if kappa != 0.0:
            v_g = v_g + kappa * u_cond
        lo, hi = self.guidance_interval
        apply = (t >= lo) & (t <= hi)
        if dropped is not None:
            apply = apply & ~dropped
        return torch.where(_bcast(apply, v), v_g.to(v.dtype), v)

    def guided_velocity(
        self, net: Net, z: Tensor, t: Tensor, v: Tensor, cond: Cond, null_cond: Cond | None, dropped: Tensor | None
    ) -> Tensor:
        """v_g = omega v + (1 - omega - kappa) u(z, t, t, null) + kappa u(z, t, t, c) inside the t-interval.

        Outside the interval, and for samples whose condition was dropped, the target velocity stays v.
        """
        if not self.uses_guidance:
            return v
        u_cond, u_null = self.own_velocities(net, z, t, cond, null_cond, self.guidance_kappa != 0.0, True)
        return self.guide(v, u_cond, u_null, t, dropped)

    def weighted(self, per_sample: Tensor) -> tuple[Tensor, Tensor]:
        """Adaptive weighting: mean of l / (l.detach() + c)^p; returns (loss, weights)."""
        w = 1.0 / (per_sample.detach() + self.adaptive_c) ** self.adaptive_p
        return (w * per_sample).mean(), w

    def _prepare(
        self, net: Net, x: Tensor, e: Tensor, t: Tensor, cond: Cond, null_cond: Cond | None, drop: Tensor | None
    ) -> tuple[Tensor, Tensor, Cond]:
        """Path point z_t, the sample's velocity v = e - x and the conditions after dropout."""
        if e.shape != x.shape:
            raise ValueError(f"noise shape {tuple(e.shape)} != data shape {tuple(x.shape)}")
        if drop is not None and drop.any():
            assert null_cond is not None
            cond = merge_conditions(cond, null_cond, drop)
        tb = _bcast(t.to(x.dtype), x)
        z = (1.0 - tb) * x + tb * e
        return z, e - x, cond

    @staticmethod
    def _stats(
        loss: Tensor, sq: Tensor, w: Tensor, r: Tensor, t: Tensor, drop: Tensor | None
    ) -> dict[str, Tensor]:
        neq = r != t
        stats = {
            "loss": loss.detach(),
            "mse": sq.mean().detach(),
            "adaptive_weight": w.mean(),
            "neq_share": neq.float().mean(),
            "t_mean": t.mean(),
            "interval_mean": (t - r).mean(),
        }
        per_sample = sq.flatten(1).mean(1).detach()
        if (~neq).any():
            stats["mse_r_eq_t"] = per_sample[~neq].mean()
        if neq.any():
            stats["mse_r_neq_t"] = per_sample[neq].mean()
        if drop is not None:
            stats["cond_drop_share"] = drop.float().mean()
        return stats


class MeanFlowLoss(_ConditionalObjective):
    """The MeanFlow objective with adaptive weighting, optional training-time guidance and selective JVP.

    Args:
        time_sampler: draws (r, t); default ``TimeSampler()`` (logit-normal(-0.4, 1), 25 % r != t).
        adaptive_p, adaptive_c: per-sample weight 1 / (loss + c)^p (p = 0 gives the plain squared error).
        selective_jvp: run the JVP only on samples with r != t (math attention) and fused attention
            elsewhere. False = the naive reference: ``torch.func.jvp`` over the whole batch with math
            attention everywhere and u from its primal, as public implementations do (``jvp_strategy`` is
            then ignored); kept for benchmarks and as the reference in tests.
        jvp_tangent: the z-direction of du/dt. "conditional" (MeanFlow): the sample's own velocity
            v = e - x (or the guided v_g). "predicted" (improved MeanFlow, Geng et al. 2025, arXiv 2512.02012):
            the network's instantaneous velocity u(z, t, t, c), no gradient, guided like v when guidance is
            on. e - x is one noisy draw of the marginal velocity at z; the network's estimate of it is not,
            so the target stops carrying that noise into du/dt. Costs one no-gradient forward on the r != t
            rows (shared with guidance's own forward when guidance is on).
        jvp_strategy: how u gets its gradient; both give the same loss and gradients. "detached"
            (default): du/dt from a JVP under ``torch.no_grad`` (nothing kept) and u from one plain
            fused-attention forward over the whole batch: one extra forward on the JVP rows, but the
            activation memory of flow matching at any r != t share. "joint": u is the primal output of
            ``torch.func.jvp`` (as in py-meanflow): no extra forward, but autograd also records the tangent
            computation, so peak memory grows with the share (measured 1.4x flow matching at 25 %, 2.4x at
            75 % on DiT-S): a run scheduled from 25 % to 75 % could run out of memory late in training.
        guidance_omega, guidance_kappa, guidance_interval: official MeanFlow's training-time guidance;
            omega = 1, kappa = 0 disables it (EMF applies CFG only at sampling).
        cond_drop_prob: share of samples whose condition is replaced by ``null_cond`` (they keep target v).
    """

    def __init__(
        self,
        time_sampler: TimeSampler | None = None,
        adaptive_p: float = 1.0,
        adaptive_c: float = 1e-3,
        selective_jvp: bool = True,
        guidance_omega: float = 1.0,
        guidance_kappa: float = 0.0,
        guidance_interval: Sequence[float] = (0.0, 1.0),
        cond_drop_prob: float = 0.0,
        jvp_strategy: str = "detached",
        jvp_tangent: str = "conditional",
    ):
        super().__init__(
            time_sampler, adaptive_p, adaptive_c, guidance_omega, guidance_kappa, guidance_interval, cond_drop_prob
        )
        if jvp_strategy not in JVP_STRATEGIES:
            raise ValueError(f"unknown jvp_strategy '{jvp_strategy}'; choose one of {JVP_STRATEGIES}")
        if jvp_tangent not in JVP_TANGENTS:
            raise ValueError(f"unknown jvp_tangent '{jvp_tangent}'; choose one of {JVP_TANGENTS}")
        self.selective_jvp = bool(selective_jvp)
        self.jvp_strategy = jvp_strategy
        self.jvp_tangent = jvp_tangent

    def __call__(
        self,
        net: Net,
        x: Tensor,
        cond: Cond,
        null_cond: Cond | None = None,
        progress: float = 0.0,
        generator: torch.Generator | None = None,
        drop_mask: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Draw noise, (r, t) and dropout, then return ``compute(...)``.

        ``drop_mask`` ([B] bool) overrides the loss's own condition dropout draw.
        """
        self._check_null(null_cond, drop_mask)
        e, r, t, drop = self.draw(x, progress, generator)
        if drop_mask is not None:
            drop = drop_mask.to(device=x.device, dtype=torch.bool)
        return self.compute(net, x, e, r, t, cond, null_cond, drop)

    def predict(
        self, net: Net, z: Tensor, r: Tensor, t: Tensor, tangent_z: Tensor, cond: Cond
    ) -> tuple[Tensor, Tensor]:
        """u(z, r, t) with gradients to the parameters and du/dt along (tangent_z, 0, 1), detached.

        With ``selective_jvp`` only the r != t rows run ``torch.func.jvp``; the r = t rows get du/dt = 0 (it
        is multiplied by t - r = 0 anyway) and u from a plain fused-attention forward ("joint": those rows
        only; "detached": every row, see the class docstring). Rows come back in batch order.
        """
        if not self.selective_jvp:  # the naive reference: what public implementations do
            return _jvp(net, z, r, t, tangent_z, cond)
        if self.jvp_strategy == "detached":
            return self._predict_detached(net, z, r, t, tangent_z, cond)
        neq = r != t
        idx_jvp = neq.nonzero().squeeze(1)
        idx_plain = (~neq).nonzero().squeeze(1)
        if idx_plain.numel() == 0:
            return _jvp(net, z, r, t, tangent_z, cond)
        u_plain = net(z[idx_plain], r[idx_plain], t[idx_plain], *_take(cond, idx_plain))
        if idx_jvp.numel() == 0:
            return u_plain, torch.zeros_like(u_plain)
        u_jvp, dudt_jvp = _jvp(
            net, z[idx_jvp], r[idx_jvp], t[idx_jvp], tangent_z[idx_jvp], _take(cond, idx_jvp)
        )
        # Put rows back in batch order: the inverse of the permutation [plain rows, jvp rows].
        inverse = torch.argsort(torch.cat([idx_plain, idx_jvp]))
        u = torch.cat([u_plain, u_jvp.to(u_plain.dtype)]).index_select(0, inverse)
        dudt = torch.cat([torch.zeros_like(u_plain), dudt_jvp.to(u_plain.dtype)]).index_select(0, inverse)
        return u, dudt

    def _predict_detached(
        self, net: Net, z: Tensor, r: Tensor, t: Tensor, tangent_z: Tensor, cond: Cond
    ) -> tuple[Tensor, Tensor]:
        """u from one fused forward over the batch; du/dt from a graph-free JVP (on the r != t rows).

        The JVP runs first: its primal and tangent activations are freed before the forward that keeps its
        autograd graph starts, so the two peaks do not stack (the step's peak stays the backward's).
        """
        rows = (r != t).nonzero().squeeze(1)
        dudt_rows = None
        if rows.numel():
            dudt_rows = _graph_free_jvp(net, z[rows], r[rows], t[rows], tangent_z[rows], _take(cond, rows))
        u = net(z, r, t, *cond)
        dudt = torch.zeros_like(u)
        if dudt_rows is not None:
            dudt = dudt.index_copy(0, rows, dudt_rows.to(u.dtype))
        return u, dudt

    def velocity_and_tangent(
        self, net: Net, z: Tensor, r: Tensor, t: Tensor, v: Tensor, cond: Cond, null_cond: Cond | None,
        drop: Tensor | None,
    ) -> tuple[Tensor, Tensor]:
        """The (guided) target velocity v_g and the z-tangent of du/dt (see ``jvp_tangent``)."""
        if self.jvp_tangent == "conditional":
            v_g = self.guided_velocity(net, z, t, v, cond, null_cond, drop)
            return v_g, v_g
        if self.uses_guidance:  # guidance needs u(z, t, t, .) on every row anyway: one forward serves both
            u_cond, u_null = self.own_velocities(net, z, t, cond, null_cond, True, True)
            assert u_cond is not None
            return self.guide(v, u_cond, u_null, t, drop), self.guide(u_cond.to(v.dtype), u_cond, u_null, t, drop)
        # Only the r != t rows use the tangent: elsewhere du/dt is multiplied by t - r = 0.
        tangent = v.clone()
        rows = (r != t).nonzero().squeeze(1)
        if rows.numel():
            u_rows, _ = self.own_velocities(net, z[rows], t[rows], _take(cond, rows), None, True, False)
            assert u_rows is not None
            tangent = tangent.index_copy(0, rows, u_rows.to(v.dtype))
        return v, tangent

    def compute(
        self,
        net: Net,
        x: Tensor,
        e: Tensor,
        r: Tensor,
        t: Tensor,
        cond: Cond,
        null_cond: Cond | None = None,
        drop: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The loss for given data x, noise e, times r <= t and dropout mask (all batch-first)."""
        if bool((r > t).any()):
            raise ValueError("MeanFlowLoss needs r <= t for every sample")
        z, v, cond = self._prepare(net, x, e, t, cond, null_cond, drop)
        v_g, tangent = self.velocity_and_tangent(net, z, r, t, v, cond, null_cond, drop)
        u, dudt = self.predict(net, z, r, t, tangent, cond)
        # Stop-gradient target, in float32 even when the network ran under bf16 autocast.
        u_tgt = (_acc(v_g) - _acc(_bcast(t - r, x)) * _acc(dudt)).detach()
        sq = (_acc(u) - u_tgt) ** 2
        per_sample = sq.flatten(1).sum(1)
        loss, w = self.weighted(per_sample)
        stats = self._stats(loss, sq, w, r, t, drop)
        neq = r != t
        if neq.any():  # only rows with r != t: the selective path does not compute du/dt elsewhere
            stats["dudt_rms"] = _acc(dudt[neq]).pow(2).mean().sqrt().detach()
        return loss, stats


def _jvp(net: Net, z: Tensor, r: Tensor, t: Tensor, tangent_z: Tensor, cond: Cond) -> tuple[Tensor, Tensor]:
    """(u, du/dt) by forward-mode AD along (tangent_z, 0, 1); u keeps its autograd graph, du/dt is detached."""

    def u_fn(z_: Tensor, r_: Tensor, t_: Tensor) -> Tensor:
        return net(z_, r_, t_, *cond)

    tangents = (tangent_z.to(z.dtype), torch.zeros_like(r), torch.ones_like(t))
    with jvp_safe_attention():
        u, dudt = torch.func.jvp(u_fn, (z, r, t), tangents)
    return u, dudt.detach()


def _graph_free_jvp(net: Net, z: Tensor, r: Tensor, t: Tensor, tangent_z: Tensor, cond: Cond) -> Tensor:
    """du/dt along (tangent_z, 0, 1) with no autograd graph: dual tensors + closed-form tangent rules.

    Same value as :func:`_jvp`'s tangent (tested), ~1.3x (DiT) to ~1.8x (U-Net) faster on a CPU: the
    ``torch.autograd.forward_ad`` API skips functorch's per-op wrapping, and :func:`fast_tangents` replaces
    PyTorch's generic rules for linear, conv and the norms. r carries no tangent, so it stays a plain tensor.
    """
    with torch.no_grad(), jvp_safe_attention(), fast_tangents(), fwAD.dual_level():
        u = net(fwAD.make_dual(z, tangent_z.to(z.dtype)), r, fwAD.make_dual(t, torch.ones_like(t)), *cond)
        dudt = fwAD.unpack_dual(u).tangent
    if dudt is None:  # the output does not depend on z or t (e.g. a zero-initialised network's last layer)
        dudt = torch.zeros_like(u)
    return dudt


class FlowMatchingLoss(_ConditionalObjective):
    """Flow matching on the same backbone: ``net(z, t, t, *cond)`` regresses v (or the guided v_g).

    Same weighting, guidance and dropout options as MeanFlowLoss, so the objectives differ only in the
    target; the time sampler's r is ignored.
    """

    def __call__(
        self,
        net: Net,
        x: Tensor,
        cond: Cond,
        null_cond: Cond | None = None,
        progress: float = 0.0,
        generator: torch.Generator | None = None,
        drop_mask: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Draw noise, t and dropout, then return ``compute(...)``."""
        self._check_null(null_cond, drop_mask)
        e, _, t, drop = self.draw(x, progress, generator)
        if drop_mask is not None:
            drop = drop_mask.to(device=x.device, dtype=torch.bool)
        return self.compute(net, x, e, t, cond, null_cond, drop)

    def compute(
        self,
        net: Net,
        x: Tensor,
        e: Tensor,
        t: Tensor,
        cond: Cond,
        null_cond: Cond | None = None,
        drop: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The loss for given data x, noise e, times t and dropout mask."""
        z, v, cond = self._prepare(net, x, e, t, cond, null_cond, drop)
        v_g = self.guided_velocity(net, z, t, v, cond, null_cond, drop)
        u = net(z, t, t, *cond)
        sq = (_acc(u) - _acc(v_g)) ** 2
        per_sample = sq.flatten(1).sum(1)
        loss, w = self.weighted(per_sample)
        return loss, self._stats(loss, sq, w, t, t, drop)


# ----------------------------------------------------------------------------------------------------------
# samplers


def cfg_velocity(
    net: Net, z: Tensor, r: Tensor, t: Tensor, cond: Cond, cfg_scale: float = 1.0, null_cond: Cond | None = None
) -> Tensor:
    """Classifier-free guided velocity u_null + s (u_c - u_null); s = 1 is the conditional output alone.

    Conditional and null rows go through the network as one batch of 2B.
    """
    if cfg_scale == 1.0:
        return net(z, r, t, *cond)
    if null_cond is None:
        raise ValueError(f"cfg_scale={cfg_scale} needs null_cond")
    b = z.shape[0]
    both = net(
        torch.cat([z, z]), torch.cat([r, r]), torch.cat([t, t]),
        *concat_conditions(cond, _expand_rows(null_cond, b)),
    )
    u_c, u_null = both.chunk(2)
    return u_null + cfg_scale * (u_c - u_null)


def _time_grid(steps: int, like: Tensor) -> Tensor:
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return torch.linspace(1.0, 0.0, steps + 1, device=like.device, dtype=torch.float32)


@torch.no_grad()
def sample_meanflow(
    net: Net, noise: Tensor, cond: Cond, steps: int = 1, cfg_scale: float = 1.0, null_cond: Cond | None = None
) -> Tensor:
    """MeanFlow sampling from noise at t = 1 to data at t = 0 in ``steps`` jumps.

    On the grid linspace(1, 0, steps + 1): z <- z - (t_i - t_{i+1}) u(z, r=t_{i+1}, t=t_i). One step is
    x = e - u(e, 0, 1). Deterministic given ``noise`` (see ``make_noise``).
    """
    grid = _time_grid(steps, noise)
    z = noise
    ones = torch.ones(noise.shape[0], device=noise.device, dtype=torch.float32)
    for i in range(steps):
        t_i, t_next = grid[i], grid[i + 1]
        u = cfg_velocity(net, z, ones * t_next, ones * t_i, cond, cfg_scale, null_cond)
        z = z - (t_i - t_next).to(z.dtype) * u.to(z.dtype)
    return z


@torch.no_grad()
def sample_flow_matching(
    net: Net, noise: Tensor, cond: Cond, steps: int = 50, cfg_scale: float = 1.0, null_cond: Cond | None = None
) -> Tensor:
    """Euler integration of dz/dt = u(z, t, t) from t = 1 to t = 0 on linspace(1, 0, steps + 1)."""
    grid = _time_grid(steps, noise)
    z = noise
    ones = torch.ones(noise.shape[0], device=noise.device, dtype=torch.float32)
    for i in range(steps):
        t_i, t_next = grid[i], grid[i + 1]
        u = cfg_velocity(net, z, ones * t_i, ones * t_i, cond, cfg_scale, null_cond)
        z = z - (t_i - t_next).to(z.dtype) * u.to(z.dtype)
    return z
