"""Frozen autoencoders between images and the latent space a generator trains in, and a registry.

    ae = build_autoencoder("dc-ae-f32")            # SANA's DC-AE from the HF cache, offline
    z = ae.encode(images)                          # [-1, 1] [B, 3, 1024, 1024] -> [B, 32, 32, 32], scaled
    images = ae.decode(z)

Registry names: none (pixel space), sd-vae, flux-vae, dc-ae-f32. `build_autoencoder` also takes a
{class_path, init_args} or {name, ...} dict, a class path, or a local folder / cached HF id whose config.json
names the diffusers class (a pipeline folder: its `vae/` subfolder).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from emf_lightning.autoencoders.base import IdentityAutoencoder, LatentAutoencoder
from emf_lightning.autoencoders.diffusers_vae import DCAutoencoder, DiffusersAutoencoder, KLAutoencoder
from emf_lightning.utils.specs import resolve_class

# name -> (class, default constructor arguments)
AUTOENCODERS: dict[str, tuple[type[LatentAutoencoder], dict[str, Any]]] = {
    "none": (IdentityAutoencoder, {}),
    "sd-vae": (KLAutoencoder, {"model": "stabilityai/sd-vae-ft-ema"}),
    "flux-vae": (KLAutoencoder, {"model": "black-forest-labs/FLUX.1-dev", "subfolder": "vae"}),
    "dc-ae-f32": (DCAutoencoder, {"model": "mit-han-lab/dc-ae-f32c32-sana-1.1-diffusers"}),
}
# diffusers' `_class_name` in a VAE's config.json -> our class
DIFFUSERS_CLASSES: dict[str, type[DiffusersAutoencoder]] = {
    "AutoencoderKL": KLAutoencoder,
    "AutoencoderDC": DCAutoencoder,
}


def _config_class_name(model: str) -> tuple[str | None, str | None]:
    """(`_class_name` of the VAE config, subfolder) for a local folder or a cached HF id; (None, None) if absent.
    A pipeline (model_index.json) keeps its VAE in `vae/`."""
    from emf_lightning.utils.hub import cached_file

    path = Path(model).expanduser()
    other = None  # a config.json that names some other class
    for sub in (None, "vae"):
        if path.is_dir():
            found = path / sub / "config.json" if sub else path / "config.json"
            config = str(found) if found.is_file() else None
        else:
            config = cached_file(model, f"{sub}/config.json" if sub else "config.json")
        if config is not None:
            name = json.loads(Path(config).read_text()).get("_class_name")
            if name in DIFFUSERS_CLASSES:
                return name, sub
            other = other or str(name)
    return other, None


def build_autoencoder(
    spec: str | dict[str, Any] | LatentAutoencoder | None = None, **overrides: Any
) -> LatentAutoencoder:
    """Build an autoencoder from a registry name, a config dict, a class path or a model folder / HF id.

    `overrides` go to the constructor on top of the spec's arguments (e.g. device="cuda", pretrained=False).
    None means "none" (pixel space).
    """
    if isinstance(spec, LatentAutoencoder):
        if overrides:
            raise ValueError("build_autoencoder got an autoencoder instance and constructor overrides")
        return spec
    if spec is None:
        spec = "none"
    if isinstance(spec, dict):
        spec = dict(spec)
        if "class_path" in spec:
            cls = resolve_class(spec["class_path"], LatentAutoencoder, {k: c for k, (c, _) in AUTOENCODERS.items()})
            return cls(**{**(spec.get("init_args") or {}), **overrides})
        if "name" in spec:
            return build_autoencoder(spec.pop("name"), **{**spec, **overrides})
        raise ValueError("autoencoder config needs 'class_path' (with optional 'init_args') or 'name'")
    name = str(spec)
    if name in AUTOENCODERS:
        cls, defaults = AUTOENCODERS[name]
        return cls(**{**defaults, **overrides})
    if "/" not in name and "." in name and not Path(name).expanduser().exists():
        return resolve_class(name, LatentAutoencoder)(**overrides)
    class_name, subfolder = _config_class_name(name)
    if class_name is None:
        from emf_lightning.utils.weights import MissingWeightsError, hf_cache_dir

        path = Path(name).expanduser()
        looked = [str(path)] if path.is_dir() or path.is_absolute() or name.startswith((".", "~")) else []
        looked.append(str(hf_cache_dir()))
        raise MissingWeightsError(
            name,
            looked,
            hint="No VAE config.json there (or in its vae/ subfolder). "
            f"Registered autoencoders: {', '.join(sorted(AUTOENCODERS))}.",
        )
    if class_name not in DIFFUSERS_CLASSES:
        from emf_lightning.errors import ConfigError

        raise ConfigError(
            f"the autoencoder {name} is not a VAE: its config.json names {class_name!r} (supported: "
            f"{', '.join(sorted(DIFFUSERS_CLASSES))}); point model.autoencoder (emf cache-latents: --vae) at the "
            "VAE's folder, or at a pipeline folder with a vae/ subfolder"
        )
    return DIFFUSERS_CLASSES[class_name](**{"model": name, "subfolder": subfolder, **overrides})


__all__ = [
    "AUTOENCODERS",
    "DCAutoencoder",
    "DiffusersAutoencoder",
    "IdentityAutoencoder",
    "KLAutoencoder",
    "LatentAutoencoder",
    "build_autoencoder",
]
