"""The two training objectives on one backbone: MeanFlow (average velocity) and flow matching (the baseline).

Conventions (docs/architecture.md): z_t = (1 - t) x + t e with e ~ N(0, I), t = 1 is noise, v = e - x; the
network ``net(z, r, t, *cond)`` predicts the average velocity over [r, t], and ``net(z, t, t, *cond)`` is the
instantaneous velocity. ``cond`` is a tuple of batch-first tensors (for the text generator:
``(text_tokens, text_mask)``). Both losses share the path, condition dropout, official MeanFlow's
training-time guidance and the adaptive weight; they differ only in the target.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from emf_lightning.errors import require_finite
from emf_lightning.meanflow.conditions import Cond, concat_conditions, expand_rows, merge_conditions, take_rows
from emf_lightning.meanflow.draws import rand, randn
from emf_lightning.meanflow.jvp import JVP_PRECISIONS, du_dt
from emf_lightning.meanflow.sampling import sample_flow_matching, sample_meanflow
from emf_lightning.meanflow.time import TimeSampler
from emf_lightning.utils.specs import RecordsInitArgs

Net = Callable[..., Tensor]
JVP_TANGENTS = ("conditional", "predicted")


def _acc(x: Tensor) -> Tensor:
    """At least float32 for the loss arithmetic (bf16/fp16 network outputs); float64 stays float64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _bcast(v: Tensor, like: Tensor) -> Tensor:
    """[B] -> [B, 1, ..., 1] broadcastable against ``like``."""
    return v.view(v.shape[0], *([1] * (like.ndim - 1)))


@dataclass
class PathSample:
    """A batch placed on the path, all batch-first: what each objective builds its target from."""

    z: Tensor  # z_t = (1 - t) x + t e
    v: Tensor  # the sample's velocity e - x
    r: Tensor
    t: Tensor
    cond: Cond  # after condition dropout
    null_cond: Cond | None
    drop: Tensor | None  # [B] bool: the rows whose condition was dropped


