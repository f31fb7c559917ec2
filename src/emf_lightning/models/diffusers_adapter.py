"""A pretrained diffusers flow-matching transformer as a MeanFlow backbone: u(z, r, t | text).

`SanaMeanFlowBackbone` wraps `diffusers.SanaTransformer2DModel` with this project's backbone contract
``forward(x, r, t, context, context_mask) -> u`` (see `models/dit.py`), so `Generator(connector, backbone)` and the
MeanFlow loss use it like the DiT.

Conventions. SANA is trained with diffusers' flow-matching schedulers (`FlowMatchEulerDiscreteScheduler.scale_noise`:
``x_sigma = sigma * noise + (1 - sigma) * x``; `step`: ``x_next = x + (sigma_next - sigma) * model_output``), so its
output is the velocity ``noise - x`` at noise level sigma: exactly this project's ``z_t = (1 - t) x + t e``,
``v = e - x`` with t = sigma, no sign flip. The pipeline feeds ``timestep = sigma * 1000 * config.timestep_scale``
(scheduler timesteps are sigma x num_train_timesteps = 1000); the flow shift only moves which sigmas are visited.
So our raw t in [0, 1] is multiplied by ``time_scale = 1000 * timestep_scale`` before the pretrained embedder.

The interval t - r enters through SANA's own second scalar input, the guidance embedder
(`SanaCombinedTimestepGuidanceEmbeddings`, used by SANA-Sprint): its embedding is summed with the t embedding
before the shared adaLN projection. `interval_init`:

* ``"zero"`` (default): a new embedder whose last layer is zero, so it adds exactly nothing at init: the output
  equals the pretrained model's velocity for every (r, t), in particular at r = t (diffusers' SANA-Sprint recipe);
* ``"copy"``: the pretrained time embedder's weights (T2I-Distill); changes the output at r = t by embed(0);
* ``"random"``: diffusers' default init (EMF trains its interval embedder from random);
* ``"existing"``: the transformer already carries this adapter's interval embedder (an export of it).

Because the interval lives in a diffusers-native slot, the fine-tuned transformer saves with `save_pretrained` and
loads back with `SanaTransformer2DModel.from_pretrained` (guidance_embeds=True; pass ``guidance = (t - r) x 1000``).

JVP. SANA's self-attention is linear attention (plain matmuls; forward-mode AD needs nothing special); its
cross-attention calls `F.scaled_dot_product_attention`, whose fused kernels have no forward-AD rule; the JVP modes
(`meanflow.tangent_rules`) route that call to SDPA's math backend, as they route ours (`models.attention`). The
sinusoidal time features and the linear attention are computed in at least float32 and in float64 for float64 input
(diffusers casts both to float32, which would make float64 finite-difference checks meaningless); for float32 and
bf16 inputs they compute exactly what diffusers computes.
"""

from __future__ import annotations

import fnmatch
import logging
import math
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .layers import Backbone

log = logging.getLogger(__name__)

IntervalInit = Literal["zero", "copy", "random", "existing"]
INTERVAL_INITS = ("zero", "copy", "random", "existing")

# Named transformer configs for pretrained=False (random weights). "sana-1.6b" is SANA / SANA-1.5 1.6B at 1024 px
# (SanaMS_1600M_P1_D20: 20 blocks of width 2240, DC-AE latents 32 x 32 x 32, Gemma-2 captions of width 2304),
# for benchmarks at the real size; "tiny" builds in milliseconds for tests.
SANA_CONFIGS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=2,
        num_cross_attention_heads=2,
        cross_attention_head_dim=8,
        cross_attention_dim=16,
        caption_channels=24,
        sample_size=8,
        patch_size=2,
        mlp_ratio=2.5,
    ),
    "sana-1.6b": dict(
        in_channels=32,
        out_channels=32,
        num_attention_heads=70,
        attention_head_dim=32,
        num_layers=20,
        num_cross_attention_heads=20,
        cross_attention_head_dim=112,
        cross_attention_dim=2240,
        caption_channels=2304,
        sample_size=32,
        patch_size=1,
        mlp_ratio=2.5,
    ),
}

