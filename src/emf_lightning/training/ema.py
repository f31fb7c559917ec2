"""Exponential moving average of a network's weights, with a warm-up so that short runs are usable."""

from __future__ import annotations

import copy

import torch
from torch import nn


def ema_decay_at(step: int, decay: float) -> float:
    """Decay used for the update after optimiser step ``step`` (0-based).

    ``min(decay, (1 + step) / (10 + step))``: early updates follow the model closely (0.1 at step 0), so an
    EMA of a 100-step run is not still dominated by the random initialisation.
    """
    if step < 0:
        raise ValueError(f"EMA step must be >= 0, got {step}")
    return min(float(decay), (1.0 + step) / (10.0 + step))


def make_ema_copy(model: nn.Module) -> nn.Module:
    """A frozen deep copy of ``model`` to hold its moving average (no grads).

    Its train/eval flag follows the parent module (Lightning warns about eval-mode submodules at fit
    start); whoever samples with it switches it to eval, as ``EMFModule.generate`` and the val loop do.
    """
    ema = copy.deepcopy(model)
    ema.requires_grad_(False)
    return ema


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """In place: ``ema <- decay * ema + (1 - decay) * model`` for parameters; buffers are copied.

    Both modules must have the same parameter names and shapes (``ema`` is a copy of ``model``).
    """
    ema_params = dict(ema.named_parameters())
    model_params = dict(model.named_parameters())
    if ema_params.keys() != model_params.keys():
        missing = sorted(set(model_params) ^ set(ema_params))
        raise ValueError(f"EMA and model parameters differ: {missing[:10]}")
    names = list(model_params)
    # One fused kernel launch per dtype/device group instead of one per tensor.
    torch._foreach_lerp_(
        [ema_params[n] for n in names], [model_params[n].detach().to(ema_params[n].dtype) for n in names], 1.0 - decay
    )
    ema_buffers = dict(ema.named_buffers())
    for name, buf in model.named_buffers():
        ema_buffers[name].copy_(buf)
