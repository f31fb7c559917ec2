"""Sampling images from a trained generator, and the exported model (``emf export``) that does only that.

``sample_images`` is the one path from captions to images, used by ``EMFModule.generate`` during training and
evaluation and by ``MeanFlowGenerator`` after export: encode the captions (``""`` = the null condition), draw
noise of the generator's shape from the seed (on the CPU: the same seed gives the same images on any device),
run the loss's sampler (MeanFlow's jumps or flow matching's Euler steps, optional classifier-free guidance) and
decode through the autoencoder (a clamp in pixel space).

An export folder holds no pickles:

    config.json          how to rebuild everything: encoder, backbone, loss (its sampler), autoencoder specs, and
                         whether the connector standardises the text features (its statistics are weights)
                         and how many token refiner blocks and slot tokens it has
    model.safetensors    the EMA generator's weights (connector + backbone, or the connector alone when the
                         backbone lives in its own folder)
    transformer/         diffusers backbones only: a folder diffusers loads (SanaTransformer2DModel.from_pretrained)
    README.md            the model card
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from emf_lightning.autoencoders import IdentityAutoencoder, LatentAutoencoder, build_autoencoder
from emf_lightning.encoders.base import TextEncoder, TextFeatures
from emf_lightning.errors import CheckpointError, require_finite
from emf_lightning.meanflow import Objective, encode_with_null, make_noise, null_condition
from emf_lightning.models.connector import connector_config
from emf_lightning.models.generator import Generator
from emf_lightning.models.layers import Backbone
from emf_lightning.utils.specs import build

EXPORT_FORMAT = "emf-lightning.generator"
EXPORT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


@torch.no_grad()
def sample_images(
    net: nn.Module,
    encode_text: Callable[[list[str]], TextFeatures],
    text_dim: int,
    loss: Objective,
    autoencoder: LatentAutoencoder,
    data_shape: Sequence[int],
    captions: Sequence[str],
    steps: int = 1,
    cfg_scale: float = 1.0,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Images [B, 3, H, W] in [-1, 1] for ``captions``; the same seed gives the same images."""
    captions = list(captions)
    if not captions:
        raise ValueError("sampling needs at least one caption, got an empty list")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    require_finite("cfg_scale", cfg_scale)
    was_training = net.training
    net.eval()
    try:
        feats = encode_text(captions)
        noise = make_noise((len(captions), *data_shape), int(seed), device=device)
        cond, null = sampling_conditions(net, feats, text_dim, cfg_scale, int(seed), device)
        x = loss.sampler(net, noise, cond, steps=steps, cfg_scale=cfg_scale, null_cond=null)
    finally:
        net.train(was_training)
    if next(autoencoder.parameters(), None) is not None:
        autoencoder.to(device)
    return autoencoder.decode(x.float())


# The layout's draws must not repeat the image noise's (the same seed would give the same first numbers).
LAYOUT_SEED_OFFSET = 0x5EED_1A70


def sampling_conditions(
    net: nn.Module,
    feats: TextFeatures,
    text_dim: int,
    cfg_scale: float,
    seed: int | Sequence[int],
    device: torch.device | str,
) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...] | None]:
    """The condition every sampling step gets, and the null condition when guidance needs one. A generator with a
    slot layout (``Generator.sampling_condition``) plans it once, before the first step, from ``seed`` (one for the
    batch, or one per row, as the served page draws its noise)."""
    plan = getattr(net, "sampling_condition", None)
    tokens, mask = feats.tokens, feats.mask
    if plan is None:  # a bare network (the bench's): text only
        cond: tuple[Tensor, ...] = (tokens, mask)
    elif isinstance(seed, int):
        cond = plan(tokens, mask, _layout_draws(seed))
    else:  # each row planned alone, as its noise is drawn
        rows = [plan(tokens[i : i + 1], mask[i : i + 1], _layout_draws(s)) for i, s in enumerate(seed)]
        cond = tuple(torch.cat(parts) for parts in zip(*rows))
    if cfg_scale == 1.0:
        return cond, None
    extra = net.empty_layout(1, device) if plan is not None else ()
    return cond, (*null_condition(1, text_dim, device=device), *extra)


def _layout_draws(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed) + LAYOUT_SEED_OFFSET)


