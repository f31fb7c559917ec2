"""``emf fit --config X --dry-run``: what a run would build, from its config alone, without loading a weight.

The backbone is built on PyTorch's meta device (shapes and dtypes, no memory) from its real config: its own
init_args, or for a pretrained diffusers backbone the config.json next to its weights, or, when those are not on
the machine and the config names the default model, the published config in ``SANA_CONFIGS``. The text encoder is
a tiny random stand-in of the configured class (its width is the stand-in's, said so in the report), the
autoencoder's latent geometry comes from its registry entry or its config. The report gives the shapes from text to
latents to the backbone's output, the trainable parameter count, and an estimate of the memory per GPU for the
configured batch and precision; then the command stops.

The estimate is arithmetic, not a measurement: weights of the generator and its EMA copy, fp32 gradients and
AdamW's two moments of the trainable parameters, and the activations the forward pass saves for the backward
pass (counted by a saved-tensor hook on a meta-device forward of one micro-batch, at 2 bytes per element under
16-bit precision). The JVP of a MeanFlow step keeps no graph, so it adds no saved activations.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Any

import torch

log = logging.getLogger(__name__)

# Latent geometry (channels, downsampling factor) of the registered autoencoders, as their published configs
# give it: a dry run needs no weights to know the latent shape.
AUTOENCODER_GEOMETRY: dict[str, tuple[int, int]] = {
    "none": (3, 1),
    "sd-vae": (4, 8),
    "flux-vae": (16, 8),
    "dc-ae-f32": (32, 32),
}
GIB = 1024**3


class DryRunFinished(Exception):
    """Raised after the dry-run report: the command stops there (exit 0)."""


@dataclass
class DryRun:
    """What the dry run found: printable lines, plus the numbers tests check."""

    lines: list[str] = field(default_factory=list)
    text_shape: tuple[int, ...] = ()
    latent_shape: tuple[int, ...] = ()
    output_shape: tuple[int, ...] = ()
    backbone_class: str = ""
    trainable_parameters: int = 0
    total_parameters: int = 0
    memory_bytes: int = 0


def _plain(config: Any) -> Any:
    if hasattr(config, "as_dict"):
        config = config.as_dict()
    return copy.deepcopy(config)


def _stand_in_encoder(spec: dict[str, Any]) -> tuple[Any, str]:
    """The configured encoder class with random weights (``pretrained=False``) where it takes that argument."""
    import inspect

    from emf_lightning.encoders.base import TextEncoder
    from emf_lightning.utils.specs import build, import_class

    spec = _plain(spec)
    cls = import_class(spec["class_path"])
    init_args = dict(spec.get("init_args") or {})
    note = "configured"
    if "pretrained" in inspect.signature(cls.__init__).parameters:
        init_args["pretrained"] = False
        note = "tiny random stand-in, weights not loaded"
    return build({"class_path": spec["class_path"], "init_args": init_args}, TextEncoder), note


def _backbone_spec_without_weights(spec: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The backbone spec built from configs only: a diffusers backbone gets its real config (see module docstring)."""
    from emf_lightning.utils.specs import import_class

    spec = _plain(spec)
    init_args = dict(spec.get("init_args") or {})
    cls = import_class(spec["class_path"])
    if (
        not hasattr(cls, "default_model")
        or init_args.get("config") is not None
        or not init_args.get("pretrained", True)
    ):
        return spec, "from its init_args"
    from diffusers import SanaTransformer2DModel

    from emf_lightning.models.diffusers_adapter import SANA_CONFIGS
    from emf_lightning.utils.weights import MissingWeightsError

    model = init_args.get("model") or cls.default_model
    try:
        from emf_lightning.utils import hub

        config = hub.load_config(SanaTransformer2DModel, model, init_args.get("subfolder", "transformer"))
        source = f"config.json of {model}"
    except MissingWeightsError:
        if model != cls.default_model:
            raise
        config, source = SANA_CONFIGS["sana-1.6b"], f"the published config of {model} (SANA_CONFIGS['sana-1.6b'])"
    config = {k: v for k, v in config.items() if k != "guidance_embeds"}
    init_args.update(config=config, pretrained=False)
    return {"class_path": spec["class_path"], "init_args": init_args}, source


def _latent_geometry(spec: Any, image_size: int) -> tuple[int, int, str]:
    """(channels, factor, what it is) of the configured autoencoder, without loading its weights when avoidable."""
    from emf_lightning.autoencoders import build_autoencoder

    if spec is None or isinstance(spec, str) and spec in AUTOENCODER_GEOMETRY:
        name = spec or "none"
        channels, factor = AUTOENCODER_GEOMETRY[name]
        return channels, factor, name
    ae = build_autoencoder(_plain(spec))  # a folder or an explicit spec: its config says
    return ae.latent_channels, ae.downsample, ae.cache_key


