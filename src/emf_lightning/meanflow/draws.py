"""Random draws that are reproducible from a ``torch.Generator`` or an integer seed, on any device."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def draw_device(generator: torch.Generator | None, device: torch.device | str | None) -> torch.device:
    """Draw on the generator's device (torch requires it), else on the target device."""
    if generator is not None:
        return generator.device
    return torch.device(device) if device is not None else torch.device("cpu")


def randn(shape: Sequence[int], generator: torch.Generator | None, device=None, dtype=torch.float32) -> Tensor:
    """Standard normal draws on the generator's device, moved to ``device``."""
    out = torch.randn(tuple(shape), generator=generator, device=draw_device(generator, device), dtype=dtype)
    return out.to(device) if device is not None else out


def rand(shape: Sequence[int], generator: torch.Generator | None, device=None) -> Tensor:
    """Uniform [0, 1) float32 draws on the generator's device, moved to ``device``."""
    out = torch.rand(tuple(shape), generator=generator, device=draw_device(generator, device))
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
    return randn(shape, seed, device, dtype)
