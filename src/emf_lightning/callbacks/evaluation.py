"""EvaluationCallback: FID, KID, CLIP score and ShapesEval of few-step samples, plus a prompt x step grid.

What it does at each evaluation (every ``every_n_steps`` optimiser steps during ``fit``, and at the end of
``validate``, so ``emf validate --ckpt ...`` runs it):

1. Takes the first ``num_samples`` held-out samples (image, caption, spec, key) of the datamodule's
   validation loader, once per run.
2. For every step count x guidance scale, generates one image per held-out caption with the EMA weights
   (``pl_module.generate``; batch ``b`` uses seed ``seed + b``, so every setting sees the same noise and
   the result does not depend on the number of processes).
3. Computes, per setting, against the real held-out images:
   ``fid``, ``kid``, ``kid_std`` (Inception features; the real set's features are cached on disk per
   dataset), ``clip_score`` (image vs its caption) and ``shapes_<category>`` (ShapesEval accuracies, on
   samples that carry a scene spec). The real images get ``clip_score`` and ``shapes_*`` too, as a ceiling.
4. Logs every number as ``eval/<metric>@<n>step_cfg<g>`` (real images: ``eval/<metric>@real``), writes a
   PNG grid (rows: the first ``grid_prompts`` prompts; columns: real, then each setting) and a JSON file
   to ``<run dir>/eval/``, and sends the grid to loggers that take images. Under ``validate`` it also
   prints a rich table (rows: settings, columns: metrics).

Missing Inception or CLIP weights: one warning naming the file and the places looked, then that metric
is skipped for the rest of the run; every other metric still comes out.

ShapesEval judges only samples whose ``batch["spec"]`` is a scene spec (the datamodule leaves it None for
other datasets' metadata) and says once how many of the held-out samples it judges.

Failures during ``fit`` never cost the run: an evaluation that raises is reported in one error line (the
traceback at DEBUG level), counted in ``eval/failed_evaluations``, and training and checkpointing go on; the
end-of-training evaluation runs after the checkpoint callbacks have written the final checkpoint. Under
``validate`` evaluation is the job, and its errors propagate. With several processes this holds for errors
every rank meets (the metrics are computed from gathered data; a failure to read the held-out set is
broadcast from rank 0); an error on one rank only (out of memory while generating) leaves the others
waiting in a collective, as it would without the catch.

Distributed: rank 0 reads the held-out set and broadcasts it; generation, Inception features and CLIP
scores are split by batch over ranks and gathered in order (``strategy.all_gather``), so every rank
computes the same numbers from the full set and logs them without a further reduction. Files, tables
and images are written by global rank 0 only.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from emf_lightning.metrics.fid import (
    ReferenceFeatureCache,
    extract_features,
    frechet_distance,
    kernel_inception_distance,
    load_inception,
)
from emf_lightning.utils.grids import save_grid
from emf_lightning.utils.images import to_uint8
from emf_lightning.utils.progress import progress
from emf_lightning.utils.report import print_metrics_table, write_metrics_json
from emf_lightning.utils.weights import MissingWeightsError

log = logging.getLogger(__name__)

MEANFLOW_STEPS = (1, 2, 4)
FLOW_MATCHING_STEPS = (1, 2, 4, 50)
REAL = "real"


def setting_suffix(steps: int, cfg_scale: float) -> str:
    """``1step_cfg1.0``: the part of a metric key that names a sampling setting."""
    return f"{int(steps)}step_cfg{float(cfg_scale)}"


def metric_key(metric: str, steps: int | None = None, cfg_scale: float | None = None, prefix: str = "eval") -> str:
    """``eval/fid@1step_cfg1.0``; with ``steps=None``, the real-image row ``eval/clip_score@real``."""
    suffix = REAL if steps is None else setting_suffix(steps, 1.0 if cfg_scale is None else cfg_scale)
    return f"{prefix}/{metric}@{suffix}"


def setting_label(steps: int, cfg_scale: float) -> str:
    """Human label for tables and grid columns: ``1 step, cfg 1.0``."""
    return f"{steps} step{'s' if steps != 1 else ''}, cfg {float(cfg_scale)}"


@dataclass
class HeldOutSet:
    """The real samples an evaluation compares against (same order everywhere)."""

    images: np.ndarray  # uint8 [N, H, W, 3]
    captions: list[str]
    specs: list[dict | None]
    keys: list[str]

    def __len__(self) -> int:
        return len(self.captions)


def collect_held_out(batches: Iterable[dict[str, Any]], n: int) -> HeldOutSet:
    """First ``n`` samples of an iterable of datamodule batches ({"image", "caption", "spec", "key"}).

    Samples with an empty caption are skipped (the empty caption is the null condition, not a prompt);
    keys default to the running index when a batch has none.
    """
    images: list[np.ndarray] = []
    captions: list[str] = []
    specs: list[dict | None] = []
    keys: list[str] = []
    skipped = 0
    for batch in batches:
        imgs = batch["image"]
        arr = to_uint8(imgs) if isinstance(imgs, Tensor) else np.asarray(imgs, dtype=np.uint8)
        caps = list(batch["caption"])
        bspecs = list(batch.get("spec") or [None] * len(caps))
        bkeys = list(batch.get("key") or [str(len(keys) + skipped + i) for i in range(len(caps))])
        for img, cap, spec, key in zip(arr, caps, bspecs, bkeys):
            if not cap:
                skipped += 1
                continue
            images.append(img)
            captions.append(str(cap))
            specs.append(spec)
            keys.append(str(key))
            if len(captions) == n:
                break
        if len(captions) == n:
            break
    if skipped:
        log.info("held-out set: skipped %d samples with an empty caption", skipped)
    if not captions:
        raise ValueError("the validation data yielded no samples with a caption to evaluate on")
    return HeldOutSet(np.stack(images), captions, specs, keys)


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
    if world_size == 1:
        out = local_rows.new_zeros((total, *local_rows.shape[1:]))
        out[local_index] = local_rows
        return out
    pad = max_rows - local_rows.shape[0]
    rows = torch.cat([local_rows, local_rows.new_zeros((pad, *local_rows.shape[1:]))])
    index = torch.cat([local_index, local_index.new_full((pad,), -1)])
    g_rows = all_gather(rows).reshape(world_size * max_rows, *local_rows.shape[1:])
    g_index = all_gather(index).reshape(-1)
    keep = g_index >= 0
    out = local_rows.new_zeros((total, *local_rows.shape[1:]))
    out[g_index[keep].to(out.device)] = g_rows[keep].to(out.device)
    return out


@dataclass
class EvaluationResult:
    """Numbers of one evaluation: ``rows[label] -> {metric -> value}`` plus what was skipped and why."""

    global_step: int
    rows: dict[str, dict[str, float]] = field(default_factory=dict)
    settings: list[tuple[int, float]] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    grid_path: Path | None = None
    json_path: Path | None = None

    def flat(self, prefix: str = "eval") -> dict[str, float]:
        """``{eval/<metric>@<setting>: value}`` for the logger."""
        out: dict[str, float] = {}
        for (steps, cfg), label in zip(self.settings, self._setting_labels()):
            for name, value in self.rows.get(label, {}).items():
                out[metric_key(name, steps, cfg, prefix)] = value
        for name, value in self.rows.get(REAL, {}).items():
            out[metric_key(name, prefix=prefix)] = value
        return out

    def _setting_labels(self) -> list[str]:
        return [setting_label(s, g) for s, g in self.settings]


class EvaluationCallback(Callback):
    """Few-step sample quality during training and under ``validate`` (see the module docstring).

    Args:
        every_n_steps: evaluate when ``global_step`` is a multiple of this during ``fit`` (0: never).
        num_samples: held-out prompts (and real images) per evaluation.
        steps: sampling step counts; ``None``: (1, 2, 4), or (1, 2, 4, 50) when ``pl_module.objective``
            is ``"flow_matching"`` (the baseline needs many steps).
        cfg_scales: classifier-free guidance scales (1.0 = no guidance).
        seed: noise seed; generation batch ``b`` uses ``seed + b``.
        batch_size: generation / feature batch size.
        fid: compute FID and KID (needs Inception weights or ``fid_feature_extractor``).
        kid_subsets, kid_subset_size: KID subsets (the size is clipped to the set size).
        clip_score: compute the CLIP score (needs CLIP weights or ``clip_scorer``).
        shapes_eval: run ShapesEval on samples that carry a shapes-world spec.
        inception_path: Inception weights file or folder; ``None`` searches the usual caches.
        clip_model: open_clip architecture (``ViT-B-32``) or a Hugging Face CLIP repo id / folder.
        clip_pretrained: open_clip pretrained tag or checkpoint file (ignored for Hugging Face models).
        grid_prompts: rows of the sample grid (0: no grid).
        grid_upscale: magnification of grid cells; ``None`` makes cells at least 128 px.
        on_fit_validation: also evaluate at the end of every validation epoch during ``fit``.
        on_train_end: also evaluate the final weights when training ends off the ``every_n_steps`` grid
            (``max_time`` reached, interrupted, or ``max_steps`` not a multiple).
        reference_cache_dir: where real-image features are cached (default ``emf_cache_dir()/fid_refs``).
        output_dir: folder for grids and JSON (default ``<trainer.log_dir or default_root_dir>/eval``).
        print_table: print the rich table (``None``: only under ``validate``).
        fid_feature_extractor: inject a feature extractor (uint8 ``[B, 3, H, W]`` -> ``[B, D]``) instead
            of Inception; cached to disk only when it has a ``feature_id`` attribute.
        clip_scorer: inject a ready :class:`~emf_lightning.metrics.clip_score.CLIPScorer`.
        shapes_evaluator: inject an object with ``evaluate(images_uint8, specs) -> dict``.
    """

    def __init__(
        self,
        every_n_steps: int = 5000,
        num_samples: int = 256,
        steps: Sequence[int] | None = None,
        cfg_scales: Sequence[float] = (1.0,),
        seed: int = 0,
        batch_size: int = 64,
        fid: bool = True,
        kid_subsets: int = 100,
        kid_subset_size: int = 1000,
        clip_score: bool = True,
        shapes_eval: bool = True,
        inception_path: str | None = None,
        clip_model: str = "ViT-B-32",
        clip_pretrained: str | None = "openai",
        grid_prompts: int = 8,
        grid_upscale: int | None = None,
        on_fit_validation: bool = False,
        on_train_end: bool = False,
        reference_cache_dir: str | None = None,
        output_dir: str | None = None,
        print_table: bool | None = None,
        fid_feature_extractor: nn.Module | None = None,
        clip_scorer: nn.Module | None = None,
        shapes_evaluator: Any | None = None,
    ):
        super().__init__()
        if every_n_steps < 0:
            raise ValueError(f"every_n_steps must be >= 0, got {every_n_steps}")
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if steps is not None and (not steps or any(int(s) < 1 for s in steps)):
            raise ValueError(f"steps must be a non-empty list of integers >= 1, got {steps}")
        if not cfg_scales:
            raise ValueError("cfg_scales must not be empty")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.every_n_steps = every_n_steps
        self.num_samples = num_samples
        self.steps = tuple(int(s) for s in steps) if steps is not None else None
        self.cfg_scales = tuple(float(g) for g in cfg_scales)
        self.seed = seed
        self.batch_size = batch_size
        self.fid = fid
        self.kid_subsets = kid_subsets
        self.kid_subset_size = kid_subset_size
        self.clip_score = clip_score
        self.shapes_eval = shapes_eval
        self.inception_path = inception_path
        self.clip_model = clip_model
        self.clip_pretrained = clip_pretrained
        self.grid_prompts = grid_prompts
        self.grid_upscale = grid_upscale
        self.on_fit_validation = on_fit_validation
        self.evaluate_on_train_end = on_train_end
        self.reference_cache = ReferenceFeatureCache(reference_cache_dir)
        self.output_dir = output_dir
        self.print_table = print_table

        self._extractor = fid_feature_extractor
        self._clip = clip_scorer
        self._shapes = shapes_evaluator
        self._disabled: dict[str, str] = {}  # metric -> reason, filled once (one warning each)
        self._shapes_announced = False
        self.failed_evaluations = 0  # evaluations during fit that raised (caught: they never stop training)
        self._held_out: HeldOutSet | None = None
        self._real_features: Tensor | None = None
        self._real_row: dict[str, float] | None = None
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
            log.error("EvaluationCallback: evaluation at step %d failed%s: %s: %s. Training goes on and "
                      "checkpoints are still written (traceback at DEBUG level, logger %r).",
                      trainer.global_step, where, type(err).__name__, err, log.name)
            log.debug("evaluation at step %d failed", trainer.global_step, exc_info=True)
            failed = {"eval/failed_evaluations": float(self.failed_evaluations)}
            for logger in trainer.loggers:
                logger.log_metrics(failed, step=trainer.global_step)
            trainer.callback_metrics.update({k: torch.tensor(v) for k, v in failed.items()})
            return None

    def _evaluate_and_log(self, trainer: Trainer, pl_module: LightningModule) -> None:
        result = self._evaluate_during_fit(trainer, pl_module)
        if result is None:
            return
        metrics = result.flat()
        if not metrics:  # every metric skipped: the grid and JSON are written, the logger gets no empty row
            return
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
        """Evaluate under ``validate``, and during ``fit`` when ``on_fit_validation``."""
        if trainer.sanity_checking:
            return
        fn = getattr(trainer.state.fn, "value", trainer.state.fn)
        if fn == "validate":
            result = self.evaluate(trainer, pl_module)  # evaluation is the job here: errors propagate
        elif fn == "fit" and self.on_fit_validation and trainer.global_step != self._last_step:
            result = self._evaluate_during_fit(trainer, pl_module)
        else:
            return
        if result is not None:
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
    def settings_for(self, pl_module: LightningModule) -> list[tuple[int, float]]:
        """(steps, cfg) pairs, step-major, defaulting the step list by objective."""
        steps = self.steps
        if steps is None:
            steps = FLOW_MATCHING_STEPS if getattr(pl_module, "objective", "meanflow") == "flow_matching" else MEANFLOW_STEPS
        return [(s, g) for s in steps for g in self.cfg_scales]

    @torch.no_grad()
    def evaluate(self, trainer: Trainer, pl_module: LightningModule) -> EvaluationResult:
        """Run one evaluation; returns its numbers (also kept as ``last_result``)."""
        self._last_step = trainer.global_step
        held = self._held_out_set(trainer)
        device = pl_module.device
        result = EvaluationResult(global_step=self._model_step(trainer), settings=self.settings_for(pl_module))
        extractor = self._feature_extractor(device)
        clip = self._clip_model(device)
        shapes = self._shapes_evaluator(held)

        real_feats = self._reference_features(trainer, held, extractor) if extractor is not None else None
        result.rows[REAL] = self._real_metrics(trainer, held, clip, shapes)

        grid_columns: list[np.ndarray] = []
        n_batches = len(self._plan(trainer, len(held)))
        bar = progress("evaluation", total=n_batches * len(result.settings), enabled=trainer.is_global_zero)
        with bar as advance:
            measured = [
                self._generate_and_measure(trainer, pl_module, held, steps, cfg, extractor, clip, advance)
                for steps, cfg in result.settings
            ]
        for (steps, cfg), (images, feats, clip_scores) in zip(result.settings, measured):
            row: dict[str, float] = {}
            if feats is not None and real_feats is not None:
                if len(held) < 2:
                    self._disable("fid", "FID/KID need at least 2 held-out samples")
                else:
                    row["fid"] = frechet_distance(real_feats, feats)
                    row["kid"], row["kid_std"] = kernel_inception_distance(
                        real_feats, feats, self.kid_subsets, self.kid_subset_size, seed=self.seed
                    )
            if clip_scores is not None:
                row["clip_score"] = float(clip_scores.mean())
            if shapes is not None:
                row.update(self._shapes_metrics(shapes, images, held))
            result.rows[setting_label(steps, cfg)] = row
            grid_columns.append(images[: self.grid_prompts])
        result.skipped = dict(self._disabled)

        out_dir = self._run_dir(trainer)  # on every rank: trainer.log_dir is a collective (broadcast)
        if trainer.is_global_zero:
            self._write_outputs(trainer, out_dir, held, result, grid_columns)
        self.last_result = result
        return result

    # ------------------------------------------------------------------ pieces
    def _disable(self, metric: str, reason: str) -> None:
        if metric not in self._disabled:
            self._disabled[metric] = reason
            rank_zero_warn(f"EvaluationCallback: skipping {metric}: {reason}", category=UserWarning)

    def _held_out_set(self, trainer: Trainer) -> HeldOutSet:
        if self._held_out is None:
            held, failure = None, None
            if trainer.is_global_zero:
                try:
                    held = collect_held_out(self._val_batches(trainer), self.num_samples)
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
                    (held, None if failure is None else f"{type(failure).__name__}: {failure}"), src=0)
                if failure is not None:
                    raise failure
                if message is not None:
                    raise RuntimeError(f"rank 0 could not read the held-out set: {message}")
            self._held_out = held
        return self._held_out

    @staticmethod
    def _val_batches(trainer: Trainer) -> Iterable[dict[str, Any]]:
        dm = getattr(trainer, "datamodule", None)
        if dm is not None and hasattr(dm, "val_dataloader"):
            loader = dm.val_dataloader()
        else:
            loader = trainer.val_dataloaders
        if isinstance(loader, (list, tuple)):
            loader = loader[0] if loader else None
        if loader is None:
            raise RuntimeError("EvaluationCallback needs validation data: give the trainer a datamodule with val_dataloader()")
        return loader

    def _feature_extractor(self, device: torch.device) -> nn.Module | None:
        if not self.fid or "fid" in self._disabled:
            return None
        if self._extractor is None:
            try:
                self._extractor = load_inception(self.inception_path, device=device)
            except (MissingWeightsError, ImportError) as err:
                self._disable("fid", f"{err} (KID is skipped too)")
                return None
        return self._extractor.to(device).eval()

    def _clip_model(self, device: torch.device) -> nn.Module | None:
        if not self.clip_score or "clip_score" in self._disabled:
            return None
        if self._clip is None:
            from emf_lightning.metrics.clip_score import load_clip_scorer

            try:
                self._clip = load_clip_scorer(self.clip_model, self.clip_pretrained, device=device)
            except MissingWeightsError as err:
                self._disable("clip_score", str(err))
                return None
        return self._clip.to(device).eval()

    def _shapes_evaluator(self, held: HeldOutSet) -> Any | None:
        if not self.shapes_eval or "shapes" in self._disabled:
            return None
        judged = sum(1 for spec in held.specs if spec)
        if not self._shapes_announced:  # the held-out set is fixed for the run: say it once
            self._shapes_announced = True
            rank_zero_info(f"ShapesEval judges {judged} of {len(held)} held-out samples"
                           + (" (the others carry no shapes-world scene spec)" if judged < len(held) else ""))
        if not judged:
            self._disabled["shapes"] = "the held-out samples carry no shapes-world scene spec"
            return None
        if self._shapes is None:
            from emf_lightning.metrics.shapes_eval import ShapesEval

            self._shapes = ShapesEval()
        return self._shapes

    @staticmethod
    def _shapes_metrics(shapes: Any, images: np.ndarray, held: HeldOutSet) -> dict[str, float]:
        idx = [i for i, spec in enumerate(held.specs) if spec]
        scores = shapes.evaluate(images[idx], [held.specs[i] for i in idx])
        return {f"shapes_{name}": float(value) for name, value in scores.items()}

    def _reference_features(self, trainer: Trainer, held: HeldOutSet, extractor: nn.Module) -> Tensor:
        if self._real_features is None:
            compute = lambda: self._sharded_features(trainer, held.images, extractor)  # noqa: E731
            feature_id = getattr(extractor, "feature_id", None)
            dataset = self._dataset_id(trainer)
            if feature_id is not None and dataset is not None:
                # Every rank takes part in computing (collectives), only rank 0 writes the file.
                key = self.reference_cache.key(dataset, held.keys, held.images.shape[1], feature_id)
                cached = self.reference_cache.load(key)
                if cached is not None and cached.shape[0] == len(held):
                    self._real_features = cached
                else:
                    self._real_features = compute()
                    if trainer.is_global_zero:
                        meta = self.reference_cache._fields(dataset, held.keys, held.images.shape[1], feature_id)
                        self.reference_cache.save(key, self._real_features, meta)
            else:
                self._real_features = compute()
        return self._real_features

    @staticmethod
    def _dataset_id(trainer: Trainer) -> list[str] | None:
        dm = getattr(trainer, "datamodule", None)
        shards = getattr(dm, "val_shards", None)
        if not shards:
            return None
        return [shards] if isinstance(shards, str) else [str(s) for s in shards]

    def _sharded_features(self, trainer: Trainer, images: np.ndarray, extractor: nn.Module) -> Tensor:
        plan = self._plan(trainer, len(images))
        parts, index = [], []
        for _, start, stop in plan:
            parts.append(extract_features(extractor, images[start:stop], batch_size=self.batch_size))
            index.extend(range(start, stop))
        return self._gather(trainer, parts, index, len(images))

    def _real_metrics(self, trainer: Trainer, held: HeldOutSet, clip: nn.Module | None, shapes: Any | None) -> dict:
        if self._real_row is None:
            real = torch.from_numpy(held.images).permute(0, 3, 1, 2).float().div(127.5).sub(1)
            row: dict[str, float] = {}
            if clip is not None:
                plan = self._plan(trainer, len(held))
                parts = [clip.scores(real[a:b], held.captions[a:b]) for _, a, b in plan]
                index = [i for _, a, b in plan for i in range(a, b)]
                row["clip_score"] = float(self._gather(trainer, parts, index, len(held)).mean())
            if shapes is not None:
                row.update(self._shapes_metrics(shapes, held.images, held))
            self._real_row = row
        return dict(self._real_row)

    def _generate_and_measure(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        held: HeldOutSet,
        steps: int,
        cfg: float,
        extractor: nn.Module | None,
        clip: nn.Module | None,
        advance: Callable[..., None] | None = None,
    ) -> tuple[np.ndarray, Tensor | None, Tensor | None]:
        """Generate every held-out caption (this rank's batches), measure, gather in order; ``advance``
        (a progress counter) moves once per generation batch."""
        plan = self._plan(trainer, len(held))
        imgs, feats, scores, index = [], [], [], []
        if advance is not None:
            advance(0, description=f"evaluation: {setting_label(steps, cfg)}")
        for b, start, stop in plan:
            captions = held.captions[start:stop]
            x = pl_module.generate(captions, steps=steps, cfg_scale=cfg, seed=self.seed + b, use_ema=True)
            if x.shape[1] != 3:
                raise ValueError(f"generate() must return RGB images [B, 3, H, W], got {tuple(x.shape)}")
            u8 = to_uint8(x)
            imgs.append(torch.from_numpy(u8))
            if extractor is not None:
                feats.append(extract_features(extractor, u8, batch_size=self.batch_size))
            if clip is not None:
                scores.append(clip.scores(x, captions))
            index.extend(range(start, stop))
            if advance is not None:
                advance(1)
        n = len(held)
        if getattr(pl_module, "generation_is_collective", False):
            # Sharded weights (FSDP2): every forward all-gathers, so a rank with fewer batches than another
            # runs (and discards) one-caption batches until all ranks have called the generator equally often.
            bs = self._batch_size(n, trainer.world_size)
            most = max(len(batch_plan(n, bs, r, trainer.world_size)) for r in range(trainer.world_size))
            for _ in range(most - len(plan)):
                pl_module.generate(held.captions[:1], steps=steps, cfg_scale=cfg, seed=self.seed, use_ema=True)
        images = self._gather(trainer, imgs, index, n).numpy()
        return (
            images,
            self._gather(trainer, feats, index, n) if extractor is not None else None,
            self._gather(trainer, scores, index, n) if clip is not None else None,
        )

    def _batch_size(self, n: int, world_size: int) -> int:
        """Generation batch size: ``batch_size``, shrunk under multi-process runs so every rank owns a batch
        (a rank without rows could not join the gather with the right shape)."""
        if world_size > n:
            raise ValueError(f"{n} held-out samples cannot be split over {world_size} processes; raise num_samples")
        return min(self.batch_size, math.ceil(n / world_size))

    def _plan(self, trainer: Trainer, n: int) -> list[tuple[int, int, int]]:
        return batch_plan(n, self._batch_size(n, trainer.world_size), trainer.global_rank, trainer.world_size)

    def _gather(self, trainer: Trainer, parts: list[Tensor], index: list[int], total: int) -> Tensor:
        rows = torch.cat(parts)
        idx = torch.tensor(index, dtype=torch.long)
        if trainer.world_size == 1:
            return gather_in_order(rows, idx, total, 1, len(index), lambda t: t)
        # The busiest rank's row count: ranks own whole batches round-robin.
        bs = self._batch_size(total, trainer.world_size)
        max_rows = max(
            sum(b - a for _, a, b in batch_plan(total, bs, r, trainer.world_size)) for r in range(trainer.world_size)
        )
        device = trainer.strategy.root_device
        out = gather_in_order(
            rows.to(device), idx.to(device), total, trainer.world_size, max_rows, trainer.strategy.all_gather
        )
        return out.cpu()

    # ------------------------------------------------------------------ outputs (rank 0)
    def _run_dir(self, trainer: Trainer) -> Path:
        if self.output_dir is not None:
            return Path(self.output_dir)
        return Path(trainer.log_dir or trainer.default_root_dir or ".") / "eval"

    def _write_outputs(
        self, trainer: Trainer, out: Path, held: HeldOutSet, result: EvaluationResult, columns: list[np.ndarray]
    ) -> None:
        stem = f"step{result.global_step:08d}"
        if self.grid_prompts > 0 and columns:
            g = min(self.grid_prompts, len(held))
            cells = np.stack([held.images[:g], *[c[:g] for c in columns]], axis=1)  # [g, 1 + settings, H, W, 3]
            h = held.images.shape[1]
            upscale = self.grid_upscale or max(1, math.ceil(128 / h))
            col_labels = ["real"] + [setting_label(s, c) for s, c in result.settings]
            result.grid_path = save_grid(
                cells.reshape(-1, *cells.shape[2:]),
                out / f"grid-{stem}.png",
                nrow=cells.shape[1],
                row_labels=held.captions[:g],
                col_labels=col_labels,
                upscale=upscale,
            )
            self._log_image(trainer, result.grid_path, result.global_step)
        payload = {
            "global_step": result.global_step,
            "epoch": trainer.current_epoch,
            "num_samples": len(held),
            "seed": self.seed,
            "checkpoint": str(trainer.ckpt_path) if trainer.ckpt_path else None,
            "settings": [
                {"steps": s, "cfg_scale": c, "metrics": result.rows.get(setting_label(s, c), {})}
                for s, c in result.settings
            ],
            "real": result.rows.get(REAL, {}),
            "metrics": result.flat(),
            "skipped": result.skipped,
            "feature_extractor": getattr(self._extractor, "feature_id", type(self._extractor).__name__)
            if self._extractor is not None and "fid" not in self._disabled
            else None,
            "clip_model": getattr(self._clip, "model_id", None) if "clip_score" not in self._disabled else None,
            "grid": result.grid_path.name if result.grid_path is not None else None,
        }
        result.json_path = write_metrics_json(out / f"metrics-{stem}.json", payload)
        fn = getattr(trainer.state.fn, "value", trainer.state.fn)
        if self.print_table or (self.print_table is None and fn == "validate"):
            rows = {label: result.rows[label] for label in [setting_label(s, c) for s, c in result.settings]}
            rows["real data"] = result.rows.get(REAL, {})
            print_metrics_table(rows, title=f"Evaluation at step {result.global_step} ({len(held)} prompts)")

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
