"""Schedules for a run limited by wall-clock time (``trainer.max_time``) instead of a step count.

The learning-rate decay and MeanFlow's time-sampler schedules span the run's length in optimiser steps. A run given
only a time budget (``trainer.max_time`` with ``max_steps: -1``, as the flow-matching baseline of
``make demo-compose`` is: same wall time as the MeanFlow fit, and its steps are cheaper) does not know that length
in advance. It is measured instead: the run times ``CALIBRATION_STEPS`` optimiser steps after the first (which pays
one-off costs) and sets the schedule length to the steps done plus those the remaining budget holds at that pace.
Until then the schedules stay at their start (learning-rate warm-up is longer than the calibration).
"""

from __future__ import annotations

import time

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Timer

CALIBRATION_STEPS = 20


def time_limit(trainer: pl.Trainer) -> Timer | None:
    """The trainer's ``Timer`` when the run is limited by wall-clock time, else None."""
    for callback in trainer.callbacks:
        if isinstance(callback, Timer) and callback.time_remaining() is not None:
            return callback
    return None


def steps_in_budget(step: int, seconds_per_step: float, seconds_left: float) -> int:
    """The schedule length of a run at optimiser step ``step`` with ``seconds_left`` of its budget at
    ``seconds_per_step``: at least one step more than it has done."""
    if seconds_per_step <= 0:
        raise ValueError(f"seconds_per_step must be positive, got {seconds_per_step}")
    return step + max(1, int(max(seconds_left, 0.0) / seconds_per_step))


class StepPace:
    """Seconds per optimiser step, timed over ``steps`` steps from the first step it sees (the clock starts when
    that step has ended, so the first step's one-off costs are left out)."""

    def __init__(self, steps: int = CALIBRATION_STEPS, clock=time.perf_counter):
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        self.steps = steps
        self.clock = clock
        self._start: tuple[int, float] | None = None

    def observe(self, step: int) -> float | None:
        """Call after each optimiser step with the global step: the seconds per step once ``steps`` steps have been
        timed, else None."""
        now = self.clock()
        if self._start is None:
            self._start = (step, now)
            return None
        first, started = self._start
        if step - first < self.steps:
            return None
        return (now - started) / (step - first)