class MeanFlowGenerator(nn.Module):
    """A trained text-to-image generator as ``emf export`` writes it: ``generate(captions) -> images``.

        model = MeanFlowGenerator.from_pretrained("exports/my-model")
        images = model.generate(["a red circle"], steps=1, seed=0)   # [1, 3, H, W] in [-1, 1]

    The text encoder and the autoencoder are rebuilt from their specs (their weights must be on this machine,
    as for training); the generator's weights come from the folder.
    """

    def __init__(
        self,
        generator: Generator,
        encoder: TextEncoder,
        loss: Objective,
        autoencoder: LatentAutoencoder | None = None,
        config: dict[str, Any] | None = None,
    ):
        super().__init__()
        self.generator = generator.eval().requires_grad_(False)
        self.encoder = encoder.eval().requires_grad_(False)
        self.autoencoder = autoencoder if autoencoder is not None else IdentityAutoencoder()
        self.loss = loss
        self.config = dict(config or {})

    @property
    def device(self) -> torch.device:
        return next(self.generator.parameters()).device

    @property
    def data_shape(self) -> tuple[int, int, int]:
        backbone = self.generator.backbone
        return (backbone.in_channels, *backbone.input_size)

    def encode_text(self, captions: list[str]) -> TextFeatures:
        return encode_with_null(captions, self.encoder.encode, self.encoder.dim, device=self.device)

    def generate(
        self, captions: Sequence[str], steps: int | None = None, cfg_scale: float | None = None, seed: int = 0
    ) -> Tensor:
        """Images [B, 3, H, W] in [-1, 1]; steps and cfg_scale default to the training run's sampling settings."""
        steps = int(steps if steps is not None else (self.config.get("sample_steps") or [1])[0])
        cfg_scale = float(cfg_scale if cfg_scale is not None else self.config.get("cfg_scale", 1.0))
        return sample_images(
            self.generator,
            self.encode_text,
            self.encoder.dim,
            self.loss,
            self.autoencoder,
            self.data_shape,
            captions,
            steps,
            cfg_scale,
            seed,
            self.device,
        )

    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        device: torch.device | str = "cpu",
        encoder: dict[str, Any] | TextEncoder | None = None,
        autoencoder: Any = None,
    ) -> MeanFlowGenerator:
        """Load an ``emf export`` folder (no pickles: JSON specs and safetensors).

        ``encoder`` and ``autoencoder`` replace the export's (a spec dict, an instance, or for the autoencoder a
        registry name or folder): the same models kept elsewhere on this machine. The encoder must give features of
        the width the generator was trained on.
        """
        from safetensors.torch import load_file

        directory = Path(directory)
        config_path = directory / CONFIG_FILE
        if not config_path.is_file():
            raise CheckpointError(f"{directory} is not an emf export: no {CONFIG_FILE} (write one with `emf export`)")
        config = json.loads(config_path.read_text())
        if config.get("format") != EXPORT_FORMAT or int(config.get("format_version", 0)) > EXPORT_VERSION:
            raise CheckpointError(
                f"{config_path} is not an emf-lightning generator export this version reads "
                f"(format {config.get('format')!r}, version {config.get('format_version')!r})"
            )
        backbone_spec = dict(config["backbone"])
        if config.get("backbone_folder"):  # the backbone loads from its own folder (a diffusers model)
            backbone_spec["init_args"] = {
                **backbone_spec.get("init_args", {}),
                "model": str(directory / config["backbone_folder"]),
            }
        encoder = build(config["encoder"] if encoder is None else encoder, TextEncoder)
        # The connector's standardisation statistics are buffers in the weights file; the flag says to expect them.
        generator = Generator.for_backbone(
            build(backbone_spec, Backbone),
            encoder.dim,
            **connector_config(config),
        )
        state = load_file(str(directory / WEIGHTS_FILE))
        missing, unexpected = generator.load_state_dict(state, strict=False)
        allowed_missing = [k for k in missing if config.get("backbone_folder") and k.startswith("backbone.")]
        if unexpected or set(missing) - set(allowed_missing):
            raise CheckpointError(
                f"{directory / WEIGHTS_FILE} does not fit the generator its config describes: "
                f"missing {sorted(set(missing) - set(allowed_missing))[:5]}, "
                f"unexpected {sorted(unexpected)[:5]}"
            )
        autoencoder = build_autoencoder(config.get("autoencoder") if autoencoder is None else autoencoder)
        model = cls(generator, encoder, build(config["loss"], Objective), autoencoder, config)
        return model.to(device)
