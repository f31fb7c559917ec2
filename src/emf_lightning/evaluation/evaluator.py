"""The Evaluator: FID, KID, CLIP score and ShapesEval of few-step samples against a held-out set, no Lightning.

For every step count x guidance scale it generates one image per held-out caption with
``model.generate(captions, steps=, cfg_scale=, seed=)`` ([-1, 1] images; EMFModule samples with its EMA weights;
batch ``b`` uses seed ``seed + b``, so every setting and any number of processes see the same noise) and scores
them against the real images: ``fid``, ``kid``, ``kid_std`` (Inception features; the real ones cached on disk when
the set names its source), ``clip_score`` and ``shapes_<category>`` (ShapesEval, on samples with a scene spec).
The real images get ``clip_score`` and ``shapes_*`` too, as a ceiling (row ``real``). With ``wordings``, the
single-object held-out scenes are also generated from prompts worded as users write them, in wordings the
caption grammar never produces (``shapes.wordings``), and judged the same way: ``shapes_reworded`` (all of them)
and ``shapes_reworded_<family>``, beside the grammar's own ``shapes_<category>``. Missing Inception or CLIP
weights: one warning naming where it looked, then that metric is skipped; every other metric still comes out.

Several processes (:class:`~emf_lightning.evaluation.distributed.Processes`): generation, features and CLIP
scores are split by batch over ranks and gathered in order, so every rank gets the same numbers. When
``model.generation_is_collective`` (sharded weights: every forward all-gathers), a rank with fewer batches runs
(and discards) one-caption batches until every rank has called the generator equally often.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from emf_lightning.evaluation.clip_score import load_clip_scorer
from emf_lightning.evaluation.distributed import Processes
from emf_lightning.evaluation.fid import (
    ReferenceFeatureCache,
    extract_features,
    frechet_distance,
    kernel_inception_distance,
    load_inception,
)
from emf_lightning.meanflow.losses import Objective
from emf_lightning.shapes.judge import ShapesEval
from emf_lightning.shapes.scene import scene_spec_or_none
from emf_lightning.shapes.wordings import families, reword_all
from emf_lightning.utils.images import to_uint8
from emf_lightning.utils.progress import progress
from emf_lightning.utils.weights import MissingWeightsError

log = logging.getLogger(__name__)

REAL = "real"


def metric_key(metric: str, steps: int | None = None, cfg_scale: float | None = None, prefix: str = "eval") -> str:
    """``eval/fid@1step_cfg1.0``; with ``steps=None``, the real-image row ``eval/clip_score@real``."""
    suffix = REAL if steps is None else f"{int(steps)}step_cfg{float(1.0 if cfg_scale is None else cfg_scale)}"
    return f"{prefix}/{metric}@{suffix}"


def setting_label(steps: int, cfg_scale: float) -> str:
    """Human label for tables, grid columns and result rows: ``1 step, cfg 1.0``."""
    return f"{steps} step{'s' if steps != 1 else ''}, cfg {float(cfg_scale)}"


@dataclass
class HeldOutSet:
    """The real samples an evaluation compares against (same order everywhere). ``source`` names where they
    came from (e.g. the shard URLs): with it, their Inception features are cached on disk."""

    images: np.ndarray  # uint8 [N, H, W, 3]
    captions: list[str]
    specs: list[dict | None]
    keys: list[str]
    source: list[str] | None = None

    def __len__(self) -> int:
        return len(self.captions)


def collect_held_out(batches: Iterable[dict[str, Any]], n: int, source: list[str] | None = None) -> HeldOutSet:
    """First ``n`` samples of an iterable of datamodule batches ({"image", "caption", "meta", "key"}).

    A sample's scene spec is its ``meta`` when that is a shapes-world scene (``scene_spec_or_none``); in-memory
    batches may give ``"spec"`` directly. Samples with an empty caption are skipped (the empty caption is the null
    condition, not a prompt); keys default to the running index when a batch has none.
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
        bspecs = batch.get("spec") or [scene_spec_or_none(m) for m in batch.get("meta") or [None] * len(caps)]
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
    return HeldOutSet(np.stack(images), captions, specs, keys, source)


