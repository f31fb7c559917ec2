"""EMFModule: the LightningModule that trains a text-conditioned one-step generator with MeanFlow.

What is trained: ``generator`` (text connector + DiT backbone). What is not: the text encoder, which is kept
outside the module tree on purpose (no weights in ``state_dict``, the optimiser or DDP) and rebuilt from its
``class_path``/``init_args`` stored in the hyper-parameters. ``ema_generator`` holds the moving average used
for sampling and validation, and is part of the checkpoint.
"""

from __future__ import annotations

import hashlib
import importlib
import math
import warnings
from typing import Any, Literal, Sequence

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from emf_lightning.conditioning import encode_with_null, null_condition
from emf_lightning.ema import ema_decay_at, make_ema_copy, update_ema
from emf_lightning.encoders.base import TextEncoder, TextFeatures
from emf_lightning.errors import ConfigError, require_finite
from emf_lightning.encoders.cache import FeatureCache
from emf_lightning.generator_init import load_generator_weights
from emf_lightning.meanflow import (
    FlowMatchingLoss,
    MeanFlowLoss,
    TimeSampler,
    make_noise,
    sample_flow_matching,
    sample_meanflow,
)
from emf_lightning.models.generator import build_generator
from emf_lightning.sharding import grad_norm, is_sharded, max_abs, shard_generator

Pair = float | tuple[float, float]
LR_DECAYS = ("constant", "cosine", "linear")
OBJECTIVES = ("meanflow", "flow_matching")


class NonFiniteLossError(FloatingPointError):
    """The training loss (or its gradient) is NaN or infinite, or a step left non-finite or exploded weights
    (``max_weight_abs``); training stops and no checkpoint is written."""


class UnsupportedStrategyError(ConfigError):
    """The Trainer's strategy (or its settings) is one EMFModule does not support."""


SUPPORTED_STRATEGIES = (
    "single device (strategy auto/single_device), ddp, ddp_spawn, ddp_fork, ddp_notebook, and their "
    "_find_unused_parameters_false/_true variants (replicated weights); FSDP2 as "
    "lightning.pytorch.strategies.ModelParallelStrategy with tensor_parallel_size=1 (sharded weights)"
)


def check_strategy(strategy: Any, jvp_strategy: str = "detached") -> None:
    """Fail fast on strategies the module cannot run correctly.

    Replicated strategies (single device, every DDP variant) keep full weights on every rank. FSDP2 runs through
    Lightning's ``ModelParallelStrategy`` (``configure_model`` shards the generator and its EMA copy alike, see
    ``sharding.py``), data-parallel only: tensor parallelism would need a plan for every layer. Refused:
    ``FSDPStrategy`` (FSDP1: its flat parameters give the generator and its EMA copy different shard
    boundaries, so the EMA could not be a local update; FSDP2 does the same job) and DeepSpeed (partitions
    optimiser state and, at stage 3, weights behind the module's back). Under FSDP2 the "joint" JVP strategy is
    refused too: ``torch.func.jvp`` cannot trace FSDP2's parameter swaps; "detached" (the default) can.
    """
    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, ModelParallelStrategy, SingleDeviceStrategy

    name = getattr(strategy, "strategy_name", None) or type(strategy).__name__
    if isinstance(strategy, ModelParallelStrategy):
        tp = getattr(strategy, "_tensor_parallel_size", 1)
        if tp not in (1, "auto"):
            raise UnsupportedStrategyError(
                f"ModelParallelStrategy with tensor_parallel_size={tp}: EMFModule shards data-parallel only "
                "(FSDP2); set tensor_parallel_size=1 and data_parallel_size to the number of processes."
            )
        if jvp_strategy != "detached":
            raise UnsupportedStrategyError(
                f"jvp_strategy={jvp_strategy!r} cannot run under FSDP2 (torch.func.jvp does not trace FSDP2's "
                "parameter all-gathers); use model.jvp_strategy=detached (the default)."
            )
        return
    # DeepSpeedStrategy subclasses DDPStrategy but partitions optimiser state and (stage 3) weights.
    if isinstance(strategy, DeepSpeedStrategy) or not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)):
        raise UnsupportedStrategyError(
            f"EMFModule does not support the strategy {name!r} ({type(strategy).__name__}): its EMA copy must "
            f"be sharded exactly like the generator. Supported: {SUPPORTED_STRATEGIES}. "
            "Use --trainer.strategy=ddp, or ModelParallelStrategy for sharded weights (see docs/scaling.md)."
        )


