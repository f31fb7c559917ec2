"""A run limited only by wall-clock time (``trainer.max_time``, ``max_steps: -1``) measures its schedule length
over its first steps (``training.time_budget``): the flow-matching baseline of ``make demo-compose`` gets the
MeanFlow fit's wall time, and its learning-rate decay and time-sampler schedules span the steps that time holds."""

from __future__ import annotations

import itertools

import pytest
import torch

import emf_lightning.training.module as module_file
from emf_lightning.meanflow import FlowMatchingLoss
from emf_lightning.training.time_budget import CALIBRATION_STEPS, StepPace, steps_in_budget

from helpers import FixedBatches, quiet_trainer, shapes_batch, tiny_module


def loader(n: int) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(FixedBatches([shapes_batch(2, 16, seed=s) for s in range(n)]), batch_size=None)


def ticking(seconds_per_call: float):
    ticks = itertools.count()
    return lambda: next(ticks) * seconds_per_call


def test_the_pace_is_timed_over_the_steps_after_the_first():
    pace = StepPace(steps=3, clock=iter([100.0, 101.0, 101.5, 103.0]).__next__)
    assert pace.observe(1) is None  # the clock starts when the first step has ended
    assert pace.observe(2) is None and pace.observe(3) is None
    assert pace.observe(4) == pytest.approx((103.0 - 100.0) / 3)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        StepPace(steps=0)


def test_the_schedule_spans_the_steps_done_and_those_the_rest_of_the_budget_holds():
    assert steps_in_budget(21, 0.5, 100.0) == 221
    assert steps_in_budget(21, 0.3, 1.0) == 24
    assert steps_in_budget(21, 0.5, -3.0) == 22  # the budget is spent: at least one more step
    with pytest.raises(ValueError, match="seconds_per_step must be positive"):
        steps_in_budget(21, 0.0, 10.0)


def test_a_run_limited_by_max_time_sets_its_schedule_length_after_the_calibration_steps(monkeypatch):
    """Each optimiser step takes 0.5 s on a stand-in clock, the budget is 600 s: the schedules span about 1200
    steps, set after CALIBRATION_STEPS timed steps; before, progress stays at its start."""
    monkeypatch.setattr(module_file, "StepPace", lambda: StepPace(clock=ticking(0.5)))
    module = tiny_module(loss=FlowMatchingLoss())
    seen = []

    class Watch(module_file.pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append((pl_module.schedule_length(), pl_module.progress()))

    trainer = quiet_trainer(max_time={"seconds": 600}, max_steps=-1, max_epochs=1, callbacks=[Watch()])
    trainer.fit(module, loader(CALIBRATION_STEPS + 3))
    assert [total for total, _ in seen[: CALIBRATION_STEPS + 1]] == [None] * (CALIBRATION_STEPS + 1)
    total = seen[-1][0]
    assert 1100 < total <= CALIBRATION_STEPS + 1 + 1200  # the real timer has spent a few seconds of the 600
    assert seen[-1][1] == pytest.approx((CALIBRATION_STEPS + 2) / total)
    assert all(p == 0.0 for _, p in seen[: CALIBRATION_STEPS + 1])


def test_a_step_limit_still_fixes_the_schedule_length_under_a_time_limit():
    module = tiny_module(loss=FlowMatchingLoss())
    quiet_trainer(max_time={"seconds": 600}, max_steps=3).fit(module, loader(3))
    assert module.schedule_length() == 3 and module._pace is None
