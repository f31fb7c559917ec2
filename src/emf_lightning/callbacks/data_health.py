"""End-of-epoch report of skipped input, summed over all ranks, as metrics and one printed line."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info

from emf_lightning.data.datamodule import ShardLoader
from emf_lightning.data.health import ALL_REASONS


def _shard_loaders(loaders: Any) -> list[ShardLoader]:
    """The ShardLoaders among whatever Lightning holds (a loader, a list/tuple/dict of loaders, or None)."""
    if isinstance(loaders, ShardLoader):
        return [loaders]
    if isinstance(loaders, dict):
        loaders = loaders.values()
    if isinstance(loaders, Iterable) and not isinstance(loaders, (str, bytes, torch.utils.data.DataLoader)):
        return [x for x in loaders if isinstance(x, ShardLoader)]
    return []


class DataHealthCallback(Callback):
    """Sum each `ShardLoader`'s per-epoch skip tally over ranks; log `data/<split>_skipped_<reason>`.

    Every rank must run it (the sum is a collective). Logged values are global totals, identical on
    every rank; the printed summary appears once, on rank zero. Only reasons that occurred are logged,
    plus `data/<split>_samples` (samples delivered, summed over ranks).
    """

    def _report(self, trainer: Trainer, pl_module: LightningModule, split: str, loaders: Any) -> None:
        found = _shard_loaders(loaders)
        if not found:
            return
        local = torch.zeros(len(ALL_REASONS) + 1, dtype=torch.float64)
        for loader in found:
            for i, reason in enumerate(ALL_REASONS):
                local[i] += loader.tally.counts.get(reason, 0)
            local[-1] += loader.tally.samples
        total = trainer.strategy.reduce(local.to(pl_module.device), reduce_op="sum")
        total = total.cpu() if isinstance(total, torch.Tensor) else local
        metrics = {f"data/{split}_skipped_{r}": float(total[i]) for i, r in enumerate(ALL_REASONS) if total[i] > 0}
        metrics[f"data/{split}_samples"] = float(total[-1])
        # already summed over ranks: sync_dist would sum again
        pl_module.log_dict(metrics, on_step=False, on_epoch=True, sync_dist=False, rank_zero_only=False)
        skipped = {r: int(total[i]) for i, r in enumerate(ALL_REASONS) if total[i] > 0}
        line = f"data health, {split} epoch {trainer.current_epoch}: {int(total[-1])} samples"
        line += (", skipped " + ", ".join(f"{r}={n}" for r, n in skipped.items())) if skipped else ", nothing skipped"
        rank_zero_info(line)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Report the training loader's epoch."""
        self._report(trainer, pl_module, "train", trainer.train_dataloader)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Report the validation loaders' epoch (not during the sanity check, which reads only a few batches)."""
        if not trainer.sanity_checking:
            self._report(trainer, pl_module, "val", trainer.val_dataloaders)

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Report the test loaders' epoch."""
        self._report(trainer, pl_module, "test", trainer.test_dataloaders)