class Objective(RecordsInitArgs):
    """What MeanFlowLoss and FlowMatchingLoss share: drawing, dropout, guidance, weighting, statistics.

    Args:
        time_sampler: draws (r, t); default ``TimeSampler()`` (logit-normal(-0.4, 1), 25 % r != t).
        adaptive_p, adaptive_c: per-sample weight 1 / (loss + c)^p (p = 0 gives the plain squared error).
        guidance_omega, guidance_kappa, guidance_interval: official MeanFlow's training-time guidance,
            v_g = omega v + (1 - omega - kappa) u(z, t, t, null) + kappa u(z, t, t, c) for t inside the
            interval; omega = 1, kappa = 0 disables it (EMF applies CFG only at sampling).
        cond_drop_prob: share of training samples whose condition is replaced by the null condition (they
            keep the unguided target v).
    """

    objective: str = ""
    #: The sampler that inverts this objective, and the step counts evaluation uses by default.
    sampler: Callable[..., Tensor]
    eval_steps: tuple[int, ...] = (1, 2, 4)

    def __init__(
        self,
        time_sampler: TimeSampler | None = None,
        adaptive_p: float = 1.0,
        adaptive_c: float = 1e-3,
        guidance_omega: float = 1.0,
        guidance_kappa: float = 0.0,
        guidance_interval: Sequence[float] = (0.0, 1.0),
        cond_drop_prob: float = 0.1,
    ):
        self.time_sampler = time_sampler if time_sampler is not None else TimeSampler()
        numbers = dict(
            adaptive_p=adaptive_p,
            adaptive_c=adaptive_c,
            guidance_omega=guidance_omega,
            guidance_kappa=guidance_kappa,
            guidance_interval=guidance_interval,
            cond_drop_prob=cond_drop_prob,
        )
        for name, value in numbers.items():  # a NaN passes every range check and fails far from its cause
            require_finite(f"loss.{name}", value)
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

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.init_args.items())
        return f"{type(self).__name__}({args})"

    @property
    def uses_guidance(self) -> bool:
        """Whether the target mixes in the network's own velocities (official MeanFlow's training CFG)."""
        return self.guidance_omega != 1.0 or self.guidance_kappa != 0.0

    # ------------------------------------------------------------------------------------------- the call
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
        """Draw (r, t), noise and condition dropout, then return ``compute(...)`` = (loss, stats).

        ``drop_mask`` ([B] bool) replaces the loss's own dropout draw (evaluation passes all False).
        """
        if null_cond is None and (self.uses_guidance or self.cond_drop_prob > 0 or drop_mask is not None):
            raise ValueError(
                "null_cond is required for training-time guidance (omega != 1 or kappa != 0) and for condition dropout"
            )
        e, r, t, drop = self.draw(x, progress, generator)
        if drop_mask is not None:
            drop = drop_mask.to(device=x.device, dtype=torch.bool)
        return self.compute(net, x, e, r, t, cond, null_cond, drop)

    def draw(
        self, x: Tensor, progress: float = 0.0, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """Noise e, times (r, t) in x's dtype and, when cond_drop_prob > 0, the per-sample dropout mask."""
        b = x.shape[0]
        r, t = self.time_sampler(b, progress, x.device, generator, dtype=x.dtype)
        e = randn(x.shape, generator, x.device, x.dtype)
        drop = rand((b,), generator, x.device) < self.cond_drop_prob if self.cond_drop_prob > 0 else None
        return e, r, t, drop

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
        return self.loss_on_path(net, self.path(x, e, r, t, cond, null_cond, drop))

    def loss_on_path(self, net: Net, p: PathSample) -> tuple[Tensor, dict[str, Tensor]]:
        """The objective's own part: its target, the network's prediction and ``regress``."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------ the parts
    @staticmethod
    def path(
        x: Tensor, e: Tensor, r: Tensor, t: Tensor, cond: Cond, null_cond: Cond | None, drop: Tensor | None
    ) -> PathSample:
        """Path point z_t, the sample's velocity v = e - x, and the conditions after dropout."""
        if e.shape != x.shape:
            raise ValueError(f"noise shape {tuple(e.shape)} != data shape {tuple(x.shape)}")
        if drop is not None and drop.any():
            assert null_cond is not None
            cond = merge_conditions(cond, null_cond, drop)
        tb = _bcast(t.to(x.dtype), x)
        return PathSample((1.0 - tb) * x + tb * e, e - x, r, t, cond, null_cond, drop)

    @torch.no_grad()
    def own_velocities(
        self, net: Net, z: Tensor, t: Tensor, cond: Cond | None, null_cond: Cond | None
    ) -> tuple[Tensor | None, Tensor | None]:
        """The network's instantaneous velocities u(z, t, t, c) and/or u(z, t, t, null) (those asked for by a
        non-None condition): constants of the target, no gradient, both in one batch when both are asked for."""
        b = z.shape[0]
        if cond is not None and null_cond is not None:
            both = net(
                torch.cat([z, z]),
                torch.cat([t, t]),
                torch.cat([t, t]),
                *concat_conditions(cond, expand_rows(null_cond, b)),
            )
            u_cond, u_null = _acc(both).chunk(2)
            return u_cond, u_null
        if null_cond is not None:
            return None, _acc(net(z, t, t, *expand_rows(null_cond, b)))
        return _acc(net(z, t, t, *cond)), None

    def guide(
        self, v: Tensor, u_cond: Tensor | None, u_null: Tensor | None, t: Tensor, dropped: Tensor | None
    ) -> Tensor:
        """omega v + (1 - omega - kappa) u_null + kappa u_cond inside the guidance t-interval; v elsewhere and
        for samples whose condition was dropped."""
        if not self.uses_guidance:
            return v
        omega, kappa = self.guidance_omega, self.guidance_kappa
        v_g = omega * _acc(v) + (1.0 - omega - kappa) * u_null
        if kappa != 0.0:
            v_g = v_g + kappa * u_cond
        lo, hi = self.guidance_interval
        apply = (t >= lo) & (t <= hi)
        if dropped is not None:
            apply = apply & ~dropped
        return torch.where(_bcast(apply, v), v_g.to(v.dtype), v)

    def guided_velocity(self, net: Net, p: PathSample) -> Tensor:
        """The target velocity v_g (``guide``), running the network only when guidance is on."""
        if not self.uses_guidance:
            return p.v
        u_cond, u_null = self.own_velocities(net, p.z, p.t, p.cond if self.guidance_kappa != 0.0 else None, p.null_cond)
        return self.guide(p.v, u_cond, u_null, p.t, p.drop)

    def regress(
        self, u: Tensor, target: Tensor, r: Tensor, t: Tensor, drop: Tensor | None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Adaptively weighted squared error of u against the (constant) target, and the step's statistics.

        Per sample: l = ||u - target||^2 summed over dims, weighted by 1 / (l.detach() + c)^p; in float32 even
        when the network ran under bf16 autocast.
        """
        sq = (_acc(u) - _acc(target).detach()) ** 2
        per_sample = sq.flatten(1).sum(1)
        w = 1.0 / (per_sample.detach() + self.adaptive_c) ** self.adaptive_p
        loss = (w * per_sample).mean()
        return loss, self._stats(loss, sq, w, r, t, drop)

    @staticmethod
    def _stats(loss: Tensor, sq: Tensor, w: Tensor, r: Tensor, t: Tensor, drop: Tensor | None) -> dict[str, Tensor]:
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


class MeanFlowLoss(Objective):
    """The MeanFlow objective (Geng et al., 2025): regress u(z, r, t) on u_tgt = v - (t - r) du/dt.

    du/dt is the total derivative along (dz/dt, 0, 1), a stop-gradient constant computed by a graph-free JVP
    on the r != t rows only (``meanflow.jvp``). Args as :class:`Objective`, plus:

    Args:
        jvp_tangent: dz/dt in du/dt. "conditional" (MeanFlow): the sample's own velocity v = e - x (or the
            guided v_g). "predicted" (improved MeanFlow, Geng et al. 2025, arXiv 2512.02012): the network's
            instantaneous velocity u(z, t, t, c), no gradient, guided like v when guidance is on. e - x is one
            noisy draw of the marginal velocity at z; the network's estimate is not, so the target stops
            carrying that noise. Costs one no-gradient forward on the r != t rows (shared with guidance's).
        jvp_precision: "autocast" (default): du/dt in whatever autocast is active, bf16 under bf16-mixed
            training; "fp32": autocast off inside the JVP, as py-meanflow and EMF compute it (about twice the
            JVP's arithmetic cost on bf16 hardware; du/dt then carries fp32's error instead of bf16's).
    """

    objective = "meanflow"
    sampler = staticmethod(sample_meanflow)

    def __init__(
        self,
        time_sampler: TimeSampler | None = None,
        adaptive_p: float = 1.0,
        adaptive_c: float = 1e-3,
        guidance_omega: float = 1.0,
        guidance_kappa: float = 0.0,
        guidance_interval: Sequence[float] = (0.0, 1.0),
        cond_drop_prob: float = 0.1,
        jvp_tangent: str = "conditional",
        jvp_precision: str = "autocast",
    ):
        super().__init__(
            time_sampler, adaptive_p, adaptive_c, guidance_omega, guidance_kappa, guidance_interval, cond_drop_prob
        )
        if jvp_tangent not in JVP_TANGENTS:
            raise ValueError(f"unknown jvp_tangent '{jvp_tangent}'; choose one of {JVP_TANGENTS}")
        if jvp_precision not in JVP_PRECISIONS:
            raise ValueError(f"unknown jvp_precision '{jvp_precision}'; choose one of {JVP_PRECISIONS}")
        self.jvp_tangent = jvp_tangent
        self.jvp_precision = jvp_precision

    def loss_on_path(self, net: Net, p: PathSample) -> tuple[Tensor, dict[str, Tensor]]:
        """u_tgt = v_g - (t - r) du/dt, regressed by u(z, r, t)."""
        r, t = p.r, p.t
        if bool((r > t).any()):
            raise ValueError("MeanFlowLoss needs r <= t for every sample")
        v_g, dz_dt = self.velocity_and_tangent(net, p)
        dudt = du_dt(net, p.z, r, t, dz_dt, p.cond, self.jvp_precision)  # before the graph-keeping forward
        u = net(p.z, r, t, *p.cond)
        u_tgt = _acc(v_g) - _acc(_bcast(t - r, p.z)) * _acc(dudt)
        loss, stats = self.regress(u, u_tgt, r, t, p.drop)
        if (r != t).any():
            stats["dudt_rms"] = _acc(dudt[r != t]).pow(2).mean().sqrt()
        return loss, stats

    def velocity_and_tangent(self, net: Net, p: PathSample) -> tuple[Tensor, Tensor]:
        """The (guided) target velocity v_g and the z-tangent of du/dt (see ``jvp_tangent``)."""
        if self.jvp_tangent == "conditional":
            v_g = self.guided_velocity(net, p)
            return v_g, v_g
        z, t, v, drop = p.z, p.t, p.v, p.drop
        if self.uses_guidance:  # guidance needs u(z, t, t, .) on every row anyway: one forward serves both
            u_cond, u_null = self.own_velocities(net, z, t, p.cond, p.null_cond)
            return self.guide(v, u_cond, u_null, t, drop), self.guide(u_cond.to(v.dtype), u_cond, u_null, t, drop)
        # Only the r != t rows use the tangent: elsewhere du/dt is multiplied by t - r = 0.
        tangent = v.clone()
        rows = (p.r != t).nonzero().squeeze(1)
        if rows.numel():
            u_rows, _ = self.own_velocities(net, z[rows], t[rows], take_rows(p.cond, rows), None)
            tangent = tangent.index_copy(0, rows, u_rows.to(v.dtype))
        return v, tangent


class FlowMatchingLoss(Objective):
    """Flow matching on the same backbone: ``net(z, t, t, *cond)`` regresses v (or the guided v_g).

    Same weighting, guidance and dropout options as MeanFlowLoss, so the objectives differ only in the
    target; r is ignored. Evaluated at 1, 2, 4 and 50 Euler steps by default.
    """

    objective = "flow_matching"
    sampler = staticmethod(sample_flow_matching)
    eval_steps = (1, 2, 4, 50)

    def loss_on_path(self, net: Net, p: PathSample) -> tuple[Tensor, dict[str, Tensor]]:
        """v_g regressed by u(z, t, t) (r ignored)."""
        return self.regress(net(p.z, p.t, p.t, *p.cond), self.guided_velocity(net, p), p.t, p.t, p.drop)