# Parameter-name patterns (fnmatch, relative to the transformer) trained in full for each named selection.
# "emf": EMF's fine-tune: the blocks (with their scale_shift_tables), the time and interval embedders and the
# output scale_shift_table; patch embedding, caption projection and output projection stay frozen.
TRAINABLE_PRESETS: dict[str, tuple[str, ...]] = {
    "all": ("*",),
    "none": (),
    "emf": ("transformer_blocks.*", "time_embed.*", "scale_shift_table"),
}
LORA_DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
_LORA_KEYS = {"r", "alpha", "target_modules", "dropout"}


class PreciseTimesteps(nn.Module):
    """diffusers' `Timesteps` (sinusoidal features of a scalar) computed in at least float32 and in float64 for
    float64 input; for float32 input the same operations in the same order as diffusers' `get_timestep_embedding`."""

    def __init__(self, num_channels: int, flip_sin_to_cos: bool, downscale_freq_shift: float, scale: float = 1):
        super().__init__()
        self.num_channels = num_channels
        self.flip_sin_to_cos = flip_sin_to_cos
        self.downscale_freq_shift = downscale_freq_shift
        self.scale = scale

    @classmethod
    def like(cls, timesteps: nn.Module) -> PreciseTimesteps:
        """The same features as a diffusers `Timesteps` module."""
        return cls(timesteps.num_channels, timesteps.flip_sin_to_cos, timesteps.downscale_freq_shift, timesteps.scale)

    def forward(self, timesteps: Tensor) -> Tensor:
        """[B] -> [B, num_channels]."""
        if timesteps.ndim != 1:
            raise ValueError(f"timesteps must be 1-D, got shape {tuple(timesteps.shape)}")
        dtype = torch.promote_types(timesteps.dtype, torch.float32)
        half = self.num_channels // 2
        exponent = -math.log(10000) * torch.arange(0, half, dtype=dtype, device=timesteps.device)
        exponent = exponent / (half - self.downscale_freq_shift)
        args = timesteps[:, None].to(dtype) * torch.exp(exponent)[None, :]
        args = self.scale * args
        emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
        if self.flip_sin_to_cos:
            emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
        if self.num_channels % 2:
            emb = F.pad(emb, (0, 1, 0, 0))
        return emb