def _pair(value: Pair, name: str) -> tuple[float, float]:
    """A scheduled value as (start, end); a single number means a constant."""
    if isinstance(value, (int, float)):
        return float(value), float(value)
    if len(value) != 2:
        raise ValueError(f"{name} must be a number or a (start, end) pair, got {value!r}")
    return float(value[0]), float(value[1])


def encoder_spec(encoder: TextEncoder | dict) -> dict[str, Any]:
    """``{"class_path", "init_args"}`` that rebuilds ``encoder``; stored instead of the encoder's weights.

    A dict is returned as is. An instance gives the constructor arguments it recorded (``TextEncoder``
    records them in ``init_args``); torch dtypes/devices become strings. Arguments that are not plain data
    are left out (their defaults apply on rebuild) and listed under ``"unrecorded"``.
    """
    if isinstance(encoder, dict):
        return encoder
    cls = type(encoder)
    init_args: dict[str, Any] = {}
    unrecorded: list[str] = []
    for name, value in dict(getattr(encoder, "init_args", None) or {}).items():
        if isinstance(value, (torch.device, torch.dtype)):
            value = str(value).removeprefix("torch.")
        if _is_plain(value):
            init_args[name] = list(value) if isinstance(value, tuple) else value
        else:
            unrecorded.append(name)
    spec: dict[str, Any] = {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": init_args}
    if unrecorded:
        spec["unrecorded"] = unrecorded
    return spec


def _is_plain(value: Any) -> bool:
    """JSON-like values only: the checkpoint's hyper-parameters must stay loadable with weights_only."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_is_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_plain(v) for k, v in value.items())
    return False


def build_encoder_from_spec(spec: dict[str, Any]) -> TextEncoder:
    """Instantiate a TextEncoder from ``{"class_path", "init_args"}``; other classes are refused."""
    class_path = spec.get("class_path")
    if not isinstance(class_path, str) or "." not in class_path:
        raise ValueError(f"encoder spec needs a dotted 'class_path', got {spec!r}")
    module_name, _, cls_name = class_path.rpartition(".")
    cls = getattr(importlib.import_module(module_name), cls_name, None)
    if not (isinstance(cls, type) and issubclass(cls, TextEncoder)):
        raise ValueError(f"encoder class_path {class_path!r} is not a TextEncoder subclass")
    return cls(**dict(spec.get("init_args") or {}))


class EMFModule(pl.LightningModule):
    """MeanFlow (or flow-matching) training of a text-conditioned generator on a frozen text encoder.

    Args:
        encoder: the frozen text encoder (``class_path``/``init_args`` in YAML; an instance or such a dict in
            Python). Its weights are never saved; it is rebuilt from this spec.
        backbone_size: a ``models.BACKBONE_PRESETS`` name (tiny, S, B, L, XL).
        image_size: side of the (square) images or latents the generator sees.
        in_channels: channels of those images (3 for pixels).
        patch_size: DiT patch size; None takes the preset's.
        backbone_overrides: extra keyword arguments for ``build_generator`` (depth, width, heads, ...).
        objective: "meanflow" (average velocity, one-step sampling) or "flow_matching" (the baseline).
        time_distribution: "logit_normal" or "uniform" draw of (r, t).
        time_mu, time_sigma: logit-normal parameters, a number or (start, end) over training progress.
        neq_ratio: share of samples with r != t, a number or (start, end).
        one_step_share: share of the r != t samples drawn as exactly (r, t) = (0, 1), the 1-step sampler's
            interval, a number or (start, end); 0 (the papers) leaves it to extrapolation.
        adaptive_p, adaptive_c: adaptive loss weight 1 / (loss + c)^p.
        selective_jvp: run the JVP only on the r != t samples.
        jvp_strategy: "joint" (u from the JVP's primal pass) or "detached" (a graph-free JVP for du/dt plus
            one ordinary forward for u: flow-matching activation memory, and the faster JVP); see ``MeanFlowLoss``.
        jvp_tangent: "conditional" (MeanFlow: du/dt along the sample's v = e - x) or "predicted" (improved
            MeanFlow: along the network's own u(z, t, t), one extra no-gradient forward); see ``MeanFlowLoss``.
        guidance_omega, guidance_kappa, guidance_interval: MeanFlow's guidance inside training
            (omega = 1, kappa = 0 disables it; EMF uses CFG only at sampling).
        cond_drop_prob: share of training samples whose condition is replaced by the null condition.
        lr, betas, weight_decay: AdamW.
        warmup_steps: linear learning-rate warm-up from 0 over this many optimiser steps.
        lr_decay: after warm-up, "constant", or "cosine" / "linear" decay to ``min_lr_ratio * lr`` at the end
            of the schedule (``schedule_steps``, else max_steps).
        min_lr_ratio: the decayed learning rate's floor, as a fraction of ``lr``.
        schedule_steps: steps over which the time-sampler schedules run (progress = step / schedule_steps);
            None takes ``trainer.max_steps`` or else the trainer's estimated number of steps.
        ema_decay: EMA decay, with the warm-up ``min(ema_decay, (1 + step) / (10 + step))``.
        max_weight_abs: after every optimiser step, training stops (``NonFiniteLossError``, before any checkpoint
            callback runs) when a weight of the generator or its EMA copy is NaN, infinite or larger than this in
            magnitude: a diverging run never checkpoints exploded weights. The default is far above what normal
            training reaches; None keeps only the non-finite check.
        init_from: a checkpoint (e.g. of flow-matching pre-training) whose generator and EMA weights start
            this run; its time embedder is copied into the interval embedder (EMF's fine-tuning recipe).
        feature_cache_dir: root of the on-disk text feature cache; None keeps the cache in memory only.
        use_feature_cache: False encodes every batch with the encoder (as EMF does): the cache holds every
            unique caption's token features in memory, too much for datasets of millions of captions
            (precompute features into the shards for those instead, ``emf shards --encoder``).
        sample_steps: step counts used by ``predict_step``.
        cfg_scale: classifier-free guidance scale used by ``predict_step``.
        seed: base of the per-step random streams (time draws, noise, condition dropout), so that a resumed
            run draws exactly what an uninterrupted one does.
    """

    def __init__(
        self,
        encoder: TextEncoder,
        backbone_size: str = "tiny",
        image_size: int = 32,
        in_channels: int = 3,
        patch_size: int | None = None,
        backbone_overrides: dict[str, Any] | None = None,
        objective: Literal["meanflow", "flow_matching"] = "meanflow",
        time_distribution: Literal["logit_normal", "uniform"] = "logit_normal",
        time_mu: Pair = -0.4,
        time_sigma: Pair = 1.0,
        neq_ratio: Pair = 0.25,
        one_step_share: Pair = 0.0,
        adaptive_p: float = 1.0,
        adaptive_c: float = 1e-3,
        selective_jvp: bool = True,
        jvp_strategy: Literal["joint", "detached"] = "detached",
        jvp_tangent: Literal["conditional", "predicted"] = "conditional",
        guidance_omega: float = 1.0,
        guidance_kappa: float = 0.0,
        guidance_interval: tuple[float, float] = (0.0, 1.0),
        cond_drop_prob: float = 0.1,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.95),
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        lr_decay: Literal["constant", "cosine", "linear"] = "constant",
        min_lr_ratio: float = 0.0,
        schedule_steps: int | None = None,
        ema_decay: float = 0.9999,
        max_weight_abs: float | None = 1e4,
        init_from: str | None = None,
        feature_cache_dir: str | None = None,
        use_feature_cache: bool = True,
        sample_steps: Sequence[int] = (1, 2, 4),
        cfg_scale: float = 1.0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        numbers = dict(time_mu=time_mu, time_sigma=time_sigma, neq_ratio=neq_ratio, one_step_share=one_step_share,
                       adaptive_p=adaptive_p, adaptive_c=adaptive_c, guidance_omega=guidance_omega,
                       guidance_kappa=guidance_kappa, guidance_interval=guidance_interval, lr=lr, betas=betas,
                       weight_decay=weight_decay, cfg_scale=cfg_scale, max_weight_abs=max_weight_abs)
        for name, value in numbers.items():  # a NaN passes every range check below and fails far from its cause
            require_finite(f"model.{name}", value)
        if max_weight_abs is not None and max_weight_abs <= 0:
            raise ConfigError(f"model.max_weight_abs must be > 0 (or null to disable the bound), got {max_weight_abs}")
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
        if not 0.0 <= cond_drop_prob < 1.0:
            raise ValueError(f"cond_drop_prob must be in [0, 1), got {cond_drop_prob}")
        if lr_decay not in LR_DECAYS:
            raise ValueError(f"lr_decay must be one of {LR_DECAYS}, got {lr_decay!r}")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
        with warnings.catch_warnings():
            # Lightning suggests ignoring nn.Module arguments; we replace the encoder by its spec just below.
            warnings.filterwarnings("ignore", message=".*Attribute 'encoder' is an instance of `nn.Module`.*")
            self.save_hyperparameters()
        # The checkpoint keeps how to rebuild the encoder, never its weights (or a pickled module).
        if isinstance(encoder, dict):
            encoder = build_encoder_from_spec(encoder)
        if not isinstance(self.hparams.get("encoder"), dict):
            self.hparams["encoder"] = encoder_spec(encoder)
        if not isinstance(encoder, TextEncoder):
            raise TypeError(f"encoder must be a TextEncoder, got {type(encoder).__name__}")
        encoder.eval().requires_grad_(False)
        # object.__setattr__ bypasses nn.Module registration: not a submodule, so not saved, optimised or
        # wrapped by DDP, and not moved by .to(); encode_text moves it lazily to the module's device.
        object.__setattr__(self, "_encoder", encoder)
        object.__setattr__(self, "_feature_cache", FeatureCache(encoder, root=feature_cache_dir))

        self.objective = objective
        self.generator = build_generator(
            backbone_size, text_dim=encoder.dim, input_size=image_size, in_channels=in_channels,
            patch_size=patch_size, **(backbone_overrides or {}),
        )
        self.ema_generator = make_ema_copy(self.generator)
        self.time_sampler = TimeSampler(
            distribution=time_distribution, mu=_pair(time_mu, "time_mu"), sigma=_pair(time_sigma, "time_sigma"),
            neq_ratio=_pair(neq_ratio, "neq_ratio"), one_step_share=_pair(one_step_share, "one_step_share"),
        )
        self.loss_fn = self._build_loss()
        self._nonfinite: str | None = None
        # Length of the schedules, fixed at fit start and kept in checkpoints (validate/test reuse it).
        self._schedule_total: int | None = None
        self._restored = False  # set when weights come from a checkpoint (resume / load_from_checkpoint)

    # ------------------------------------------------------------------ construction helpers
    def _build_loss(self) -> MeanFlowLoss | FlowMatchingLoss:
        hp = self.hparams
        kwargs = dict(
            adaptive_p=hp.adaptive_p, adaptive_c=hp.adaptive_c, guidance_omega=hp.guidance_omega,
            guidance_kappa=hp.guidance_kappa, guidance_interval=tuple(hp.guidance_interval),
            cond_drop_prob=hp.cond_drop_prob,
        )
        if self.objective == "meanflow":
            return MeanFlowLoss(self.time_sampler, selective_jvp=hp.selective_jvp,
                                jvp_strategy=hp.jvp_strategy, jvp_tangent=hp.jvp_tangent,
                                **kwargs)
        return FlowMatchingLoss(self.time_sampler, **kwargs)

    @property
    def encoder(self) -> TextEncoder:
        """The frozen text encoder (not a registered submodule)."""
        return self._encoder

    @property
    def feature_cache(self) -> FeatureCache:
        """The text feature cache in front of the encoder."""
        return self._feature_cache

    # ------------------------------------------------------------------ text
    def _move_encoder(self) -> None:
        try:
            enc_device = next(self.encoder.parameters()).device
        except StopIteration:  # parameter-free encoders (e.g. a pure lookup) have nothing to move
            return
        if enc_device != self.device:
            self.encoder.to(self.device)

    @torch.no_grad()
    def encode_text(self, captions: Sequence[str]) -> TextFeatures:
        """Text features for ``captions`` through the feature cache; ``""`` gives the null condition."""
        self._move_encoder()
        encode = self.feature_cache.encode if self.hparams.use_feature_cache else self.encoder.encode
        return encode_with_null(captions, encode, self.encoder.dim, device=self.device)

    def batch_text_features(self, batch: dict[str, Any]) -> TextFeatures:
        """The batch's text condition: precomputed shard features when the batch has them, else the cache.

        Precomputed features (``data.load_features``) belong to the primary caption; rows whose caption
        was dropped to ``""`` get the null condition.
        """
        pre = batch.get("features")
        if pre is None:
            return self.encode_text(batch["caption"])
        tokens, mask = pre["tokens"].to(self.device, torch.float32), pre["mask"].to(self.device, torch.bool)
        if tokens.shape[-1] != self.encoder.dim:
            raise ValueError(
                f"precomputed features in the shards have width {tokens.shape[-1]} but the encoder "
                f"({self.encoder.cache_key}) gives {self.encoder.dim}: recompute them or set data.load_features=false"
            )
        dropped = torch.tensor([c == "" for c in batch["caption"]], device=self.device)
        if dropped.any():
            tokens = tokens * (~dropped)[:, None, None]
            mask = mask.clone()
            mask[dropped] = False
            mask[dropped, 0] = True
        pooled = pre["pooled"].to(self.device, torch.float32) * (~dropped)[:, None]
        return TextFeatures(tokens=tokens, mask=mask, pooled=pooled)

    def save_feature_cache(self) -> None:
        """Persist newly computed caption features (no-op for an in-memory cache; part files are
        uniquely named, so every rank may save)."""
        if self.hparams.use_feature_cache:
            self.feature_cache.save()

    def setup(self, stage: str) -> None:
        """Check the strategy before Lightning wraps the model (this hook runs before the wrapping), and that the
        datamodule makes images of the model's size (Lightning would only say "Error while merging hparams")."""
        check_strategy(self.trainer.strategy, self.hparams.jvp_strategy)
        datamodule = getattr(self.trainer, "datamodule", None)
        data_size = (getattr(datamodule, "hparams", None) or {}).get("image_size")
        if data_size is not None and data_size != self.hparams.image_size:
            raise ConfigError(f"data.image_size={data_size} but model.image_size={self.hparams.image_size}: the "
                              "generator sees the data's images, so set both to the same size")

    def configure_model(self) -> None:
        """Under FSDP2 (Lightning's ModelParallelStrategy): shard the generator and its EMA copy alike.

        Lightning calls this after ``setup`` and before the optimiser is built; outside that strategy the
        module has no device mesh and nothing changes. Idempotent (validate after fit calls it again).
        """
        mesh = self.device_mesh
        if mesh is None:
            return
        dp_mesh = mesh["data_parallel"] if mesh.mesh_dim_names and "data_parallel" in mesh.mesh_dim_names else mesh
        shard_generator(self.generator, dp_mesh)
        shard_generator(self.ema_generator, dp_mesh)

    @property
    def generation_is_collective(self) -> bool:
        """Whether every forward of the generators is a collective (sharded weights): all ranks must call
        ``generate`` equally often."""
        return is_sharded(self.generator)

    def on_fit_start(self) -> None:
        """Encoder to the device, schedule length, and ``init_from`` weights at the start of a fresh run.

        Lightning restores a resumed checkpoint's weights before this hook (``on_load_checkpoint`` has run):
        ``init_from`` is then skipped, the checkpoint already holds the trained weights.
        """
        self._move_encoder()
        if self.hparams.init_from and not self._restored:
            self.load_init_weights(self.hparams.init_from)
        self._schedule_total = self._resolve_schedule_total()
        if self._schedule_total is None:
            warnings.warn("the run has no step limit (max_steps/max_epochs): time-sampler schedules stay at "
                          "their start values; set model.schedule_steps to schedule them")

    def on_train_epoch_end(self) -> None:
        self.save_feature_cache()

    def on_validation_epoch_end(self) -> None:
        self.save_feature_cache()

    def on_fit_end(self) -> None:
        self.save_feature_cache()

    def load_init_weights(self, path: str) -> None:
        """Start from another run's generator (+ EMA) weights; time embedder -> interval embedder."""
        load_generator_weights(self, path, copy_time_to_interval=True)

    # ------------------------------------------------------------------ training
    def schedule_length(self) -> int | None:
        """Steps the schedules (time sampler, lr decay) span: schedule_steps, else the run's length."""
        return self.hparams.schedule_steps or self._schedule_total

    def progress(self) -> float:
        """Training progress in [0, 1] for the time-sampler schedules: global_step / schedule length."""
        total = self.schedule_length()
        if not total:
            return 0.0
        return min(1.0, self.global_step / total)

    def _resolve_schedule_total(self) -> int | None:
        """``schedule_steps``, else the trainer's max_steps, else its estimate of the run's optimiser steps."""
        if self.hparams.schedule_steps:
            return int(self.hparams.schedule_steps)
        if self.trainer.max_steps and self.trainer.max_steps > 0:
            return int(self.trainer.max_steps)
        est = self.trainer.estimated_stepping_batches
        return int(est) if math.isfinite(est) else None

    def _step_generator(self, stream: str, step: int) -> torch.Generator:
        """A random stream that depends only on (seed, stream, step, rank): resumed runs repeat it exactly."""
        rank = self.global_rank if self._trainer is not None else 0
        digest = hashlib.sha256(f"{self.hparams.seed}/{stream}/{step}/{rank}".encode()).digest()
        gen = torch.Generator(device=self.device)
        gen.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
        return gen

    def compute_loss(self, batch: dict[str, Any], net: nn.Module, generator: torch.Generator,
                     train: bool) -> tuple[Tensor, dict[str, Tensor]]:
        """The objective on one batch: encode captions and call the loss.

        Condition dropout (``cond_drop_prob``) is drawn by the loss from ``generator`` in training only;
        evaluation always uses the real conditions.
        """
        images = batch["image"]
        expected = (self.hparams.in_channels, self.hparams.image_size, self.hparams.image_size)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ConfigError(
                f"batch images have shape {tuple(images.shape)}, but the model expects [B, {expected[0]}, "
                f"{expected[1]}, {expected[2]}]: make data.image_size match model.image_size"
            )
        feats = self.batch_text_features(batch)
        cond = (feats.tokens.to(images.dtype), feats.mask)
        null = null_condition(1, self.encoder.dim, device=images.device, dtype=cond[0].dtype)
        drop_mask = None if train else torch.zeros(images.shape[0], dtype=torch.bool, device=images.device)
        try:
            return self.loss_fn(net, images, cond, null, self.progress(), generator=generator, drop_mask=drop_mask)
        except FloatingPointError as err:  # the loss refuses non-finite values; add where it happened
            if train:
                self._fail_nonfinite(f"loss ({err})", batch)
            raise

    def _train_generator(self, batch_idx: int) -> torch.Generator:
        """The training batch's random stream: one per optimiser step and, with gradient accumulation, per
        micro-batch.

        ``global_step`` advances only after the last micro-batch of a step, so keyed by the step alone every
        micro-batch would draw the same noise, times and dropout. Lightning groups micro-batches by
        ``batch_idx % accumulate_grad_batches``; the first keeps the plain "train" stream (runs without
        accumulation draw as before).
        """
        accumulate = max(1, int(getattr(self.trainer, "accumulate_grad_batches", 1) or 1))
        micro = batch_idx % accumulate
        return self._step_generator("train" if micro == 0 else f"train.micro{micro}", self.global_step)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        gen = self._train_generator(batch_idx)
        loss, stats = self.compute_loss(batch, self.generator, gen, train=True)
        if not torch.isfinite(loss):
            self._fail_nonfinite(f"loss is {loss.item()}", batch)
        bs = batch["image"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        for name, value in stats.items():
            if name != "loss":
                self.log(f"train/{name}", value, batch_size=bs)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=bs)
        self.log("train/progress", self.progress(), batch_size=bs)
        return loss

    def _fail_nonfinite(self, what: str, batch: dict[str, Any]) -> None:
        keys = batch.get("key")
        self._nonfinite = (
            f"Non-finite training {what} at global step {self.global_step} (batch keys: {keys}). "
            "Training stopped; no checkpoint is written after a non-finite loss. Lower the learning rate, "
            "check the data of these samples, or use fp32."
        )
        raise NonFiniteLossError(self._nonfinite)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Log the gradient norm (before clipping) and refuse to step on a non-finite gradient."""
        norm = grad_norm(self.generator.parameters())
        if norm is None:
            return
        if not torch.isfinite(norm):
            self._fail_nonfinite(f"gradient norm is {norm.item()}", {"key": None})
        self.log("train/grad_norm", norm)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """The optimiser step, then the EMA update (once per optimiser step, also with accumulation), then the
        weight check: this hook returns before Lightning's checkpoint callbacks see the step."""
        super().optimizer_step(*args, **kwargs)
        # global_step is incremented after this hook returns, so it is the 0-based index of this step.
        update_ema(self.ema_generator, self.generator, ema_decay_at(self.global_step, self.hparams.ema_decay))
        self.check_weights(f"after optimiser step {self.global_step}")

    def check_weights(self, when: str) -> None:
        """Stop with NonFiniteLossError when the generator or its EMA copy holds a NaN, an infinity or a weight
        above ``max_weight_abs`` in magnitude. One fused reduction and one host sync; a collective under FSDP2
        (every rank calls it at the same point and gets the same answer)."""
        largest = float(max_abs([*self.generator.parameters(), *self.ema_generator.parameters()]))
        bound = self.hparams.get("max_weight_abs")
        if math.isfinite(largest) and (bound is None or largest <= bound):
            return
        found = ("a NaN or infinite weight" if not math.isfinite(largest) else
                 f"a weight of magnitude {largest:.3g} (above model.max_weight_abs={bound:g})")
        self._nonfinite = (
            f"The generator or its EMA copy holds {found} {when}: the run diverged. "
            "Training stopped; no checkpoint of these weights is written. Lower the learning rate (or raise "
            "model.max_weight_abs if such weights are intended)."
        )
        raise NonFiniteLossError(self._nonfinite)

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW on the generator only; linear warm-up, then ``lr_decay``, stepped every optimiser step."""
        hp = self.hparams
        opt = torch.optim.AdamW(self.generator.parameters(), lr=hp.lr, betas=tuple(hp.betas),
                                weight_decay=hp.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, self.lr_factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}

    def lr_factor(self, step: int) -> float:
        """Multiplier of ``lr`` for optimiser step ``step`` (0-based).

        Warm-up: (step + 1) / warmup_steps. After it, "constant" keeps 1; "cosine" and "linear" fall to
        ``min_lr_ratio`` at the end of the schedule (``schedule_steps`` or the run's max_steps). A decayed
        rate is what lets a short run's last weights (and their EMA) settle instead of jittering at the peak.
        """
        hp = self.hparams
        warmup = max(0, int(hp.warmup_steps))
        if warmup and step < warmup:
            return (step + 1) / warmup
        total = self.schedule_length()
        if hp.lr_decay == "constant" or not total or total <= warmup:
            return 1.0
        frac = min(1.0, (step - warmup) / (total - warmup))
        shape = 0.5 * (1.0 + math.cos(math.pi * frac)) if hp.lr_decay == "cosine" else 1.0 - frac
        return hp.min_lr_ratio + (1.0 - hp.min_lr_ratio) * shape

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Last line of defence: a run that saw a non-finite loss, or whose weights are non-finite or exploded now,
        never writes a checkpoint."""
        if self._nonfinite is None:
            try:
                self.check_weights(f"when a checkpoint of global step {self.global_step} was due")
            except NonFiniteLossError:
                pass  # reported just below, with the refusal
        if self._nonfinite is not None:
            raise NonFiniteLossError("Refusing to write a checkpoint. " + self._nonfinite)
        checkpoint["emf_schedule_total"] = self._schedule_total

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the encoder spec exactly as saved, and the schedule length of the run."""
        saved = (checkpoint.get("hyper_parameters") or {}).get("encoder")
        if isinstance(saved, dict):
            self.hparams["encoder"] = saved
        self._schedule_total = checkpoint.get("emf_schedule_total", self._schedule_total)
        self._restored = True

    # ------------------------------------------------------------------ evaluation
    def _eval_loss(self, batch: dict[str, Any], batch_idx: int, stage: str) -> Tensor:
        # Fixed streams per batch index: the validation loss of two checkpoints is comparable.
        gen = self._step_generator(stage, batch_idx)
        loss, stats = self.compute_loss(batch, self.ema_generator, gen, train=False)
        bs = batch["image"].shape[0]
        self.log(f"{stage}/loss", loss, prog_bar=True, batch_size=bs, sync_dist=True)
        for name, value in stats.items():
            if name != "loss":
                self.log(f"{stage}/{name}", value, batch_size=bs, sync_dist=True)
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        return self._eval_loss(batch, batch_idx, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        return self._eval_loss(batch, batch_idx, "test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """Samples for the batch's captions at each of ``sample_steps`` (EMA weights)."""
        captions = list(batch["caption"])
        images = {
            int(s): self.generate(captions, steps=int(s), cfg_scale=self.hparams.cfg_scale, seed=batch_idx)
            for s in self.hparams.sample_steps
        }
        return {"caption": captions, "key": batch.get("key"), "images": images}

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def generate(self, captions: Sequence[str], steps: int = 1, cfg_scale: float = 1.0, seed: int = 0,
                 use_ema: bool = True) -> Tensor:
        """Images [B, C, H, W] in [-1, 1] for ``captions``; the same seed gives the same images.

        MeanFlow objective: the MeanFlow sampler with ``steps`` steps; flow matching: Euler with ``steps``.
        ``cfg_scale`` != 1 applies classifier-free guidance against the null condition.
        """
        captions = list(captions)
        if not captions:
            raise ValueError("generate() needs at least one caption, got an empty list")
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        require_finite("cfg_scale", cfg_scale)
        net = self.ema_generator if use_ema else self.generator
        was_training = net.training
        net.eval()
        try:
            feats = self.encode_text(captions)
            b = len(captions)
            size = self.hparams.image_size
            # Drawn on the CPU from the seed: the same seed gives the same images on any device.
            noise = make_noise((b, self.hparams.in_channels, size, size), int(seed), device=self.device)
            cond = (feats.tokens, feats.mask)
            null = null_condition(1, self.encoder.dim, device=self.device) if cfg_scale != 1.0 else None
            sampler = sample_meanflow if self.objective == "meanflow" else sample_flow_matching
            x = sampler(net, noise, cond, steps=steps, cfg_scale=cfg_scale, null_cond=null)
        finally:
            net.train(was_training)
        return x.float().clamp(-1.0, 1.0)
