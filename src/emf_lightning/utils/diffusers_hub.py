"""Offline loading of diffusers models (VAEs, transformers): a local folder or the HF cache, never a download.

The text encoders' rule (`encoders/hub.py`) for diffusers repositories, whose weights are named
`diffusion_pytorch_model.*` and often sit in a subfolder (`vae/`, `transformer/`) of a pipeline repository.
`locate_diffusers` decides *before* loading whether config and weights are here, so a missing model raises a
`MissingWeightsError` naming the id, the subfolder and every place looked in.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from emf_lightning.encoders.hub import _cached_file
from emf_lightning.utils.weights import MissingWeightsError, hf_cache_dir

WEIGHT_STEM = "diffusion_pytorch_model"


def weight_files(variant: str | None = None) -> tuple[str, ...]:
    """File names any one of which, next to config.json, means the weights are present."""
    if variant:
        return (
            f"{WEIGHT_STEM}.{variant}.safetensors",
            f"{WEIGHT_STEM}.safetensors.index.{variant}.json",
            f"{WEIGHT_STEM}.{variant}.bin",
            f"{WEIGHT_STEM}.bin.index.{variant}.json",
        )
    return (
        f"{WEIGHT_STEM}.safetensors",
        f"{WEIGHT_STEM}.safetensors.index.json",
        f"{WEIGHT_STEM}.bin",
        f"{WEIGHT_STEM}.bin.index.json",
    )


def _folder_complete(folder: Path, variant: str | None) -> bool:
    return (folder / "config.json").is_file() and any((folder / f).is_file() for f in weight_files(variant))


def _in_repo(subfolder: str | None, filename: str) -> str:
    return f"{subfolder.strip('/')}/{filename}" if subfolder else filename


def _local_folder(path: Path, subfolder: str | None) -> tuple[Path, str | None]:
    """(folder holding config.json, subfolder to pass on): `path/subfolder` when it exists, else `path` itself
    (so both a pipeline folder and the component folder work)."""
    if subfolder and (path / subfolder).is_dir():
        return path, subfolder
    return path, None


def diffusers_weights_available(model: str, subfolder: str | None = None, variant: str | None = None) -> bool:
    """True when `model` (local folder or HF id, optionally its `subfolder`) has a config and weights here."""
    path = Path(model).expanduser()
    if path.is_dir():
        root, sub = _local_folder(path, subfolder)
        return _folder_complete(root / sub if sub else root, variant)
    if _cached_file(model, _in_repo(subfolder, "config.json")) is None:
        return False
    return any(_cached_file(model, _in_repo(subfolder, f)) is not None for f in weight_files(variant))


def locate_diffusers(model: str, subfolder: str | None = None, variant: str | None = None) -> tuple[str, str | None]:
    """(what to pass to `from_pretrained`, subfolder) for a local folder or a cached HF id; else MissingWeightsError.

    A local folder may be the pipeline folder (with `subfolder` inside) or the component folder itself.
    """
    path = Path(model).expanduser()
    needed = "config.json plus one of " + ", ".join(weight_files(variant))
    if path.is_dir():
        root, sub = _local_folder(path, subfolder)
        folder = root / sub if sub else root
        if not _folder_complete(folder, variant):
            raise MissingWeightsError(model, str(folder), hint=f"The folder needs {needed}.")
        return str(root), sub
    if diffusers_weights_available(model, subfolder, variant):
        return model, subfolder
    looked = [str(hf_cache_dir())]
    if path.is_absolute() or model.startswith((".", "~")):
        looked.insert(0, str(path))
    where = f" in its '{subfolder}' subfolder" if subfolder else ""
    raise MissingWeightsError(model, looked, hint=f"Needed: {needed}{where}.")


def load_diffusers(
    cls: Any, model: str, subfolder: str | None = None, variant: str | None = None, **kwargs: Any
) -> Any:
    """`cls.from_pretrained(...)` offline for `model` (see `locate_diffusers`); missing files -> MissingWeightsError."""
    source, sub = locate_diffusers(model, subfolder, variant)
    try:
        return cls.from_pretrained(source, subfolder=sub, variant=variant, local_files_only=True, **kwargs)
    except OSError as err:  # diffusers raises OSError (EnvironmentError) for files it cannot find
        raise MissingWeightsError(model, [source, str(hf_cache_dir())], hint=f"({err})") from err


def load_diffusers_config(cls: Any, model: str, subfolder: str | None = None) -> dict[str, Any]:
    """The config dict of `model` (only config.json is needed), offline; a missing file -> MissingWeightsError."""
    path = Path(model).expanduser()
    source, sub = model, subfolder
    if path.is_dir():
        root, sub = _local_folder(path, subfolder)
        source = str(root)
    try:
        config = cls.load_config(source, subfolder=sub, local_files_only=True)
    except OSError as err:
        where = f" in its '{subfolder}' subfolder" if subfolder else ""
        raise MissingWeightsError(model, [source, str(hf_cache_dir())], hint=f"No config.json{where} ({err}).") from err
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}
