"""du/dt for the MeanFlow target: the one production path.

The target u_tgt = v - (t - r) du/dt needs the total derivative of u(z, r, t) along (dz/dt, dr/dt, dt/dt) =
(tangent, 0, 1). Three facts make it cheap:

- where r = t the derivative is multiplied by t - r = 0, so only the r != t rows run the JVP;
- du/dt is a stop-gradient constant, so the JVP keeps no autograd graph: it runs under ``torch.no_grad``
  with ``torch.autograd.forward_ad`` dual tensors, before the forward that keeps its graph, so the two
  activation peaks never stack (a MeanFlow step needs the memory of a flow-matching step);
- PyTorch's generic forward-AD rules for linear, conv and the norms are slow; ``tangent_rules`` gives them
  closed forms, and the same mode sends attention down a JVP-safe path (fused SDPA kernels have no
  forward-mode rule).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

from emf_lightning.meanflow.conditions import Cond, take_rows
from emf_lightning.meanflow.tangent_rules import fast_tangents

Net = Callable[..., Tensor]


JVP_PRECISIONS = ("autocast", "fp32")


def du_dt(
    net: Net, z: Tensor, r: Tensor, t: Tensor, tangent_z: Tensor, cond: Cond, precision: str = "autocast"
) -> Tensor:
    """du/dt along (tangent_z, 0, 1) on the rows with r != t, zeros elsewhere; no autograd graph, z's dtype.

    ``precision``: "autocast" runs the JVP in whatever autocast is active (bf16 under bf16-mixed training);
    "fp32" switches autocast off and runs it in float32 (at least), as the reference codes compute du/dt.
    """
    if precision not in JVP_PRECISIONS:
        raise ValueError(f"unknown JVP precision {precision!r}; choose one of {JVP_PRECISIONS}")
    out = torch.zeros_like(z)
    rows = (r != t).nonzero().squeeze(1)
    if not rows.numel():
        return out
    args = (z[rows], r[rows], t[rows], tangent_z[rows], take_rows(cond, rows))
    if precision == "fp32":
        with torch.autocast(z.device.type, enabled=False):
            rows_dudt = graph_free_jvp(
                net, *(_at_least_fp32(a) for a in args[:4]), tuple(_at_least_fp32(c) for c in args[4])
            )
    else:
        rows_dudt = graph_free_jvp(net, *args)
    return out.index_copy(0, rows, rows_dudt.to(out.dtype))


def _at_least_fp32(x: Tensor) -> Tensor:
    """Floating tensors in at least float32 (masks and float64 untouched)."""
    return x.to(torch.promote_types(x.dtype, torch.float32)) if x.is_floating_point() else x


def graph_free_jvp(net: Net, z: Tensor, r: Tensor, t: Tensor, tangent_z: Tensor, cond: Cond) -> Tensor:
    """du/dt along (tangent_z, 0, 1) for every row: dual tensors + closed-form tangent rules, no graph.

    r carries no tangent, so it stays a plain tensor; so do the text conditions.
    """
    with torch.no_grad(), fast_tangents(), fwAD.dual_level():
        u = net(fwAD.make_dual(z, tangent_z.to(z.dtype)), r, fwAD.make_dual(t, torch.ones_like(t)), *cond)
        dudt = fwAD.unpack_dual(u).tangent
    if dudt is None:  # the output does not depend on z or t (e.g. a zero-initialised last layer)
        dudt = torch.zeros_like(u)
    return dudt
