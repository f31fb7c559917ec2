"""Gradient accumulation (a larger effective batch, docs/scaling.md): every micro-batch draws its own
noise, (r, t) and dropout, although they share one ``global_step``."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from emf_lightning.meanflow import MeanFlowLoss, TimeSampler

from helpers import shapes_batch, tiny_module


class RecordDraws(Callback):
    """Records (e, r, t, drop) of every loss call in training."""

    def on_train_start(self, trainer, pl_module) -> None:
        self.draws: list[dict[str, torch.Tensor]] = []
        compute = pl_module.loss_fn.compute

        def recording(net, x, e, r, t, cond, null_cond=None, drop=None):
            self.draws.append({"e": e.clone(), "r": r.clone(), "t": t.clone(), "drop": drop.clone()})
            return compute(net, x, e, r, t, cond, null_cond, drop)

        pl_module.loss_fn.compute = recording


def run(accumulate: int, steps: int) -> list[dict[str, torch.Tensor]]:
    """Train ``steps`` optimiser steps with ``accumulate`` micro-batches each; the draws of every loss call."""
    module = tiny_module(loss=MeanFlowLoss(TimeSampler(neq_ratio=0.5), cond_drop_prob=0.5))
    recorder = RecordDraws()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        accumulate_grad_batches=accumulate,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[recorder],
    )
    # The same batch every time: any difference between draws comes from the random streams.
    batch = shapes_batch(4, 16)
    trainer.fit(module, torch.utils.data.DataLoader([batch] * (accumulate * steps), batch_size=None))
    assert trainer.global_step == steps
    return recorder.draws


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def test_micro_batches_of_one_step_draw_independently():
    draws = run(accumulate=2, steps=2)
    assert len(draws) == 4
    for i in range(4):
        for j in range(i):
            assert not torch.equal(draws[i]["e"], draws[j]["e"]), (i, j)
            assert not torch.equal(draws[i]["t"], draws[j]["t"]), (i, j)
    # The first micro-batch of each step draws exactly what a run without accumulation draws at that step.
    plain = run(accumulate=1, steps=2)
    assert same(draws[0], plain[0]) and same(draws[2], plain[1])
