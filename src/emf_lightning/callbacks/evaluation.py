"""EvaluationCallback: when to run the :class:`~emf_lightning.evaluation.Evaluator` in a Lightning run, and
where its numbers go: every ``every_n_steps`` during ``fit`` and at the end of ``validate`` (so ``emf validate
--ckpt`` runs it), on the first ``num_samples`` samples of the validation loader (read by rank 0, broadcast).
Logs ``eval/<metric>@<n>step_cfg<g>`` (real images: ``eval/<metric>@real``), writes a grid and a JSON file to
``<run dir>/eval/`` (global rank 0), sends the grid to loggers that take images, prints a table under validate.

Failures during ``fit`` never cost the run: an evaluation that raises is one error line (the traceback at DEBUG
level), counted in ``eval/failed_evaluations``; training and checkpointing go on, and the end-of-training
evaluation runs after the checkpoint callbacks wrote the final checkpoint. Under ``validate`` errors propagate.
With several processes this holds for errors every rank meets (the metrics come from gathered data; a failure to
read the held-out set is broadcast from rank 0); an error on one rank only (out of memory while generating)
leaves the others waiting in a collective, as it would without the catch.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from emf_lightning.evaluation import (
    EvaluationResult,
    Evaluator,
    HeldOutSet,
    Processes,
    collect_held_out,
    print_table,
    write_outputs,
)

log = logging.getLogger(__name__)


class EvaluationCallback(Callback):
    """Few-step sample quality during training and under ``validate`` (see the module docstring).

    Args:
        every_n_steps: evaluate when ``global_step`` is a multiple of this during ``fit`` (0: never).
        num_samples: held-out prompts (and real images) per evaluation.
        grid_prompts: rows of the sample grid (0: no grid).
        grid_upscale: magnification of grid cells; ``None`` makes cells at least 128 px.
        on_train_end: also evaluate the final weights when training ends off the ``every_n_steps`` grid
            (``max_time`` reached, interrupted, or ``max_steps`` not a multiple).
        output_dir: folder for grids and JSON (default ``<trainer.log_dir or default_root_dir>/eval``).
        print_table: print the rich table (``None``: only under ``validate``).
        evaluator_args: the :class:`~emf_lightning.evaluation.Evaluator`'s arguments (``steps``, ``cfg_scales``,
            ``seed``, ``batch_size``, ``fid``, ``clip_score``, ``shapes_eval``, injected metrics, ...); a config
            names them beside the ones above.
    """

    def __init__(
        self,
        every_n_steps: int = 5000,
        num_samples: int = 256,
        grid_prompts: int = 8,
        grid_upscale: int | None = None,
        on_train_end: bool = False,
        output_dir: str | None = None,
        print_table: bool | None = None,
        **evaluator_args: Any,
    ):
        super().__init__()
        if every_n_steps < 0:
            raise ValueError(f"every_n_steps must be >= 0, got {every_n_steps}")
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        # LightningCLI reads the Evaluator's parameters through this call (jsonargparse follows **kwargs).
        self.evaluator = Evaluator(keep_images=grid_prompts, name="EvaluationCallback", **evaluator_args)
        self.every_n_steps = every_n_steps
        self.num_samples = num_samples
        self.grid_prompts = grid_prompts
        self.grid_upscale = grid_upscale
        self.evaluate_on_train_end = on_train_end
        self.output_dir = output_dir
        self.print_table = print_table
        self.failed_evaluations = 0  # evaluations during fit that raised (caught: they never stop training)
        self._held_out: HeldOutSet | None = None
        self._last_step = -1
        self._ckpt_step: int | None = None
        self.last_result: EvaluationResult | None = None

    # ------------------------------------------------------------------ hooks
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx) -> None:
        """Evaluate at every ``every_n_steps``-th optimiser step (once per step under accumulation)."""
        step = trainer.global_step
        if self.every_n_steps <= 0 or step == 0 or step % self.every_n_steps or step == self._last_step:
            return
        self._evaluate_and_log(trainer, pl_module)

    def _evaluate_during_fit(self, trainer: Trainer, pl_module: LightningModule) -> EvaluationResult | None:
        """``evaluate``, but an error is reported, counted and logged instead of raised: during ``fit`` an
        evaluation is a by-product, and it must never stop the run or cost it a checkpoint. (Under
        ``validate`` evaluation is the job, and errors propagate.)"""
        try:
            return self.evaluate(trainer, pl_module)
        except Exception as err:  # noqa: BLE001 - any evaluation failure, reported below
            self.failed_evaluations += 1
            where = f" on rank {trainer.global_rank}" if trainer.world_size > 1 else ""
            log.error(
                "EvaluationCallback: evaluation at step %d failed%s: %s: %s. Training goes on and "
                "checkpoints are still written (traceback at DEBUG level, logger %r).",
                trainer.global_step,
                where,
                type(err).__name__,
                err,
                log.name,
            )
            log.debug("evaluation at step %d failed", trainer.global_step, exc_info=True)
            self._log(trainer, {"eval/failed_evaluations": float(self.failed_evaluations)})
            return None

    def _evaluate_and_log(self, trainer: Trainer, pl_module: LightningModule) -> None:
        result = self._evaluate_during_fit(trainer, pl_module)
        if result is not None and result.flat():  # all skipped: the grid and JSON are written, no empty row
            self._log(trainer, result.flat())

    @staticmethod
    def _log(trainer: Trainer, metrics: dict[str, float]) -> None:
        # Direct logger call: values logged from a train hook would wait for log_every_n_steps.
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """With ``on_train_end``, evaluate the final weights unless that step was just evaluated: a run cut
        short by ``max_time`` or an interrupt still reports where it got to."""
        if self.evaluate_on_train_end and trainer.global_step > 0 and trainer.global_step != self._last_step:
            self._save_final_checkpoints(trainer, pl_module)
            self._evaluate_and_log(trainer, pl_module)

    @staticmethod
    def _save_final_checkpoints(trainer: Trainer, pl_module: LightningModule) -> None:
        """Let the checkpoint callbacks write the final checkpoint before the final evaluation.

        Lightning runs checkpoint callbacks after every other callback, so without this a long final evaluation
        that is killed (or crashes the process) would leave no ``last.ckpt``. A ModelCheckpoint's train-end save
        happens once: it remembers the step it last wrote, so Lightning's own call after this one writes nothing.
        """
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint):
                callback.on_train_end(trainer, pl_module)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Evaluate under ``validate`` (during ``fit``, ``every_n_steps`` decides)."""
        fn = getattr(trainer.state.fn, "value", trainer.state.fn)
        if trainer.sanity_checking or fn != "validate":
            return
        result = self.evaluate(trainer, pl_module)  # evaluation is the job here: errors propagate
        # Same values on every rank (computed from gathered data): no reduction needed.
        pl_module.log_dict(result.flat(), sync_dist=False)

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        """Remember the checkpoint's step: ``validate --ckpt`` runs with ``trainer.global_step == 0``."""
        step = checkpoint.get("global_step")
        self._ckpt_step = int(step) if step is not None else None

    def _model_step(self, trainer: Trainer) -> int:
        """Training step of the weights being evaluated (names files, titles and the JSON)."""
        fn = getattr(trainer.state.fn, "value", trainer.state.fn)
        if fn != "fit" and self._ckpt_step is not None:
            return self._ckpt_step
        return trainer.global_step

    # ------------------------------------------------------------------ the evaluation
    def evaluate(self, trainer: Trainer, pl_module: LightningModule) -> EvaluationResult:
        """Run one evaluation and write its outputs; returns its numbers (also kept as ``last_result``)."""
        self._last_step = trainer.global_step
        held = self._held_out_set(trainer)
        processes = Processes(
            trainer.global_rank, trainer.world_size, trainer.strategy.all_gather, trainer.strategy.root_device
        )
        result = self.evaluator.evaluate(pl_module, held, processes)
        result.global_step = self._model_step(trainer)
        out_dir = self._run_dir(trainer)  # on every rank: trainer.log_dir is a collective (broadcast)
        if trainer.is_global_zero:
            write_outputs(
                result,
                held,
                out_dir,
                self.grid_prompts,
                self.grid_upscale,
                epoch=trainer.current_epoch,
                checkpoint=str(trainer.ckpt_path) if trainer.ckpt_path else None,
            )
            if result.grid_path is not None:
                self._log_image(trainer, result.grid_path, result.global_step)
            fn = getattr(trainer.state.fn, "value", trainer.state.fn)
            if self.print_table or (self.print_table is None and fn == "validate"):
                print_table(result)
        self.last_result = result
        return result

    def _held_out_set(self, trainer: Trainer) -> HeldOutSet:
        if self._held_out is None:
            held, failure = None, None
            if trainer.is_global_zero:
                try:
                    held = collect_held_out(self._val_batches(trainer), self.num_samples, self._dataset_id(trainer))
                except Exception as err:  # noqa: BLE001 - sent to the other ranks, then raised everywhere
                    if trainer.world_size == 1:
                        raise
                    failure = err
                if held is not None and len(held) < self.num_samples:
                    log.info("evaluation uses %d held-out samples (num_samples=%d)", len(held), self.num_samples)
            if trainer.world_size > 1:
                # The other ranks wait in this broadcast: they get rank 0's error too, so that every rank fails
                # (and, during fit, recovers) alike instead of some waiting forever in a collective.
                held, message = trainer.strategy.broadcast(
                    (held, None if failure is None else f"{type(failure).__name__}: {failure}"), src=0
                )
                if failure is not None:
                    raise failure
                if message is not None:
                    raise RuntimeError(f"rank 0 could not read the held-out set: {message}")
            self._held_out = held
        return self._held_out

    @staticmethod
    def _val_batches(trainer: Trainer) -> Iterable[dict[str, Any]]:
        dm = getattr(trainer, "datamodule", None)
        loader = dm.val_dataloader() if hasattr(dm, "val_dataloader") else trainer.val_dataloaders
        if isinstance(loader, (list, tuple)):
            loader = loader[0] if loader else None
        if loader is None:
            raise RuntimeError(
                "EvaluationCallback needs validation data: give the trainer a datamodule with val_dataloader()"
            )
        return loader

    @staticmethod
    def _dataset_id(trainer: Trainer) -> list[str] | None:
        """The validation shards: they name the held-out set in the reference-feature cache."""
        shards = getattr(getattr(trainer, "datamodule", None), "val_shards", None)
        if not shards:
            return None
        return [shards] if isinstance(shards, str) else [str(s) for s in shards]

    # ------------------------------------------------------------------ outputs (rank 0)
    def _run_dir(self, trainer: Trainer) -> Path:
        if self.output_dir is not None:
            return Path(self.output_dir)
        return Path(trainer.log_dir or trainer.default_root_dir or ".") / "eval"

    @staticmethod
    def _log_image(trainer: Trainer, path: Path, step: int) -> None:
        from PIL import Image

        image = np.asarray(Image.open(path).convert("RGB"))
        for logger in trainer.loggers:
            if hasattr(logger, "log_image"):  # WandbLogger and other loggers with a generic image API
                logger.log_image(key="eval/samples", images=[image], step=step)
                continue
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_image"):  # TensorBoard SummaryWriter
                experiment.add_image("eval/samples", image, step, dataformats="HWC")
