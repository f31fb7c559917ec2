"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for the generator and its EMA copy.

Lightning runs FSDP2 through ``ModelParallelStrategy`` (data-parallel size = number of processes, tensor-parallel
size 1): it builds the device mesh and calls ``EMFModule.configure_model``, which shards here. Both copies are
sharded the same way, unit by unit, so every parameter of the EMA copy is a DTensor with exactly the placement of
its training twin: the EMA update is then a purely local lerp of the shards, with no communication.

Units: the backbone's ``sharding_units()`` (the DiT's blocks, the U-Net's down/mid/up steps, a diffusers
transformer's blocks), then the whole generator (connector, embedders, final layer). A forward all-gathers a
unit's parameters just before it runs and frees them after, so peak parameter memory is one unit plus the shards. Every forward is
a collective: all ranks must call the sharded network the same number of times (the evaluation pads its
generation plan for that, see ``callbacks/evaluation.py``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = [
    "grad_norm",
    "is_sharded",
    "load_full_state_dict",
    "max_abs",
    "shard_generator",
    "sharding_units",
    "unsharded",
]


def _dtensor_cls() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch build without distributed
        return None
    return DTensor


def is_sharded(module: nn.Module) -> bool:
    """Whether any parameter of ``module`` is a DTensor (FSDP2 shard)."""
    dtensor = _dtensor_cls()
    return dtensor is not None and any(isinstance(p, dtensor) for p in module.parameters())


def sharding_units(generator: nn.Module) -> list[nn.Module]:
    """The modules sharded as their own FSDP2 units: the backbone's ``sharding_units()`` (DiT blocks; U-Net
    down, mid and up steps; the transformer blocks of a diffusers backbone)."""
    return generator.backbone.sharding_units()


def shard_generator(generator: nn.Module, mesh, reshard_after_forward: bool = True) -> nn.Module:
    """Shard ``generator`` in place over the 1-D data-parallel ``mesh``: each unit, then the root.

    FSDP2 shards along dim 0 and needs contiguous parameters: the U-Net keeps its conv weights channels-last
    (faster convolutions), so they are made contiguous first; the forward's outputs do not change.
    """
    from torch.distributed.fsdp import fully_shard

    if is_sharded(generator):
        return generator
    for p in generator.parameters():
        if not p.is_contiguous():
            p.data = p.data.contiguous()
    for unit in sharding_units(generator):
        fully_shard(unit, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(generator, mesh=mesh, reshard_after_forward=reshard_after_forward)
    return generator


def load_full_state_dict(module: nn.Module, state: dict[str, Tensor]) -> None:
    """Load an ordinary (full, unsharded) state dict into ``module``, sharded or not (strict)."""
    if not is_sharded(module):
        module.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(module, state, options=StateDictOptions(full_state_dict=True, strict=True))


@contextmanager
def unsharded(module: nn.Module) -> Iterator[nn.Module]:
    """Inside, the root unit's parameters of a sharded ``module`` are full, plain tensors, so its direct
    children outside the block units (the text connector) can be called on their own. A collective: every
    rank must enter. A no-op for an unsharded module."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(module, FSDPModule):
        yield module
        return
    module.unshard()
    try:
        yield module
    finally:
        module.reshard()


def grad_norm(params: Iterable[nn.Parameter]) -> Tensor | None:
    """The global L2 norm of the gradients (float32), or None when no parameter has one.

    ``torch.nn.utils.get_total_norm`` does the arithmetic. On FSDP2 gradients (DTensors) it returns a DTensor
    holding this rank's partial norm; ``full_tensor()`` is the cross-shard reduction (an all-reduce over the
    gradients' mesh), so every rank gets the same global norm. A collective then: every rank must call it.
    """
    dtensor = _dtensor_cls()
    grads = [p.grad.detach() for p in params if p.grad is not None]
    if not grads:
        return None
    sharded = [g for g in grads if dtensor is not None and isinstance(g, dtensor)]
    plain = [g for g in grads if dtensor is None or not isinstance(g, dtensor)]
    norms = []
    if sharded:
        total = torch.nn.utils.get_total_norm(sharded, norm_type=2.0)
        norms.append(total.full_tensor() if isinstance(total, dtensor) else total)
    if plain:
        norms.append(torch.nn.utils.get_total_norm(plain, norm_type=2.0))
    # Sharded and plain parts (a module partly outside FSDP2) combine as one vector's norm would.
    return torch.linalg.vector_norm(torch.stack([n.float().to(norms[0].device) for n in norms]))


def max_abs(tensors: Iterable[Tensor]) -> Tensor:
    """The largest ``|value|`` over ``tensors`` (a float32 0-d tensor on their device), ``+inf`` when any value
    is NaN or infinite; sharded (DTensor) values are reduced over their mesh, so every rank gets the same answer.

    One fused multi-tensor reduction (``_foreach_norm`` with ord=inf) and no host sync: the caller reads it once.
    """
    dtensor = _dtensor_cls()
    local: list[Tensor] = []
    group = None
    device = torch.device("cpu")
    for t in tensors:
        t = t.detach()
        if dtensor is not None and isinstance(t, dtensor):
            group = t.device_mesh.get_group()
            t = t.to_local()
        device = t.device
        if t.numel():  # a rank's shard may be empty; the inf-norm of nothing is undefined
            local.append(t)
    if local:
        largest = torch.stack(torch._foreach_norm(local, float("inf"), dtype=torch.float32)).amax()
    else:
        largest = torch.zeros((), dtype=torch.float32, device=device)
    # NaN -> inf before reducing: a max across ranks may drop a NaN (every comparison with it is false).
    largest = largest.nan_to_num(nan=float("inf"), posinf=float("inf"))
    if group is not None:
        dist.all_reduce(largest, op=dist.ReduceOp.MAX, group=group)
    return largest
