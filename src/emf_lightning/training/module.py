"""EMFModule: the LightningModule that trains a text-conditioned one-step generator with MeanFlow.

What is trained: ``generator`` (text connector + backbone). What is not: the text encoder, which is kept
outside the module tree on purpose (no weights in ``state_dict``, the optimiser or DDP) and rebuilt from its
``class_path``/``init_args`` stored in the hyper-parameters. ``ema_generator`` holds the moving average used
for sampling and validation, and is part of the checkpoint. The loss (``meanflow.MeanFlowLoss`` or
``FlowMatchingLoss``) and the backbone are named by class in the config; so is the encoder.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from collections import Counter
from collections.abc import Sequence
from itertools import islice
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from emf_lightning.autoencoders import IdentityAutoencoder, LatentAutoencoder, build_autoencoder
from emf_lightning.encoders.base import TextEncoder, TextFeatures
from emf_lightning.encoders.cache import FeatureCache
from emf_lightning.encoders.statistics import fit_channel_statistics
from emf_lightning.errors import CheckpointError, ConfigError, require_finite
from emf_lightning.inference import sample_images
from emf_lightning.meanflow import MeanFlowLoss, Objective, encode_with_null, null_condition
from emf_lightning.models.compiled import CompiledForward
from emf_lightning.models.generator import Generator
from emf_lightning.models.layers import Backbone
from emf_lightning.models.slot_namer import SlotNamer
from emf_lightning.training.checkpoint_format import FORMAT_KEY, FORMAT_VERSION, module_hyperparameters
from emf_lightning.training.ema import ema_decay_at, make_ema_copy, update_ema
from emf_lightning.training.init_from import load_generator_weights
from emf_lightning.training.object_supervision import (
    SlotLayout,
    count_loss,
    matched_layout,
    object_set_loss,
    relation_loss,
    stated_relation_features,
)
from emf_lightning.training.optim import OptimConfig
from emf_lightning.training.sharding import grad_norm, is_sharded, max_abs, shard_generator
from emf_lightning.training.strategies import check_strategy
from emf_lightning.training.time_budget import StepPace, steps_in_budget, time_limit
from emf_lightning.utils.specs import build, to_spec
from emf_lightning.utils.weights import naming_the_key

# Checkpoint key of ``EMFModule.rebuilt_fingerprint``: the frozen weights a checkpoint relies on but leaves out.
FINGERPRINT_KEY = "emf_rebuilt_fingerprint"

# Captions that ``standardize_text`` fits its statistics on: the per-channel mean and std settle long before this
# (they are averages over every token), and a dataset of millions of captions should not be encoded just for them.
STANDARDIZATION_CAPTIONS = 20_000


class NonFiniteLossError(FloatingPointError):
    """The training loss (or its gradient) is NaN or infinite, or a step left non-finite or exploded weights
    (``max_weight_abs``); training stops and no checkpoint is written."""


class EMFModule(pl.LightningModule):
    """MeanFlow (or flow-matching) training of a text-conditioned generator on a frozen text encoder.

    Args:
        encoder: the frozen text encoder (``class_path``/``init_args`` in YAML; an instance or such a dict in
            Python). Its weights are never saved; it is rebuilt from this spec.
        backbone: the network u(z, r, t | text) (``models.DiT``, ``models.UNet``, ... by class; named sizes
            through their ``preset``). Its input shape is the shape of the images (or latents) it trains on.
        loss: the objective, ``meanflow.MeanFlowLoss`` (default) or ``meanflow.FlowMatchingLoss``, with its
            time sampler, adaptive weight, guidance and condition dropout; its class also picks the sampler.
        optim: optimiser, learning-rate schedule and EMA settings (``training.OptimConfig``).
        autoencoder: the frozen autoencoder whose latent space the generator models (``autoencoders``: a
            registry name such as ``sd-vae`` or ``dc-ae-f32``, a model folder, or ``class_path``/``init_args``);
            None = pixel space. Batches bring latents (``data.load_latents``, shards from ``emf cache-latents``)
            or images, which are then encoded on the fly; samples are decoded to images. Like the encoder, it is
            rebuilt from its spec and never saved.
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
        compile: ``torch.compile`` the generator's plain forward passes in training (the graph-free JVP stays
            eager: ``models.compiled``).
        standardize_text: z-score the frozen encoder's token features per channel before the connector
            (``TextConnector(standardize=True)``), with the mean and std of each channel over the real tokens of the
            training captions (up to ``STANDARDIZATION_CAPTIONS`` unique captions of ``data.train_shards``, through
            the feature cache), fitted once at the start of a fresh fit and kept in the generator's buffers, so
            checkpoints and exports carry them. For encoders whose features a few channels dominate (an LLM's
            hidden states; ``emf probe --standardize`` measures it).
        text_refiner_layers: trainable self-attention blocks over the caption's tokens after the connector's
            per-token map (``TextConnector(refiner_layers=...)``), so the tokens the backbone reads can carry
            which attribute belongs to which object; 0 (the default) has none.
        text_slots: learned slot tokens that read the whole caption and follow its tokens into the backbone's
            cross-attention (``TextConnector(slots=...)``), so an object's attributes can arrive as one token;
            0 (the default) has none.
        object_supervision: weight of an auxiliary loss that trains the slot tokens to name the objects of the
            caption's scene, one object per slot (``training.object_supervision``; needs ``text_slots`` at least
            the largest object count and object annotations in the shards' .json); 0 (the default) is off. The
            namer it trains (``slot_object_head``) is not part of the generator: sampling and exports are
            unchanged, unless ``named_slots``.
        named_slots: the backbone reads each slot's name (colour, shape and size probabilities and place, from the
            connector's own ``SlotNamer``) instead of the slot (``TextConnector(named_slots=True)``): an object
            becomes a sum of one embedding per attribute. Needs ``object_supervision`` > 0, which then teaches the
            connector's namer; off by default.
        slot_layout: the connector plans where each slot's object stands and the backbone (a U-Net) is shown each
            object's name painted at its place (``models.layout``; ``TextConnector(layout=True)``). In training the
            layout is the true places of the objects the slots are matched to, and the planner learns to sample
            them (its flow-matching loss joins the ``object_supervision`` term, which it needs); at sampling the
            planner draws it. Off by default.
        slot_relations: with ``slot_layout``, the connector also reads which relation the caption states between
            each pair of slots' objects (``models.layout.SlotRelations``, taught by the scenes' stated relations
            in the ``object_supervision`` term) and the planner is given it. Off by default.
        slot_count: with ``slot_layout``, the connector reads how many objects the caption states from its tokens
            (``models.layout.ObjectCount``, taught by the scenes' object counts in the ``object_supervision`` term)
            and the layout places that many slots, the most object-like, instead of each slot whose name is an
            object. Off by default.
        slot_pointer: with ``named_slots`` or ``slot_layout``, the connector names each slot from the caption's words
            it points at (``models.slot_namer.PointingNamer``: which kind of word from the word alone, which
            object's from the slot's index and the word's position) instead of from the slot token, so an unseen
            colour-shape pair is named as its words say. Off by default.
        layout_spacing: with ``slot_layout``, each sampled layout is spread so that every two placed objects' centres
            stand at least this fraction of the image side apart, inside the image
            (``models.layout.spread_places``); 0 (the default) samples the planner's places as they are. Sampling
            only (not structural): a trained model may be judged at another spacing
            (``emf validate --ckpt ... --model.layout_spacing=0.45``).
        relation_teacher_forcing: with ``slot_relations``, the planner is trained on the relations the captions
            state (``object_supervision.stated_relation_features``) instead of the classifier's readings of them,
            which are near chance until the classifier has learnt; at sampling it reads the classifier. Training
            only (not structural). Off by default.
        max_weight_abs: after every optimiser step, training stops (``NonFiniteLossError``, before any checkpoint
            callback runs) when a weight of the generator or its EMA copy is NaN, infinite or larger than this in
            magnitude: a diverging run never checkpoints exploded weights. The default is far above what normal
            training reaches; None keeps only the non-finite check.
    """

    def __init__(
        self,
        encoder: TextEncoder,
        backbone: Backbone,
        loss: Objective | None = None,
        optim: OptimConfig | None = None,
        autoencoder: LatentAutoencoder | str | None = None,
        init_from: str | None = None,
        feature_cache_dir: str | None = None,
        use_feature_cache: bool = True,
        sample_steps: Sequence[int] = (1, 2, 4),
        cfg_scale: float = 1.0,
        seed: int = 0,
        compile: bool = False,
        max_weight_abs: float | None = 1e4,
        standardize_text: bool = False,
        text_refiner_layers: int = 0,
        text_slots: int = 0,
        object_supervision: float = 0.0,
        named_slots: bool = False,
        slot_layout: bool = False,
        slot_relations: bool = False,
        slot_count: bool = False,
        relation_teacher_forcing: bool = False,
        slot_pointer: bool = False,
        layout_spacing: float = 0.0,
    ) -> None:
        super().__init__()
        with warnings.catch_warnings():
            # Lightning suggests ignoring nn.Module arguments; they are replaced by their specs just below.
            warnings.filterwarnings("ignore", message=".*is an instance of `nn.Module`.*")
            self.save_hyperparameters()
        with naming_the_key("model.encoder.init_args.model"):
            encoder = build(encoder, TextEncoder)
        with naming_the_key("model.backbone.init_args.model"):
            backbone = build(backbone, Backbone)
        self.loss_fn = build(loss, Objective) if loss is not None else MeanFlowLoss()
        self.optim = OptimConfig.from_any(optim)
        for name, value in dict(
            cfg_scale=cfg_scale,
            max_weight_abs=max_weight_abs,
            object_supervision=object_supervision,
            layout_spacing=layout_spacing,
        ).items():
            require_finite(f"model.{name}", value)  # a NaN passes every range check and fails far from its cause
        if max_weight_abs is not None and max_weight_abs <= 0:
            raise ConfigError(f"model.max_weight_abs must be > 0 (or null to disable the bound), got {max_weight_abs}")
        # The checkpoint keeps how to rebuild every object (plain data), never a pickled module.
        self.hparams.pop("_instantiator", None)
        with naming_the_key("model.autoencoder"):
            autoencoder = build_autoencoder(autoencoder)
        self.hparams.update(
            encoder=to_spec(encoder),
            backbone=to_spec(backbone),
            loss=to_spec(self.loss_fn),
            optim=self.optim.to_dict(),
            autoencoder=None if isinstance(autoencoder, IdentityAutoencoder) else to_spec(autoencoder),
        )
        encoder.eval().requires_grad_(False)
        # object.__setattr__ bypasses nn.Module registration: not a submodule, so not saved, optimised or
        # wrapped by DDP, and not moved by .to(); encode_text moves it lazily to the module's device.
        object.__setattr__(self, "_encoder", encoder)
        object.__setattr__(self, "_feature_cache", FeatureCache(encoder, root=feature_cache_dir))
        object.__setattr__(self, "_autoencoder", autoencoder)
        if autoencoder.latent_channels != backbone.in_channels:
            raise ConfigError(
                f"the autoencoder ({autoencoder.cache_key}) makes latents of {autoencoder.latent_channels} "
                f"channels but the backbone takes in_channels={backbone.in_channels}: set the backbone's "
                "in_channels to the latent channels"
            )

        self.objective = self.loss_fn  # the evaluator asks it for its step counts
        if slot_relations and not slot_layout:
            raise ConfigError(
                "model.slot_relations tells the layout planner how the slots' objects stand: set "
                "model.slot_layout: true as well (configs/compose_layout.yaml)"
            )
        if relation_teacher_forcing and not slot_relations:
            raise ConfigError(
                "model.relation_teacher_forcing trains the layout planner on the stated relations: set "
                "model.slot_relations: true (and model.slot_layout: true) as well"
            )
        if slot_count and not slot_layout:
            raise ConfigError(
                "model.slot_count decides how many objects the layout places: set model.slot_layout: true as well "
                "(configs/compose_layout.yaml)"
            )
        if slot_pointer and not (named_slots or slot_layout):
            raise ConfigError(
                "model.slot_pointer chooses how the connector names its slots: set model.slot_layout: true (or "
                "model.named_slots: true) as well (configs/compose_layout.yaml)"
            )
        if not 0.0 <= layout_spacing < 1.0:
            raise ConfigError(
                f"model.layout_spacing is a fraction of the image side in [0, 1) (0: off), got {layout_spacing}"
            )
        if layout_spacing and not slot_layout:
            raise ConfigError(
                "model.layout_spacing spreads the places a layout planner samples: set model.slot_layout: true as "
                "well (configs/compose_layout.yaml)"
            )
        self.generator = Generator.for_backbone(
            backbone,
            encoder.dim,
            standardize_text=standardize_text,
            text_refiner_layers=text_refiner_layers,
            text_slots=text_slots,
            named_slots=named_slots,
            slot_layout=slot_layout,
            slot_relations=slot_relations,
            slot_count=slot_count,
            slot_pointer=slot_pointer,
            layout_spacing=layout_spacing,
        )
        self.ema_generator = make_ema_copy(self.generator)
        self.slot_object_head = self._slot_object_head(object_supervision, text_slots, named_slots, slot_layout)
        self.objects_skipped: Counter = Counter()  # object_supervision's samples left out, by reason
        # The training step's network: compiled lazily (at the first step) when asked for.
        object.__setattr__(self, "_train_net", None)
        # Frozen pretrained weights (a diffusers backbone's) are rebuilt from the pretrained model, not saved.
        self.strict_loading = not self.rebuilt_state_keys()
        self._nonfinite: str | None = None
        # Length of the schedules, fixed at fit start and kept in checkpoints (validate/test reuse it).
        self._schedule_total: int | None = None
        self._restored = False  # set when weights come from a checkpoint (resume / load_from_checkpoint)
        self._pace: StepPace | None = None  # times the first steps of a run limited only by max_time

    def _slot_object_head(self, weight: float, slots: int, named: bool, layout: bool) -> SlotNamer | None:
        """The training-only namer of ``object_supervision``, after checking its settings; None when the term is
        off or when the connector names its own slots (``named_slots``, ``slot_layout``)."""
        if weight < 0:
            raise ConfigError(f"model.object_supervision must be >= 0 (0 = off), got {weight}")
        if named and not weight:
            raise ConfigError(
                "model.named_slots feeds the backbone the names of the slots, which only model.object_supervision "
                "teaches: set model.object_supervision > 0 (0.5 in docs/composition_2026-12-06.md)"
            )
        if layout and not weight:
            raise ConfigError(
                "model.slot_layout places the objects the slots name, which only model.object_supervision teaches "
                "(and supplies the places): set model.object_supervision > 0 (0.1 in configs/compose_layout.yaml)"
            )
        if not weight:
            return None
        if slots <= 0:
            raise ConfigError(
                "model.object_supervision trains the connector's slot tokens: set model.text_slots to at least "
                "the largest number of objects in a scene (4 in the shapes world)"
            )
        return None if self.generator.connector.has_namer else SlotNamer(self.generator.connector.out_dim)

    @property
    def encoder(self) -> TextEncoder:
        """The frozen text encoder (not a registered submodule)."""
        return self._encoder

    @property
    def feature_cache(self) -> FeatureCache:
        """The text feature cache in front of the encoder."""
        return self._feature_cache

    @property
    def autoencoder(self) -> LatentAutoencoder:
        """The frozen autoencoder (``IdentityAutoencoder`` in pixel space; not a registered submodule)."""
        return self._autoencoder

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) of the images the model generates (after decoding)."""
        f = self.autoencoder.downsample
        return self.data_shape[1] * f, self.data_shape[2] * f

    @property
    def data_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of what the generator models (pixels or latents): the backbone's input."""
        backbone = self.generator.backbone
        return (backbone.in_channels, *backbone.input_size)

    @classmethod
    def load_from_checkpoint(
        cls,
        checkpoint_path: str | Path,
        map_location: Any = None,
        hparams_file: Any = None,
        strict: bool | None = None,
        **overrides: Any,
    ) -> EMFModule:
        """The module saved in a checkpoint (any format version this installation reads), weights included.

        ``overrides`` replace saved constructor arguments (e.g. ``cfg_scale``). The encoder is rebuilt from its
        spec, so its weights must be on this machine.
        """
        if hparams_file is not None:
            raise ValueError("EMFModule.load_from_checkpoint takes the hyper-parameters from the checkpoint itself")
        checkpoint = torch.load(checkpoint_path, map_location=map_location or "cpu", weights_only=True)
        module = cls(**{**module_hyperparameters(checkpoint), **overrides})
        module.on_load_checkpoint(checkpoint)
        module.load_state_dict(checkpoint["state_dict"], strict=module.strict_loading if strict is None else strict)
        if isinstance(map_location, (str, torch.device)):
            module.to(map_location)
        return module

    # ------------------------------------------------------------------ text
    def move_frozen(self, module: nn.Module) -> None:
        """Move the encoder or autoencoder (kept outside the module tree, so ``.to()`` does not reach it) to the
        module's device, lazily; `emf serve` calls it too, as it encodes prompts without the feature cache."""
        try:
            device = next(module.parameters()).device
        except StopIteration:  # parameter-free (a lookup table, pixel space) have nothing to move
            return
        if device != self.device:
            module.to(self.device)

    @torch.no_grad()
    def encode_text(self, captions: Sequence[str]) -> TextFeatures:
        """Text features for ``captions`` through the feature cache; ``""`` gives the null condition."""
        self.move_frozen(self.encoder)
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
        datamodule makes images of the backbone's size (Lightning would only say "Error while merging hparams")."""
        check_strategy(self.trainer.strategy)
        datamodule = getattr(self.trainer, "datamodule", None)
        data_size = (getattr(datamodule, "hparams", None) or {}).get("image_size")
        if data_size is not None and (data_size, data_size) != self.image_size:
            h, w = self.image_size
            why = (
                "the backbone's input_size"
                if isinstance(self.autoencoder, IdentityAutoencoder)
                else (
                    f"the backbone's input_size {self.data_shape[1]} times the autoencoder's downsampling "
                    f"{self.autoencoder.downsample}"
                )
            )
            raise ConfigError(
                f"data.image_size={data_size} but the model makes {h}x{w} images ({why}): the "
                "generator learns the data's images, so make the two sizes agree"
            )

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

    def check_cached_latents(self, datamodule: Any) -> None:
        """Refuse shards whose latents ``emf cache-latents`` made with another autoencoder than ``model.autoencoder``
        (same latent shape or not: training on them would go on without a word)."""
        if not getattr(getattr(datamodule, "decode", None), "load_latents", False):
            return
        from emf_lightning.data.pipeline import expand_shard_urls
        from emf_lightning.data.shards import latent_cache_keys

        urls = [u for spec in (datamodule.train_shards, datamodule.val_shards) if spec for u in expand_shard_urls(spec)]
        for manifest, key in latent_cache_keys(urls).items():
            if key != self.autoencoder.cache_key:
                raise ConfigError(
                    f"the latents listed in {manifest} were made with the autoencoder {key}, but "
                    f"model.autoencoder is {self.autoencoder.cache_key}: set model.autoencoder to the one that "
                    "made them, or encode the shards again with `emf cache-latents --vae ...` for this one"
                )

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
        self.move_frozen(self.encoder)
        self.check_cached_latents(getattr(self.trainer, "datamodule", None))
        if self.hparams.init_from and not self._restored:
            self.load_init_weights(self.hparams.init_from)
        if self.generator.connector.standardize and not self.generator.connector.is_fitted:
            self.fit_text_standardization(self.training_captions())
        self._schedule_total = self._resolve_schedule_total()
        if self._schedule_total is None and time_limit(self.trainer) is not None:
            self._pace = StepPace()  # a time budget: the length is measured over the first steps
        elif self._schedule_total is None:
            warnings.warn(
                "the run has no step limit (max_steps/max_epochs): time-sampler schedules stay at "
                "their start values; set optim.schedule_steps to schedule them",
                stacklevel=2,
            )

    def training_captions(self) -> list[str]:
        """Up to ``STANDARDIZATION_CAPTIONS`` unique captions (with paraphrases) of the datamodule's training shards."""
        from emf_lightning.data.pipeline import captions_from_shards

        shards = getattr(getattr(self._trainer, "datamodule", None), "train_shards", None)
        if shards is None:
            raise ConfigError(
                "model.standardize_text fits its statistics on the training captions at fit start, but this fit "
                "has no datamodule with train_shards: call EMFModule.fit_text_standardization(captions) first"
            )
        return list(islice(dict.fromkeys(captions_from_shards(shards, Counter())), STANDARDIZATION_CAPTIONS))

    @torch.no_grad()
    def fit_text_standardization(self, captions: Sequence[str]) -> None:
        """Fit the connector's per-channel statistics on ``captions``' features (through the feature cache) and
        set them in the generator and its EMA copy."""
        mean, std = fit_channel_statistics(self.encode_text, captions)
        for net in (self.generator, self.ema_generator):
            net.connector.set_standardization(mean.to(self.device), std.to(self.device))
        self.save_feature_cache()

    # Newly encoded captions are written at the end of every epoch and of the fit.
    on_train_epoch_end = on_validation_epoch_end = on_fit_end = save_feature_cache

    def load_init_weights(self, path: str) -> None:
        """Start from another run's generator (+ EMA) weights; time embedder -> interval embedder."""
        load_generator_weights(self, path, copy_time_to_interval=True)

    # ------------------------------------------------------------------ training
    def schedule_length(self) -> int | None:
        """Steps the schedules (time sampler, lr decay) span: schedule_steps, else the run's length."""
        return self.optim.schedule_steps or self._schedule_total

    def progress(self) -> float:
        """Training progress in [0, 1] for the time-sampler schedules: global_step / schedule length."""
        total = self.schedule_length()
        if not total:
            return 0.0
        return min(1.0, self.global_step / total)

    def _resolve_schedule_total(self) -> int | None:
        """``schedule_steps``, else the trainer's max_steps, else for a run limited by ``max_time`` the length a
        resumed checkpoint measured (a fresh run measures it: ``training.time_budget``), else the trainer's estimate
        of the run's optimiser steps."""
        if self.optim.schedule_steps:
            return int(self.optim.schedule_steps)
        if self.trainer.max_steps and self.trainer.max_steps > 0:
            return int(self.trainer.max_steps)
        if time_limit(self.trainer) is not None:
            return self._schedule_total if self._restored else None
        est = self.trainer.estimated_stepping_batches
        return int(est) if math.isfinite(est) else None

    def _step_generator(self, stream: str, step: int) -> torch.Generator:
        """A random stream that depends only on (seed, stream, step, rank): resumed runs repeat it exactly."""
        rank = self.global_rank if self._trainer is not None else 0
        digest = hashlib.sha256(f"{self.hparams.seed}/{stream}/{step}/{rank}".encode()).digest()
        gen = torch.Generator(device=self.device)
        gen.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
        return gen

    def compute_loss(
        self, batch: dict[str, Any], net: nn.Module, generator: torch.Generator, train: bool
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The objective on one batch: encode captions and call the loss.

        Condition dropout (``cond_drop_prob``) is drawn by the loss from ``generator`` in training only;
        evaluation always uses the real conditions.
        """
        images = self.model_inputs(batch)
        feats = self.batch_text_features(batch)
        cond = (feats.tokens.to(images.dtype), feats.mask)
        null = null_condition(1, self.encoder.dim, device=images.device, dtype=cond[0].dtype)
        supervise = train and bool(self.hparams.object_supervision)
        connector = (self.generator if train else self.ema_generator).connector
        metas = batch.get("meta") or [None] * images.shape[0]
        if supervise or connector.layout:
            logits, place, slots = self.read_slot_names(connector, *cond)
        if connector.layout:
            # The backbone is shown the true places of the objects the slots are matched to (teacher forcing).
            layout = matched_layout(logits, place, metas)
            cond = (*cond, layout.places, layout.present)
            null = (*null, *self.generator.empty_layout(1, images.device))
        drop_mask = None if train else torch.zeros(images.shape[0], dtype=torch.bool, device=images.device)
        try:
            loss, stats = self.loss_fn(
                net, images, cond, null, self.progress(), generator=generator, drop_mask=drop_mask
            )
        except FloatingPointError as err:  # the loss refuses non-finite values; add where it happened
            if train:
                self._fail_nonfinite(f"loss ({err})", batch)
            raise
        if supervise:
            objects, object_stats = self.object_loss(logits, place, metas)
            if connector.layout:
                objects = objects + self.layout_loss(connector, slots, layout, generator, object_stats)
            if connector.counts:
                objects = objects + self.object_count_loss(connector, feats.tokens, feats.mask, layout, object_stats)
            loss = loss + self.hparams.object_supervision * objects
            stats = {**stats, **object_stats}
        return loss, stats

    def layout_loss(
        self,
        connector: nn.Module,
        slots: Tensor,
        layout: SlotLayout,
        generator: torch.Generator,
        stats: dict[str, Tensor],
    ) -> Tensor:
        """The planner's flow-matching loss on the matched objects' places (reading detached slots: the names
        teach them), plus, with ``slot_relations``, the cross-entropy of the relations the slots' pairs are read
        to stand in against the caption's stated ones (this one reaches the slots); its parts go into ``stats``."""
        if connector.relations and self.hparams.get("relation_teacher_forcing"):
            relations = stated_relation_features(layout.relations, layout.present)
        else:
            relations = connector.relation_features(slots, layout.present)
        planning = connector.layout_planner.loss(
            layout.places, layout.present, slots.detach(), generator, relations=relations
        )
        stats["layout_flow"] = planning.detach()
        if not connector.relations:
            return planning
        self.objects_skipped.update(layout.skipped)  # rows left out of the relation targets
        stated, right = relation_loss(connector.slot_relations(slots), layout.relations)
        stats["layout_relations"] = stated.detach()
        if right is not None:
            stats["layout_relations_accuracy"] = right
        return planning + stated

    def object_count_loss(
        self, connector: nn.Module, tokens: Tensor, mask: Tensor | None, layout: SlotLayout, stats: dict[str, Tensor]
    ) -> Tensor:
        """``slot_count``'s cross-entropy: the object count the connector reads from the captions' tokens against
        the scenes' (``layout.counts``); its accuracy goes into ``stats``."""
        loss, right = count_loss(connector.count_objects(tokens, mask), layout.counts)
        stats["layout_count"] = loss.detach()
        if right is not None:
            stats["layout_count_accuracy"] = right
        return loss

    def object_loss(
        self, logits: list[Tensor], place: Tensor, metas: Sequence[Any]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """``object_supervision``'s term: the names of the generator's slot tokens for the batch's captions (never
        a dropped caption's null condition) against the scenes' objects; skipped samples are counted."""
        loss, stats, skipped = object_set_loss(logits, place, metas)
        self.objects_skipped.update(skipped)
        stats["objects_skipped"] = torch.tensor(float(sum(self.objects_skipped.values())))
        return loss, stats

    def read_slot_names(
        self, connector: nn.Module, tokens: Tensor, mask: Tensor | None
    ) -> tuple[list[Tensor], Tensor, Tensor]:
        """What ``connector``'s (the generator's or its EMA copy's) slot tokens name for these captions: (logits
        [B, K, n_a + 1] per attribute, place [B, K, 2], the slots [B, K, D]). The connector's own namer
        (``named_slots``, ``slot_layout``) reads the slots, the training-only ``slot_object_head`` the slot tokens
        as the backbone reads them."""
        context, _, reading = connector.read(tokens, mask)
        if connector.has_namer:
            return *connector.name(reading), reading.slots
        return *self.slot_object_head(context[:, -connector.slots :]), reading.slots

    def name_slots(self, connector: nn.Module, tokens: Tensor, mask: Tensor | None) -> tuple[list[Tensor], Tensor]:
        """:meth:`read_slot_names` without the slots: (logits per attribute, place)."""
        logits, place, _ = self.read_slot_names(connector, tokens, mask)
        return logits, place

    def model_inputs(self, batch: dict[str, Any]) -> Tensor:
        """What the generator models for this batch: its images in pixel space, else its cached latents
        (``batch["latent"]``) or, without them, its images encoded now by the autoencoder."""
        latents = batch.get("latent")
        if latents is not None:
            x, what = latents.to(self.device), "latents (from the shards)"
        elif isinstance(self.autoencoder, IdentityAutoencoder):
            x, what = batch["image"], "images"
        else:
            self.move_frozen(self.autoencoder)
            x, what = self.autoencoder.encode(batch["image"]), f"latents of {tuple(batch['image'].shape)} images"
        expected = self.data_shape
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            hint = (
                "make data.image_size match the backbone's input_size"
                if what == "images"
                else f"the backbone takes latents [B, {expected[0]}, {expected[1]}, {expected[2]}]: set its input_size "
                f"and in_channels to the autoencoder's latent shape ({self.autoencoder.cache_key}), or re-cache the "
                "latents at the data's image size"
            )
            raise ConfigError(
                f"batch {what} have shape {tuple(x.shape)}, but the model expects [B, {expected[0]}, "
                f"{expected[1]}, {expected[2]}]: {hint}"
            )
        return x

    def _train_generator(self, batch_idx: int) -> torch.Generator:
        """The training batch's random stream: one per optimiser step and, with gradient accumulation, per
        micro-batch.

        ``global_step`` advances only after the last micro-batch of a step, so keyed by the step alone every
        micro-batch would draw the same noise, times and dropout. Lightning groups micro-batches by
        ``batch_idx % accumulate_grad_batches``.
        """
        accumulate = max(1, int(getattr(self.trainer, "accumulate_grad_batches", 1) or 1))
        return self._step_generator(f"train/{batch_idx % accumulate}", self.global_step)

    @property
    def train_net(self) -> Any:
        """The generator as the training step calls it: compiled outside the JVP with ``compile: true``."""
        if not self.hparams.get("compile"):
            return self.generator
        if self._train_net is None:
            object.__setattr__(self, "_train_net", CompiledForward(self.generator))
        return self._train_net

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        gen = self._train_generator(batch_idx)
        loss, stats = self.compute_loss(batch, self.train_net, gen, train=True)
        if not torch.isfinite(loss):
            self._fail_nonfinite(f"loss is {loss.item()}", batch)
        bs = self._log_loss("train", loss, stats, batch)
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
        update_ema(self.ema_generator, self.generator, ema_decay_at(self.global_step, self.optim.ema_decay))
        self.check_weights(f"after optimiser step {self.global_step}")
        if self._pace is not None:
            self._measure_schedule_length()

    def _measure_schedule_length(self) -> None:
        """For a run limited only by ``max_time``: once ``StepPace`` has timed its steps, the schedules span the
        steps done plus those the rest of the budget holds at that pace (rank 0's measure on every rank)."""
        seconds_per_step = self._pace.observe(self.global_step + 1)
        if seconds_per_step is None:
            return
        timer = time_limit(self.trainer)
        total = steps_in_budget(self.global_step + 1, seconds_per_step, timer.time_remaining())
        self._schedule_total = int(self.trainer.strategy.broadcast(total, src=0))
        self._pace = None
        rank_zero_info(
            f"time budget: {seconds_per_step:.3f} s per step, the schedules span {self._schedule_total} steps"
        )

    def check_weights(self, when: str) -> None:
        """Stop with NonFiniteLossError when the generator or its EMA copy holds a NaN, an infinity or a weight
        above ``max_weight_abs`` in magnitude. One fused reduction and one host sync; a collective under FSDP2
        (every rank calls it at the same point and gets the same answer)."""
        largest = float(max_abs([*self.generator.parameters(), *self.ema_generator.parameters()]))
        bound = self.hparams.get("max_weight_abs")
        if math.isfinite(largest) and (bound is None or largest <= bound):
            return
        found = (
            "a NaN or infinite weight"
            if not math.isfinite(largest)
            else f"a weight of magnitude {largest:.3g} (above model.max_weight_abs={bound:g})"
        )
        self._nonfinite = (
            f"The generator or its EMA copy holds {found} {when}: the run diverged. "
            "Training stopped; no checkpoint of these weights is written. Lower the learning rate (or raise "
            "model.max_weight_abs if such weights are intended)."
        )
        raise NonFiniteLossError(self._nonfinite)

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW on the generator only; linear warm-up, then ``optim.lr_decay``, stepped every optimiser step."""
        o = self.optim
        params = list(self.generator.parameters())
        if self.hparams.object_supervision and is_sharded(self.generator):
            # Its namer would stay whole on every rank with no gradient reduction (ranks would drift apart), and
            # the term calls the connector outside the sharded generator's forward.
            raise ConfigError("model.object_supervision is not supported with FSDP2 sharding; use DDP")
        if self.slot_object_head is not None:
            params += list(self.slot_object_head.parameters())
        opt = torch.optim.AdamW(params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, self.lr_factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}

    def lr_factor(self, step: int) -> float:
        """Multiplier of ``optim.lr`` for optimiser step ``step`` (0-based), over the run's schedule length."""
        return self.optim.lr_factor(step, self.schedule_length())

    def rebuilt_state_keys(self) -> list[str]:
        """State-dict keys that checkpoints leave out: the backbone's frozen pretrained weights, in both copies."""
        keys = self.generator.backbone.pretrained_state_keys()
        return [f"{net}.backbone.{k}" for net in ("generator", "ema_generator") for k in keys]

    def rebuilt_fingerprint(self) -> str:
        """A digest of the frozen pretrained weights checkpoints leave out (names, shapes, dtypes and a strided
        sample of each tensor's values): a different base model in the same folder changes it."""
        cached = self.__dict__.get("_rebuilt_fingerprint")
        if cached is not None:  # frozen weights: computed once (a gather under sharding)
            return cached
        digest = hashlib.sha256()
        state = self.generator.backbone.state_dict()
        for name in sorted(self.generator.backbone.pretrained_state_keys()):
            tensor = state[name].detach()
            tensor = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor  # a DTensor shard
            flat = tensor.reshape(-1)
            sample = flat[:: max(1, flat.numel() // 256)].float().cpu()
            digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
            digest.update(sample.numpy().tobytes())
        self.__dict__["_rebuilt_fingerprint"] = digest.hexdigest()[:16]
        return self.__dict__["_rebuilt_fingerprint"]

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
        checkpoint[FORMAT_KEY] = FORMAT_VERSION
        rebuilt = self.rebuilt_state_keys()
        for key in rebuilt:
            checkpoint["state_dict"].pop(key, None)
        checkpoint["emf_rebuilt_keys"] = rebuilt
        if rebuilt:
            checkpoint[FINGERPRINT_KEY] = self.rebuilt_fingerprint()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """The schedule length of the run (validate/test of a checkpoint reuse it), and a check that the weights
        the checkpoint leaves out are exactly those this module rebuilt from pretrained weights."""
        if not self.strict_loading:
            own, saved = set(self.state_dict()), set(checkpoint.get("state_dict") or {})
            missing = own - saved - set(self.rebuilt_state_keys())
            unexpected = saved - own
            if missing or unexpected:
                raise CheckpointError(
                    f"the checkpoint's weights do not fit this model: missing {sorted(missing)[:5]}, "
                    f"unexpected {sorted(unexpected)[:5]} (was it trained with another backbone?)"
                )
        saved_fingerprint = checkpoint.get(FINGERPRINT_KEY)
        if saved_fingerprint and saved_fingerprint != self.rebuilt_fingerprint():
            backbone = self.hparams.backbone.get("init_args", {}) if isinstance(self.hparams.backbone, dict) else {}
            raise CheckpointError(
                f"the frozen pretrained weights rebuilt from {backbone.get('model')!r} are not those this checkpoint "
                f"was trained on (fingerprint {self.rebuilt_fingerprint()} here, {saved_fingerprint} in the "
                "checkpoint): another base model is in that folder; set model.backbone.init_args.model to the base "
                "model the run started from"
            )
        self._schedule_total = checkpoint.get("emf_schedule_total", self._schedule_total)
        self._restored = True

    # ------------------------------------------------------------------ evaluation
    def _eval_loss(self, batch: dict[str, Any], batch_idx: int, stage: str) -> Tensor:
        # Fixed streams per batch index: the validation loss of two checkpoints is comparable.
        gen = self._step_generator(stage, batch_idx)
        loss, stats = self.compute_loss(batch, self.ema_generator, gen, train=False)
        self._log_loss(stage, loss, stats, batch, sync_dist=True)
        return loss

    def _log_loss(self, stage: str, loss: Tensor, stats: dict[str, Tensor], batch: dict[str, Any], **kw: Any) -> int:
        """Log ``<stage>/loss`` (on the progress bar) and the loss's other statistics; returns the batch size."""
        bs = batch["image"].shape[0]
        self.log(f"{stage}/loss", loss, prog_bar=True, batch_size=bs, **kw)
        for name, value in stats.items():
            if name != "loss":
                self.log(f"{stage}/{name}", value, batch_size=bs, **kw)
        return bs

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
    def generate(
        self, captions: Sequence[str], steps: int = 1, cfg_scale: float = 1.0, seed: int = 0, use_ema: bool = True
    ) -> Tensor:
        """Images [B, 3, H, W] in [-1, 1] for ``captions``; the same seed gives the same images.

        The loss's sampler (MeanFlow: ``steps`` jumps; flow matching: ``steps`` Euler steps) from noise of the
        generator's shape, then the autoencoder decodes (in pixel space: a clamp). ``cfg_scale`` != 1 applies
        classifier-free guidance against the null condition.
        """
        net = self.ema_generator if use_ema else self.generator
        return sample_images(
            net,
            self.encode_text,
            self.encoder.dim,
            self.loss_fn,
            self.autoencoder,
            self.data_shape,
            captions,
            steps,
            cfg_scale,
            seed,
            self.device,
        )
