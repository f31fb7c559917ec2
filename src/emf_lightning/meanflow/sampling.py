"""Samplers: from noise at t = 1 to data at t = 0, with optional classifier-free guidance.

Both samplers walk the grid linspace(1, 0, steps + 1) with z <- z - (t_i - t_{i+1}) u(z, r, t_i); they differ
only in r: MeanFlow asks for the average velocity over the whole jump (r = t_{i+1}), flow matching for the
instantaneous velocity at its start (r = t_i, an Euler step).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from emf_lightning.meanflow.conditions import Cond, concat_conditions, expand_rows

Net = Callable[..., Tensor]


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
        torch.cat([z, z]), torch.cat([r, r]), torch.cat([t, t]), *concat_conditions(cond, expand_rows(null_cond, b))
    )
    u_c, u_null = both.chunk(2)
    return u_null + cfg_scale * (u_c - u_null)


@torch.no_grad()
def integrate(
    net: Net,
    noise: Tensor,
    cond: Cond,
    steps: int,
    average_velocity: bool,
    cfg_scale: float = 1.0,
    null_cond: Cond | None = None,
) -> Tensor:
    """Jump from t = 1 to t = 0 on linspace(1, 0, steps + 1); times in the noise's dtype (float32 or wider).

    ``average_velocity``: query u(z, t_{i+1}, t_i) (MeanFlow) instead of u(z, t_i, t_i) (Euler).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    dtype = torch.promote_types(noise.dtype, torch.float32)
    grid = torch.linspace(1.0, 0.0, steps + 1, device=noise.device, dtype=dtype)
    ones = torch.ones(noise.shape[0], device=noise.device, dtype=dtype)
    z = noise
    for t_i, t_next in zip(grid[:-1], grid[1:]):
        r = t_next if average_velocity else t_i
        u = cfg_velocity(net, z, ones * r, ones * t_i, cond, cfg_scale, null_cond)
        z = z - (t_i - t_next).to(z.dtype) * u.to(z.dtype)
    return z


def sample_meanflow(
    net: Net, noise: Tensor, cond: Cond, steps: int = 1, cfg_scale: float = 1.0, null_cond: Cond | None = None
) -> Tensor:
    """MeanFlow sampling in ``steps`` jumps; one step is x = e - u(e, 0, 1). Deterministic given ``noise``."""
    return integrate(net, noise, cond, steps, True, cfg_scale, null_cond)


def sample_flow_matching(
    net: Net, noise: Tensor, cond: Cond, steps: int = 50, cfg_scale: float = 1.0, null_cond: Cond | None = None
) -> Tensor:
    """Euler integration of dz/dt = u(z, t, t) in ``steps`` steps."""
    return integrate(net, noise, cond, steps, False, cfg_scale, null_cond)
