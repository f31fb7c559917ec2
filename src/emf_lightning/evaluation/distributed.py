"""Splitting an evaluation over processes and putting the pieces back together in order.

Generation batch ``b`` goes to rank ``b % world_size``; every rank then gathers every row, so all ranks
compute the same numbers from the full set and no further reduction is needed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor


def batch_plan(n: int, batch_size: int, rank: int, world_size: int) -> list[tuple[int, int, int]]:
    """(batch index, start, stop) of the generation batches this rank handles: batch ``b`` covers
    ``[b * batch_size, min(n, (b + 1) * batch_size))`` and goes to rank ``b % world_size``."""
    n_batches = math.ceil(n / batch_size)
    return [(b, b * batch_size, min(n, (b + 1) * batch_size)) for b in range(rank, n_batches, world_size)]


def gather_in_order(
    local_rows: Tensor,
    local_index: Tensor,
    total: int,
    world_size: int,
    max_rows: int,
    all_gather: Callable[[Tensor], Tensor],
) -> Tensor:
    """Reassemble rows computed on several ranks into global order.

    ``local_rows[i]`` belongs at global position ``local_index[i]``. Every rank pads to ``max_rows`` (equal
    shapes for ``all_gather``), gathers rows and indices as ``[world_size, max_rows, ...]``, and scatters.
    """
    pad = max_rows - local_rows.shape[0]
    rows = torch.cat([local_rows, local_rows.new_zeros((pad, *local_rows.shape[1:]))])
    index = torch.cat([local_index, local_index.new_full((pad,), -1)])
    g_rows = all_gather(rows).reshape(world_size * max_rows, *local_rows.shape[1:])
    g_index = all_gather(index).reshape(-1)
    keep = g_index >= 0
    out = local_rows.new_zeros((total, *local_rows.shape[1:]))
    out[g_index[keep].to(out.device)] = g_rows[keep].to(out.device)
    return out


@dataclass(frozen=True)
class Processes:
    """The processes that evaluate together: this one's rank, their number, and how they exchange tensors.

    ``all_gather(t)`` returns ``[world_size, *t.shape]`` on every rank (Lightning's ``strategy.all_gather``
    has this contract); tensors travel on ``device``.
    """

    rank: int = 0
    world_size: int = 1
    all_gather: Callable[[Tensor], Tensor] | None = None
    device: torch.device | str = "cpu"

    @classmethod
    def from_torch_distributed(cls) -> Processes:
        """The default process group (one process when torch.distributed is not initialised)."""
        if not (dist.is_available() and dist.is_initialized()):
            return cls()
        world_size = dist.get_world_size()

        def all_gather(t: Tensor) -> Tensor:
            out = [torch.empty_like(t) for _ in range(world_size)]
            dist.all_gather(out, t.contiguous())
            return torch.stack(out)

        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        return cls(dist.get_rank(), world_size, all_gather, device)

    def plan(self, n: int, batch_size: int, rank: int | None = None) -> list[tuple[int, int, int]]:
        """This rank's (or ``rank``'s) generation batches over ``n`` rows. Under several processes the batch size
        shrinks so every rank owns a batch (a rank without rows could not join the gather with the right shape)."""
        if self.world_size > n:
            raise ValueError(
                f"{n} held-out samples cannot be split over {self.world_size} processes; raise num_samples"
            )
        size = min(batch_size, math.ceil(n / self.world_size))
        return batch_plan(n, size, self.rank if rank is None else rank, self.world_size)

    def gather(self, parts: list[Tensor], index: list[int], total: int, batch_size: int) -> Tensor:
        """Rows this rank computed (``parts``, at global positions ``index``) -> all ``total`` rows, on CPU."""
        rows, idx = torch.cat(parts), torch.tensor(index, dtype=torch.long)
        if self.world_size == 1:
            return rows  # one process: the plan is every batch, in order
        max_rows = max(sum(b - a for _, a, b in self.plan(total, batch_size, r)) for r in range(self.world_size))
        out = gather_in_order(
            rows.to(self.device), idx.to(self.device), total, self.world_size, max_rows, self.all_gather
        )
        return out.cpu()
