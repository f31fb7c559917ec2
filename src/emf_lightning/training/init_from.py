"""Start a run from another run's generator weights (EMF's flow-matching -> MeanFlow fine-tuning recipe)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from emf_lightning.training.sharding import load_full_state_dict


class IncompatibleCheckpointError(ValueError):
    """A checkpoint's generator does not match this model's architecture."""


def read_checkpoint_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The ``state_dict`` of a Lightning checkpoint (or of a bare state-dict file), loaded on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"init_from checkpoint not found: {path}")
    # weights_only: a checkpoint is data; refusing pickled code keeps `init_from` safe on foreign files.
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict):
        raise IncompatibleCheckpointError(f"{path} holds a {type(ckpt).__name__}, not a checkpoint dict")
    state = ckpt.get("state_dict", ckpt)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise IncompatibleCheckpointError(f"{path} has no tensor state_dict")
    return state


def _sub_state(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def describe_mismatch(target: nn.Module, state: dict[str, torch.Tensor], limit: int = 20) -> list[str]:
    """Human-readable differences between ``target``'s parameters/buffers and ``state`` (empty if none)."""
    own = target.state_dict()
    lines: list[str] = []
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    for k in missing:
        lines.append(f"missing in checkpoint: {k} {tuple(own[k].shape)}")
    for k in unexpected:
        lines.append(f"not in this model: {k} {tuple(state[k].shape)}")
    for k in shapes:
        lines.append(f"shape mismatch: {k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}")
    if len(lines) > limit:
        lines = lines[:limit] + [f"... and {len(lines) - limit} more"]
    return lines


def load_generator_weights(module: Any, path: str | Path, copy_time_to_interval: bool = True) -> None:
    """Load ``generator`` (and ``ema_generator`` when present) from the checkpoint at ``path``.

    A checkpoint without EMA weights initialises the EMA from the loaded generator. With
    ``copy_time_to_interval`` the interval (t - r) embedder of both copies starts from the time embedder,
    which is what a flow-matching model (always r = t) has actually trained.

    Raises:
        IncompatibleCheckpointError: listing missing, unexpected and mis-shaped keys.
    """
    state = read_checkpoint_state(path)
    gen_state = _sub_state(state, "generator.")
    if not gen_state:
        raise IncompatibleCheckpointError(
            f"{path} holds no 'generator.*' weights (is it an emf-lightning checkpoint?); "
            f"first keys: {sorted(state)[:5]}"
        )
    problems = describe_mismatch(module.generator, gen_state)
    if problems:
        raise IncompatibleCheckpointError(
            f"Checkpoint {path} was trained with another generator architecture than this model "
            f"(the backbone class, its size and input shape, and the encoder width must match):\n  "
            + "\n  ".join(problems)
        )
    ema_state = _sub_state(state, "ema_generator.")
    if not ema_state or describe_mismatch(module.ema_generator, ema_state):
        ema_state = gen_state
    if copy_time_to_interval:
        gen_state, ema_state = _time_to_interval(gen_state), _time_to_interval(ema_state)
    # Full state dicts in, whether the modules are plain or FSDP2-sharded (then each rank keeps its shard).
    load_full_state_dict(module.generator, gen_state)
    load_full_state_dict(module.ema_generator, ema_state)


def _time_to_interval(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state with the interval (t - r) embedder's weights replaced by the time embedder's."""
    src, dst = "backbone.t_embedder.", "backbone.interval_embedder."
    out = dict(state)
    for key, value in state.items():
        if key.startswith(src):
            out[dst + key[len(src) :]] = value.clone()
    return out