@dataclass
class EvaluationResult:
    """Numbers of one evaluation: ``rows[label] -> {metric -> value}`` (labels from :func:`setting_label`, plus
    ``real``), what was skipped and why, and the first generated images of each setting (for grids)."""

    settings: list[tuple[int, float]]
    rows: dict[str, dict[str, float]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    images: dict[str, np.ndarray] = field(default_factory=dict)  # label -> uint8 [k, H, W, 3]
    num_samples: int = 0
    seed: int = 0
    feature_extractor: str | None = None  # what computed FID/KID features (None: not computed)
    clip_model: str | None = None
    global_step: int = 0  # the training step of the evaluated weights (set by the caller)

    def flat(self, prefix: str = "eval") -> dict[str, float]:
        """``{eval/<metric>@<setting>: value}`` for the logger."""
        out: dict[str, float] = {}
        for steps, cfg in self.settings:
            for name, value in self.rows.get(setting_label(steps, cfg), {}).items():
                out[metric_key(name, steps, cfg, prefix)] = value
        for name, value in self.rows.get(REAL, {}).items():
            out[metric_key(name, prefix=prefix)] = value
        return out


class Evaluator:
    """Few-step sample quality of a generator on a held-out set (see the module docstring).

    Args:
        steps: sampling step counts; ``None``: ``model.objective.eval_steps`` (the objective knows how many
            steps its sampler needs: (1, 2, 4) for MeanFlow, (1, 2, 4, 50) for flow matching).
        cfg_scales: classifier-free guidance scales (1.0 = no guidance); ``None``: the model's own sampling
            scale (``model.hparams.cfg_scale``, 1.0 when it has none), so a run is judged as it samples.
        seed: noise seed; generation batch ``b`` uses ``seed + b``.
        batch_size: generation / feature batch size.
        fid: compute FID and KID (needs Inception weights or ``fid_feature_extractor``).
        kid_subsets: KID subsets (of 1000 samples, or the whole set when it is smaller).
        clip_score: compute the CLIP score (needs CLIP weights or ``clip_scorer``).
        shapes_eval: run ShapesEval on samples that carry a shapes-world spec.
        inception_path: Inception weights file or folder; ``None`` searches the usual caches.
        clip_model: open_clip architecture (``ViT-B-32``) or a Hugging Face CLIP repo id / folder.
        clip_pretrained: open_clip pretrained tag or checkpoint file (ignored for Hugging Face models).
        reference_cache_dir: where real-image features are cached (default ``emf_cache_dir()/fid_refs``).
        keep_images: generated images per setting the result keeps (for grids; ``None``: all).
        fid_feature_extractor: a feature extractor (uint8 ``[B, 3, H, W]`` -> ``[B, D]``) instead of
            Inception; cached to disk only when it has a ``feature_id`` attribute.
        clip_scorer: a ready :class:`~emf_lightning.evaluation.clip_score.CLIPScorer`.
        shapes_evaluator: an object with ``evaluate(images_uint8, specs) -> dict`` instead of ShapesEval.
        wordings: also judge single-object scenes prompted in unseen wordings: "final" (the held-out families,
            never trained on or tuned with), "dev", "all", or None (off).
        name: who speaks in warnings (``<name>: skipping fid: ...``).
    """

    def __init__(
        self,
        steps: Sequence[int] | None = None,
        cfg_scales: Sequence[float] | None = None,
        seed: int = 0,
        batch_size: int = 64,
        fid: bool = True,
        kid_subsets: int = 100,
        clip_score: bool = True,
        shapes_eval: bool = True,
        inception_path: str | None = None,
        clip_model: str = "ViT-B-32",
        clip_pretrained: str | None = "openai",
        reference_cache_dir: str | None = None,
        keep_images: int | None = 8,
        fid_feature_extractor: nn.Module | None = None,
        clip_scorer: nn.Module | None = None,
        shapes_evaluator: Any | None = None,
        wordings: str | None = None,
        name: str = "Evaluator",
    ):
        if steps is not None and (not steps or any(int(s) < 1 for s in steps)):
            raise ValueError(f"steps must be a non-empty list of integers >= 1, got {steps}")
        if cfg_scales is not None and not cfg_scales:
            raise ValueError("cfg_scales must not be empty (None: the model's own)")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if wordings is not None:
            families(wordings)  # a clear error for an unknown split, here rather than mid-run
        self.wordings = wordings
        self.steps = tuple(int(s) for s in steps) if steps is not None else None
        self.cfg_scales = tuple(float(g) for g in cfg_scales) if cfg_scales is not None else None
        self.seed, self.batch_size, self.keep_images, self.name = seed, batch_size, keep_images, name
        self.fid, self.kid_subsets = fid, kid_subsets
        self.clip_score, self.shapes_eval = clip_score, shapes_eval
        self.inception_path, self.clip_model, self.clip_pretrained = inception_path, clip_model, clip_pretrained
        self.reference_cache = ReferenceFeatureCache(reference_cache_dir)
        self._extractor, self._clip, self._shapes = fid_feature_extractor, clip_scorer, shapes_evaluator
        self._disabled: dict[str, str] = {}  # metric -> reason, filled once (one warning each)
        self._shapes_announced = False
        self._real_for: HeldOutSet | None = None  # the held-out set of the two caches below
        self._real_features: Tensor | None = None
        self._real_row: dict[str, float] | None = None
        self._processes = Processes()

    def settings_for(self, model: Any) -> list[tuple[int, float]]:
        """(steps, cfg) pairs, step-major; the step list defaults to the model's objective's ``eval_steps``, the
        guidance scales to the model's own."""
        steps = self.steps if self.steps is not None else getattr(model, "objective", Objective).eval_steps
        scales = self.cfg_scales or (float(getattr(model, "hparams", {}).get("cfg_scale", 1.0)),)
        return [(s, g) for s in steps for g in scales]

    @torch.no_grad()
    def evaluate(self, model: Any, held: HeldOutSet, processes: Processes | None = None) -> EvaluationResult:
        """Generate every held-out caption at every setting and score it; the same result on every rank."""
        self._processes = processes = processes or Processes.from_torch_distributed()
        device = getattr(model, "device", torch.device("cpu"))
        extractor, clip, shapes = self._feature_extractor(device), self._clip_model(device), self._shapes_judge(held)
        if held is not self._real_for:
            self._real_for, self._real_features, self._real_row = held, None, None
        real_feats = self._reference_features(held, extractor) if extractor is not None else None
        result = EvaluationResult(
            self.settings_for(model),
            {REAL: self._real_metrics(held, clip, shapes)},
            num_samples=len(held),
            seed=self.seed,
        )
        reworded = self._reworded(held) if shapes is not None else None
        n_batches = len(processes.plan(len(held), self.batch_size))
        if reworded is not None:
            n_batches += len(processes.plan(len(reworded), self.batch_size))
        with progress("evaluation", total=n_batches * len(result.settings), enabled=processes.rank == 0) as advance:
            measured = [
                self._generate_and_measure(model, held, steps, cfg, extractor, clip, advance)
                for steps, cfg in result.settings
            ]
            measured_reworded = [
                self._generate_and_measure(model, reworded, steps, cfg, None, None, advance)[0]
                if reworded is not None
                else None
                for steps, cfg in result.settings
            ]
        for (steps, cfg), (images, feats, clip_scores), reworded_images in zip(
            result.settings, measured, measured_reworded
        ):
            row: dict[str, float] = {}
            if feats is not None and real_feats is not None:
                if len(held) < 2:
                    self._disable("fid", "FID/KID need at least 2 held-out samples")
                else:
                    row["fid"] = frechet_distance(real_feats, feats)
                    row["kid"], row["kid_std"] = kernel_inception_distance(
                        real_feats, feats, self.kid_subsets, seed=self.seed
                    )
            if clip_scores is not None:
                row["clip_score"] = float(clip_scores.mean())
            if shapes is not None:
                row.update(self._shapes_metrics(shapes, images, held))
            if reworded_images is not None:
                row.update(self._reworded_metrics(shapes, reworded_images, reworded))
            label = setting_label(steps, cfg)
            result.rows[label] = row
            result.images[label] = images[: self.keep_images]
        result.skipped = dict(self._disabled)
        if extractor is not None and "fid" not in self._disabled:
            result.feature_extractor = getattr(extractor, "feature_id", type(extractor).__name__)
        if clip is not None:
            result.clip_model = getattr(clip, "model_id", None)
        return result

    # ------------------------------------------------------------------ metrics, loaded once
    def _disable(self, metric: str, reason: str) -> None:
        if metric not in self._disabled:
            self._disabled[metric] = reason
            if self._processes.rank == 0:
                warnings.warn(f"{self.name}: skipping {metric}: {reason}", UserWarning, stacklevel=3)

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
            try:
                self._clip = load_clip_scorer(self.clip_model, self.clip_pretrained, device=device)
            except MissingWeightsError as err:
                self._disable("clip_score", str(err))
                return None
        return self._clip.to(device).eval()

    def _shapes_judge(self, held: HeldOutSet) -> Any | None:
        if not self.shapes_eval or "shapes" in self._disabled:
            return None
        judged = sum(1 for spec in held.specs if spec)
        if not self._shapes_announced and self._processes.rank == 0:  # once: a run's held-out set is fixed
            self._shapes_announced = True
            log.info(
                f"ShapesEval judges {judged} of {len(held)} held-out samples"
                + (" (the others carry no shapes-world scene spec)" if judged < len(held) else "")
            )
        if not judged:
            self._disabled["shapes"] = "the held-out samples carry no shapes-world scene spec"
            return None
        if self._shapes is None:
            self._shapes = ShapesEval()
        return self._shapes

    @staticmethod
    def _shapes_metrics(shapes: Any, images: np.ndarray, held: HeldOutSet) -> dict[str, float]:
        idx = [i for i, spec in enumerate(held.specs) if spec]
        scores = shapes.evaluate(images[idx], [held.specs[i] for i in idx])
        return {f"shapes_{name}": float(value) for name, value in scores.items()}

    def _reworded(self, held: HeldOutSet) -> HeldOutSet | None:
        """The single-object held-out scenes with their prompts reworded (``keys`` hold the families)."""
        if self.wordings is None:
            return None
        captions = reword_all([spec or {} for spec in held.specs], self.wordings, seed=self.seed)
        names = families(self.wordings)
        idx = [i for i, c in enumerate(captions) if c is not None]
        if not idx:
            return None
        return HeldOutSet(
            held.images[idx],
            [captions[i] for i in idx],
            [held.specs[i] for i in idx],
            [names[i % len(names)] for i in idx],
        )

    @staticmethod
    def _reworded_metrics(shapes: Any, images: np.ndarray, reworded: HeldOutSet) -> dict[str, float]:
        """``shapes_reworded`` (share of reworded prompts judged right) and one ``shapes_reworded_<family>`` each."""
        passed = [bool(r["passed"]) for r in shapes.evaluate_detailed(images, reworded.specs)]
        out = {"shapes_reworded": float(np.mean(passed))}
        for split in ("dev", "final"):  # both splits present (wordings="all"): each on its own as well
            in_split = [p for p, k in zip(passed, reworded.keys) if k in families(split)]
            if in_split and len(in_split) < len(passed):
                out[f"shapes_reworded_{split}"] = float(np.mean(in_split))
        for family in dict.fromkeys(reworded.keys):
            out[f"shapes_reworded_{family}"] = float(np.mean([p for p, k in zip(passed, reworded.keys) if k == family]))
        return out

    # ------------------------------------------------------------------ the real images, once per held-out set
    def _reference_features(self, held: HeldOutSet, extractor: nn.Module) -> Tensor:
        if self._real_features is None:
            compute = (
                lambda: self._sharded(  # noqa: E731
                    len(held), lambda a, b: extract_features(extractor, held.images[a:b], batch_size=self.batch_size)
                )
            )
            feature_id = getattr(extractor, "feature_id", None)
            if feature_id is not None and held.source:
                # Every rank takes part in computing (collectives), only rank 0 writes the file.
                self._real_features = self.reference_cache.get_or_compute(
                    held.source, held.keys, held.images.shape[1], feature_id, compute, write=self._processes.rank == 0
                )
            else:
                self._real_features = compute()
        return self._real_features

    def _real_metrics(self, held: HeldOutSet, clip: nn.Module | None, shapes: Any | None) -> dict[str, float]:
        if self._real_row is None:
            real = torch.from_numpy(held.images).permute(0, 3, 1, 2).float().div(127.5).sub(1)
            self._real_row = {}
            if clip is not None:
                scores = self._sharded(len(held), lambda a, b: clip.scores(real[a:b], held.captions[a:b]))
                self._real_row["clip_score"] = float(scores.mean())
            if shapes is not None:
                self._real_row.update(self._shapes_metrics(shapes, held.images, held))
        return dict(self._real_row)

    def _sharded(self, n: int, rows: Callable[[int, int], Tensor]) -> Tensor:
        """``rows(start, stop)`` over this rank's batches of ``n``, gathered in order."""
        plan = self._processes.plan(n, self.batch_size)
        return self._processes.gather(
            [rows(a, b) for _, a, b in plan], [i for _, a, b in plan for i in range(a, b)], n, self.batch_size
        )

    # ------------------------------------------------------------------ the samples
    def _generate_and_measure(
        self,
        model: Any,
        held: HeldOutSet,
        steps: int,
        cfg: float,
        extractor: nn.Module | None,
        clip: nn.Module | None,
        advance: Callable[..., None],
    ) -> tuple[np.ndarray, Tensor | None, Tensor | None]:
        """Generate every held-out caption (this rank's batches), measure, gather in order; ``advance`` (a
        progress counter) moves once per generation batch."""
        n, processes = len(held), self._processes
        plan = processes.plan(n, self.batch_size)
        imgs, feats, scores, index = [], [], [], []
        advance(0, description=f"evaluation: {setting_label(steps, cfg)}")
        for b, start, stop in plan:
            captions = held.captions[start:stop]
            x = model.generate(captions, steps=steps, cfg_scale=cfg, seed=self.seed + b)
            if x.shape[1] != 3:
                raise ValueError(f"generate() must return RGB images [B, 3, H, W], got {tuple(x.shape)}")
            u8 = to_uint8(x)
            imgs.append(torch.from_numpy(u8))
            if extractor is not None:
                feats.append(extract_features(extractor, u8, batch_size=self.batch_size))
            if clip is not None:
                scores.append(clip.scores(x, captions))
            index.extend(range(start, stop))
            advance(1)
        if getattr(model, "generation_is_collective", False):
            most = max(len(processes.plan(n, self.batch_size, r)) for r in range(processes.world_size))
            for _ in range(most - len(plan)):
                model.generate(held.captions[:1], steps=steps, cfg_scale=cfg, seed=self.seed)
        gather = lambda parts: processes.gather(parts, index, n, self.batch_size)  # noqa: E731
        return (
            gather(imgs).numpy(),
            gather(feats) if extractor is not None else None,
            gather(scores) if clip is not None else None,
        )
