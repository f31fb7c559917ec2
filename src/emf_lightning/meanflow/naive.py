"""The naive MeanFlow loss, shaped like public code (py-meanflow): the baseline ``emf bench`` times and the
reference the tests compare the production loss with.

``torch.func.jvp`` over the whole batch with math attention everywhere, u taken from the JVP's primal (its
autograd graph kept). The production loss (``meanflow.MeanFlowLoss``) must give the same loss and gradients.
Only the JVP differs: the path, guidance, tangent choice and weighting are the production ones.
"""

from __future__ import annotations

import torch

from emf_lightning.meanflow.losses import MeanFlowLoss
from emf_lightning.meanflow.tangent_rules import jvp_safe_attention


class ReferenceMeanFlowLoss(MeanFlowLoss):
    """MeanFlowLoss with the full-batch, graph-keeping JVP of public implementations."""

    def loss_on_path(self, net, p):
        z, r, t, cond = p.z, p.r, p.t, p.cond
        v_g, dz_dt = self.velocity_and_tangent(net, p)
        with jvp_safe_attention():
            u, dudt = torch.func.jvp(
                lambda z_, r_, t_: net(z_, r_, t_, *cond), (z, r, t), (dz_dt, torch.zeros_like(r), torch.ones_like(t))
            )
        interval = (t - r).view(-1, *[1] * (z.ndim - 1))
        return self.regress(u, (v_g - interval * dudt).detach(), r, t, p.drop)