def _saved_activation_elements(generator: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> int:
    """Elements the forward pass saves for backward (meta tensors: nothing is computed)."""
    total = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += tensor.numel()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        generator(*inputs)
    return total


def _precision_bytes(precision: Any) -> int:
    text = str(precision or "32")
    return 2 if text.startswith(("bf16", "16")) else 8 if text.startswith("64") else 4


def dry_run(config: Any) -> DryRun:
    """Build the run's model from ``config`` (the ``fit`` section: model, data, trainer) without weights and
    describe it (see the module docstring)."""
    from emf_lightning.models.connector import connector_config
    from emf_lightning.models.generator import Generator
    from emf_lightning.models.layers import Backbone
    from emf_lightning.utils.specs import build

    config = _plain(config)
    model, data, trainer = config.get("model") or {}, config.get("data") or {}, config.get("trainer") or {}
    report = DryRun()
    batch, image_size = int(data.get("batch_size", 1)), int(data.get("image_size", 0))
    encoder, encoder_note = _stand_in_encoder(model["encoder"])
    max_length = getattr(encoder, "max_length", None) or 77
    report.text_shape = (batch, int(max_length), int(encoder.dim))
    channels, factor, ae_name = _latent_geometry(model.get("autoencoder"), image_size)
    side = image_size // factor if image_size else None
    report.latent_shape = (batch, channels, side, side)
    backbone_spec, backbone_source = _backbone_spec_without_weights(model["backbone"])
    with torch.device("meta"):
        backbone = build(backbone_spec, Backbone)
        generator = Generator.for_backbone(backbone, encoder.dim, **connector_config(model))
    report.backbone_class = type(backbone).__name__
    want = (channels, side, side)
    have = (backbone.in_channels, *backbone.input_size)
    report.output_shape = (batch, *have)
    params = list(generator.parameters())
    report.total_parameters = sum(p.numel() for p in params)
    report.trainable_parameters = sum(p.numel() for p in params if p.requires_grad)
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    # generator + EMA copy, fp32 gradients and AdamW's two moments of the trainable parameters
    state = 2 * param_bytes + 3 * 4 * report.trainable_parameters
    accumulate = int(trainer.get("accumulate_grad_batches") or 1)
    activation_note = ""
    activations = 0
    try:
        inputs = (
            torch.zeros(batch, *have, device="meta"),
            torch.zeros(batch, device="meta"),
            torch.ones(batch, device="meta"),
            torch.zeros(*report.text_shape, device="meta"),
            torch.ones(batch, report.text_shape[1], dtype=torch.bool, device="meta"),
        )
        activations = _saved_activation_elements(generator.train(), inputs) * _precision_bytes(trainer.get("precision"))
    except Exception as err:  # noqa: BLE001 - an op without a meta kernel: the estimate says what it lacks
        activation_note = f" (activations not estimated: {type(err).__name__} on the meta device)"
    report.memory_bytes = state + activations
    lines = report.lines
    lines.append(f"dry run of emf fit: nothing loaded, nothing trained (precision {trainer.get('precision')})")
    lines.append(
        f"text       {type(encoder).__name__} ({encoder_note}): tokens [{batch}, <={max_length}, {encoder.dim}]"
    )
    lines.append(
        f"latents    {ae_name}: images [{batch}, 3, {image_size}, {image_size}] -> [{batch}, {channels}, {side}, {side}]"
    )
    lines.append(
        f"backbone   {report.backbone_class} ({backbone_source}): input [{batch}, {have[0]}, {have[1]}, {have[2]}] "
        f"-> u of the same shape; text [{batch}, L, {encoder.dim}] -> connector -> [{batch}, L, {backbone.context_dim}]"
    )
    if have != want:
        lines.append(
            f"MISMATCH   the backbone takes {have} but data.image_size={image_size} with {ae_name} gives {want}: "
            "set the backbone's input_size / in_channels or data.image_size"
        )
    lines.append(
        f"parameters {report.trainable_parameters:,} trainable of {report.total_parameters:,} in the generator "
        f"(+ an EMA copy)"
    )
    lines.append(
        f"memory     ~{report.memory_bytes / GIB:.1f} GiB per GPU for a micro-batch of {batch}"
        f" (x{accumulate} accumulated): weights + EMA {2 * param_bytes / GIB:.1f}, gradients and AdamW "
        f"{12 * report.trainable_parameters / GIB:.1f}, activations {activations / GIB:.1f}{activation_note}"
    )
    return report