class PreciseLinearAttnProcessor:
    """SANA's ReLU linear attention (diffusers' `SanaLinearAttnProcessor2_0`) accumulated in at least float32 and
    in float64 for float64 input (diffusers always uses float32); for float32 and bf16 the same operations."""

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
    ) -> Tensor:
        dtype = hidden_states.dtype
        source = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        query, key, value = attn.to_q(hidden_states), attn.to_k(source), attn.to_v(source)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        # [B, N, H*d] -> queries and values [B, H, d, N], keys [B, H, N, d]
        query = query.transpose(1, 2).unflatten(1, (attn.heads, -1))
        key = key.transpose(1, 2).unflatten(1, (attn.heads, -1)).transpose(2, 3)
        value = value.transpose(1, 2).unflatten(1, (attn.heads, -1))
        query, key = F.relu(query), F.relu(key)
        acc = torch.promote_types(dtype, torch.float32)
        query, key, value = query.to(acc), key.to(acc), value.to(acc)
        # A row of ones under the values: the same product then holds each query's normaliser.
        value = F.pad(value, (0, 0, 0, 1), mode="constant", value=1.0)
        out = torch.matmul(torch.matmul(value, key), query)
        out = out[:, :, :-1] / (out[:, :, -1:] + 1e-15)
        out = out.flatten(1, 2).transpose(1, 2).to(dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if dtype == torch.float16:
            out = out.clip(-65504, 65504)
        return out


def _resolve_trainable(trainable: str | list[str] | tuple[str, ...] | None, lora: bool) -> tuple[str, ...]:
    if trainable is None:
        trainable = "none" if lora else "all"
    if isinstance(trainable, str):
        if trainable not in TRAINABLE_PRESETS:
            raise ValueError(
                f"trainable={trainable!r}: use one of {sorted(TRAINABLE_PRESETS)} or a list of "
                "parameter-name patterns (fnmatch, e.g. 'transformer_blocks.*')"
            )
        return TRAINABLE_PRESETS[trainable]
    return tuple(str(p) for p in trainable)


class SanaMeanFlowBackbone(Backbone):
    """SANA (`diffusers.SanaTransformer2DModel`) as a MeanFlow backbone: ``forward(x, r, t, context, mask) -> u``.

    Args:
        model: HF id (in the local cache) or local folder of a pretrained SANA pipeline or transformer.
        subfolder: the transformer's folder inside a pipeline (a component folder works too).
        config: build a transformer with RANDOM weights from this config (a dict of `SanaTransformer2DModel`
            arguments, or a name in `SANA_CONFIGS`); needs pretrained=False. Tests and benchmarks only.
        pretrained: False without `config` builds random weights from `model`'s config.json.
        input_size: side (or (H, W)) of the latents; default the config's sample_size.
        interval_init: how the t - r embedder starts (see the module docstring); "zero" keeps the pretrained
            model's output unchanged.
        time_scale: multiplier of t before the pretrained time embedder; default 1000 x config.timestep_scale
            (what the pretrained model saw); t - r gets the same scale.
        trainable: parameters trained in full: "all", "none", "emf" (see TRAINABLE_PRESETS) or a list of fnmatch
            patterns over the transformer's parameter names. Default "all", or "none" with LoRA.
        lora: add LoRA adapters (peft): {"r": 16, "alpha": r, "target_modules": [...], "dropout": 0.0}; adapter
            weights are always trainable, and start at zero (the output is unchanged).
        gradient_checkpointing: recompute each block in the backward pass (less activation memory).
        variant: weight file variant, e.g. "fp16".
        seed: seed of every random init (random transformer, new interval embedder).
        dtype: parameter dtype when loading or building (default float32).
    """

    default_model = "Efficient-Large-Model/SANA1.5_1.6B_1024px_diffusers"

    def __init__(
        self,
        model: str | None = None,
        subfolder: str | None = "transformer",
        config: dict[str, Any] | str | None = None,
        pretrained: bool = True,
        input_size: int | tuple[int, int] | None = None,
        interval_init: IntervalInit = "zero",
        time_scale: float | None = None,
        trainable: str | list[str] | None = None,
        lora: dict[str, Any] | None = None,
        gradient_checkpointing: bool = False,
        variant: str | None = None,
        seed: int = 0,
        dtype: torch.dtype | str | None = None,
    ):
        super().__init__()
        if interval_init not in INTERVAL_INITS:
            raise ValueError(f"interval_init must be one of {INTERVAL_INITS}, got {interval_init!r}")
        if lora and isinstance(trainable, str) and trainable != "none":
            from emf_lightning.errors import ConfigError

            raise ConfigError(
                f"model.backbone.init_args.lora is set and trainable={trainable!r} would also train those weights "
                "in full, not LoRA instead: set model.backbone.init_args.trainable=none (LoRA only), or a list of "
                "parameter patterns to train beside the adapters"
            )
        from emf_lightning.utils.model_helpers import resolve_dtype

        param_dtype = resolve_dtype(dtype)
        self.transformer = self._build_transformer(model, subfolder, config, pretrained, variant, seed, param_dtype)
        self.loaded_pretrained = pretrained and config is None
        cfg = self.transformer.config
        out_channels = cfg.out_channels or cfg.in_channels
        if out_channels != cfg.in_channels:
            raise ValueError(
                f"SANA transformer with in_channels={cfg.in_channels} but out_channels={out_channels}: "
                "a MeanFlow backbone predicts a velocity of the input's shape"
            )
        size = input_size if input_size is not None else cfg.sample_size
        self.input_size = (size, size) if isinstance(size, int) else tuple(size)
        if self.input_size[0] % cfg.patch_size or self.input_size[1] % cfg.patch_size:
            raise ValueError(f"patch_size {cfg.patch_size} must divide input_size {self.input_size}")
        self.in_channels = int(cfg.in_channels)
        self.context_dim = int(cfg.caption_channels)
        self.time_scale = float(1000.0 * cfg.timestep_scale if time_scale is None else time_scale)
        self.interval_init = interval_init
        self._add_interval_embedder(interval_init, seed)
        self._use_precise_time_and_attention()
        if gradient_checkpointing:
            self.transformer.enable_gradient_checkpointing()
        if lora:
            self._add_lora(dict(lora), seed)
        self._select_trainable(_resolve_trainable(trainable, bool(lora)))

    # -- construction ---------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls, model: str | None = None, subfolder: str | None = "transformer", **kwargs: Any
    ) -> SanaMeanFlowBackbone:
        """Load pretrained weights offline (local folder or HF cache); missing weights -> MissingWeightsError."""
        return cls(model=model, subfolder=subfolder, pretrained=True, **kwargs)

    @classmethod
    def from_config(cls, config: dict[str, Any] | str, **kwargs: Any) -> SanaMeanFlowBackbone:
        """A transformer with RANDOM weights from a config dict or a SANA_CONFIGS name (tests, benchmarks)."""
        return cls(config=config, pretrained=False, **kwargs)

    def _build_transformer(
        self,
        model: str | None,
        subfolder: str | None,
        config: dict[str, Any] | str | None,
        pretrained: bool,
        variant: str | None,
        seed: int,
        dtype: torch.dtype,
    ) -> nn.Module:
        from diffusers import SanaTransformer2DModel

        from emf_lightning.utils import hub
        from emf_lightning.utils.model_helpers import random_init

        if config is not None and pretrained:
            raise ValueError(
                "config= builds a transformer with random weights: set pretrained=False "
                "(or drop config to load pretrained weights)"
            )
        if pretrained:
            source, sub = hub.locate(model or self.default_model, subfolder, hub.diffusers_weights(variant))
            return hub.load(
                SanaTransformer2DModel.from_pretrained, source, subfolder=sub, variant=variant, torch_dtype=dtype
            )
        if isinstance(config, str):
            if config not in SANA_CONFIGS:
                raise ValueError(f"unknown SANA config {config!r}; named configs: {sorted(SANA_CONFIGS)}")
            config = SANA_CONFIGS[config]
        if config is None:
            config = hub.load_config(SanaTransformer2DModel, model or self.default_model, subfolder)
        log.warning("SanaTransformer2DModel built with RANDOM weights (pretrained=False): for tests and benchmarks")
        transformer = random_init(lambda: SanaTransformer2DModel(**config), seed)
        return transformer if dtype == torch.float32 else transformer.to(dtype)

    def _add_interval_embedder(self, init: IntervalInit, seed: int) -> None:
        """Give the transformer a second scalar embedder for t - r in its guidance slot (see module docstring)."""
        from diffusers.models.embeddings import TimestepEmbedding
        from diffusers.models.transformers.sana_transformer import SanaCombinedTimestepGuidanceEmbeddings

        tr = self.transformer
        if init == "existing":
            if not tr.config.guidance_embeds:
                raise ValueError(
                    "interval_init='existing' needs a transformer that already has the interval "
                    "embedder (guidance_embeds=True, as this adapter saves it); this one has none: "
                    "use 'zero' or 'copy'"
                )
            return
        if tr.config.guidance_embeds:
            raise ValueError(
                "this SANA transformer already has a guidance embedder (guidance_embeds=True, e.g. "
                "SANA-Sprint); the interval t - r needs that slot. Start from a flow-matching SANA, "
                "or pass interval_init='existing' if it is this adapter's own export"
            )
        old = tr.time_embed  # AdaLayerNormSingle: emb (time_proj + timestep_embedder) -> silu -> linear
        width = old.linear.in_features
        with torch.device("meta"):  # only the new embedder needs real weights; the rest is reused below
            new = SanaCombinedTimestepGuidanceEmbeddings(width)
        new.time_proj = old.emb.time_proj
        new.timestep_embedder = old.emb.timestep_embedder
        new.linear = old.linear
        reference = old.linear.weight
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            new.guidance_embedder = TimestepEmbedding(in_channels=old.emb.time_proj.num_channels, time_embed_dim=width)
        new.guidance_embedder.to(device=reference.device, dtype=reference.dtype)
        tr.time_embed = new
        tr.register_to_config(guidance_embeds=True)
        if init == "zero":
            nn.init.zeros_(new.guidance_embedder.linear_2.weight)
            nn.init.zeros_(new.guidance_embedder.linear_2.bias)
        elif init == "copy":
            self.copy_time_embedder_to_interval()

    def _use_precise_time_and_attention(self) -> None:
        emb = self.transformer.time_embed
        emb.time_proj = PreciseTimesteps.like(emb.time_proj)
        emb.guidance_condition_proj = PreciseTimesteps.like(emb.guidance_condition_proj)
        for block in self.transformer.transformer_blocks:
            block.attn1.set_processor(PreciseLinearAttnProcessor())

    def _add_lora(self, lora: dict[str, Any], seed: int) -> None:
        try:
            from peft import LoraConfig
        except ImportError as err:
            raise ImportError("LoRA needs peft: pip install 'emf-lightning[lora]' (or pip install peft)") from err

        unknown = set(lora) - _LORA_KEYS
        if unknown:
            raise ValueError(f"unknown LoRA option(s) {sorted(unknown)}; allowed: {sorted(_LORA_KEYS)}")
        rank = int(lora.get("r", 16))
        config = LoraConfig(
            r=rank,
            lora_alpha=float(lora.get("alpha", rank)),
            target_modules=list(lora.get("target_modules", LORA_DEFAULT_TARGETS)),
            lora_dropout=float(lora.get("dropout", 0.0)),
            init_lora_weights=True,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.transformer.add_adapter(config)  # lora_B starts at zero: the output is unchanged

    def _select_trainable(self, patterns: tuple[str, ...]) -> None:
        names = [n for n, _ in self.transformer.named_parameters()]
        unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in names)]
        if unmatched:
            raise ValueError(
                f"trainable pattern(s) {unmatched} match no parameter of the SANA transformer "
                f"(names look like {names[:3]})"
            )
        for name, param in self.transformer.named_parameters():
            is_lora = ".lora_" in name
            param.requires_grad_(is_lora or any(fnmatch.fnmatchcase(name, p) for p in patterns))
        if not any(p.requires_grad for p in self.transformer.parameters()):
            raise ValueError("no trainable parameter: trainable='none' needs LoRA (lora={...})")

    # -- the backbone contract --------------------------------------------------------------------------
    @torch.no_grad()
    def copy_time_embedder_to_interval(self) -> None:
        """Copy the pretrained time embedder's weights into the interval embedder (T2I-Distill's start)."""
        emb = self.transformer.time_embed
        emb.guidance_embedder.load_state_dict(emb.timestep_embedder.state_dict())

    def pretrained_state_keys(self) -> list[str]:
        """The frozen weights of a pretrained transformer (rebuilt from it, so checkpoints leave them out)."""
        if not self.loaded_pretrained:
            return []
        return [name for name, p in self.named_parameters() if not p.requires_grad]

    @torch.no_grad()
    def export_pretrained(self, directory: Path) -> dict[str, Any]:
        """The transformer as a diffusers folder (``directory/transformer``, LoRA merged into the weights):
        ``SanaTransformer2DModel.from_pretrained`` loads it, with the interval embedder in its guidance slot (the
        precise time features and attention processors hold no weights: diffusers' own compute the same in fp32)."""
        import copy

        transformer = copy.deepcopy(self.transformer)
        if getattr(transformer, "peft_config", None):
            transformer.fuse_lora()
            transformer.unload_lora()
        # diffusers' SanaSprintPipeline feeds guidance = guidance_scale x guidance_embeds_scale: with the interval
        # scale there, guidance_scale = t - r gives the interval this model was trained with.
        transformer.register_to_config(guidance_embeds_scale=self.time_scale)  # t - r is scaled like t
        transformer.save_pretrained(str(directory / "transformer"))
        return {
            "model": "transformer",
            "subfolder": None,
            "config": None,
            "pretrained": True,
            "interval_init": "existing",
            "lora": None,
            "trainable": "all",
            "gradient_checkpointing": False,
        }

    def sharding_units(self) -> list[nn.Module]:
        """The transformer blocks: FSDP units (every other module belongs to the root unit)."""
        return list(self.transformer.transformer_blocks)

    def trainable_parameter_names(self) -> list[str]:
        """Names (relative to this backbone) of the parameters that require grad."""
        return [n for n, p in self.named_parameters() if p.requires_grad]

    def forward(self, x: Tensor, r: Tensor, t: Tensor, context: Tensor, context_mask: Tensor | None = None) -> Tensor:
        """Average velocity over [r, t].

        Args:
            x: [B, C, H, W] noisy latents z_t.
            r, t: [B] times with r <= t (raw, in [0, 1]; scaled here as the pretrained model expects).
            context: [B, L, caption_channels] text tokens (after the project's connector; SANA's own caption
                projection and norm then apply).
            context_mask: [B, L] bool, True = real token; None = all real.

        Returns:
            u: [B, C, H, W]. With interval_init="zero" and untrained weights, SANA's velocity at t.
        """
        self.check_inputs(x, r, t, context)
        mask = None if context_mask is None else context_mask.to(x.dtype)  # diffusers turns it into a bias
        return self.transformer(
            x,
            encoder_hidden_states=context,
            timestep=t * self.time_scale,
            guidance=(t - r) * self.time_scale,
            encoder_attention_mask=mask,
            return_dict=False,
        )[0]
