"""Offline loading of Hugging Face models (text encoders, VAEs, transformers): a local folder or the HF cache only,
never a download.

`locate` decides *before* loading whether config and weights are here, so a missing model raises a
`MissingWeightsError` naming the id, the subfolder, the files needed and every place looked in, rather than a long
library traceback. transformers models name their weights `model.*` (`TRANSFORMERS_WEIGHTS`, the default);
diffusers ones `diffusion_pytorch_model.*` (`diffusers_weights(variant)`), often in a subfolder (`vae/`,
`transformer/`) of a pipeline repository.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from emf_lightning.utils.weights import MissingWeightsError, hf_cache_dir

log = logging.getLogger(__name__)

# Any one of these next to config.json means the weights are present.
TRANSFORMERS_WEIGHTS = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def diffusers_weights(variant: str | None = None) -> tuple[str, ...]:
    """A diffusers model's weight files, any one of which next to config.json means the weights are present."""
    stem = "diffusion_pytorch_model"
    if variant:
        return (
            f"{stem}.{variant}.safetensors",
            f"{stem}.safetensors.index.{variant}.json",
            f"{stem}.{variant}.bin",
            f"{stem}.bin.index.{variant}.json",
        )
    return (f"{stem}.safetensors", f"{stem}.safetensors.index.json", f"{stem}.bin", f"{stem}.bin.index.json")


def cached_file(repo_id: str, filename: str) -> str | None:
    """Path of `filename` from `repo_id` in the HF cache, or None (never touches the network)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, filename, cache_dir=str(hf_cache_dir()))
    except ValueError:  # not a valid repo id (e.g. a path that does not exist)
        return None
    return found if isinstance(found, str) else None


def _in_repo(subfolder: str | None, filename: str) -> str:
    return f"{subfolder.strip('/')}/{filename}" if subfolder else filename


def _local_folder(path: Path, subfolder: str | None) -> tuple[Path, str | None]:
    """(folder holding config.json, subfolder to pass on): `path/subfolder` when it exists, else `path` itself
    (so both a pipeline folder and the component folder work)."""
    if subfolder and (path / subfolder).is_dir():
        return path, subfolder
    return path, None


def _folder_complete(folder: Path, weights: tuple[str, ...]) -> bool:
    return (folder / "config.json").is_file() and any((folder / f).is_file() for f in weights)


def weights_available(
    model: str, subfolder: str | None = None, weights: tuple[str, ...] = TRANSFORMERS_WEIGHTS
) -> bool:
    """True when `model` (local folder or HF id, optionally its `subfolder`) has a config and weights here."""
    path = Path(model).expanduser()
    if path.is_dir():
        root, sub = _local_folder(path, subfolder)
        return _folder_complete(root / sub if sub else root, weights)
    if cached_file(model, _in_repo(subfolder, "config.json")) is None:
        return False
    return any(cached_file(model, _in_repo(subfolder, f)) is not None for f in weights)


def locate(
    model: str, subfolder: str | None = None, weights: tuple[str, ...] = TRANSFORMERS_WEIGHTS
) -> tuple[str, str | None]:
    """(what to pass to `from_pretrained`, subfolder) for a local folder or a cached HF id; else MissingWeightsError.

    A local folder may be the pipeline folder (with `subfolder` inside) or the component folder itself.
    """
    path = Path(model).expanduser()
    needed = "config.json plus one of " + ", ".join(weights)
    if path.is_dir():
        root, sub = _local_folder(path, subfolder)
        folder = root / sub if sub else root
        if not _folder_complete(folder, weights):
            raise MissingWeightsError(
                model, str(folder), hint=f"The folder has no config.json plus model weights: it needs {needed}."
            )
        return str(root), sub
    if weights_available(model, subfolder, weights):
        return model, subfolder
    looked = [str(hf_cache_dir())]
    if path.is_absolute() or model.startswith((".", "~")):
        looked.insert(0, str(path))
    where = f" in its '{subfolder}' subfolder" if subfolder else ""
    raise MissingWeightsError(model, looked, hint=f"Needed: {needed}{where}.")


def load(loader: Callable[..., Any], source: str, **kwargs: Any) -> Any:
    """`loader(source, local_files_only=True, **kwargs)` for a `source` from `locate`; a file the library cannot
    find (transformers and diffusers raise OSError) -> MissingWeightsError."""
    try:
        return loader(source, local_files_only=True, **kwargs)
    except OSError as err:
        raise MissingWeightsError(source, [source, str(hf_cache_dir())], hint=f"({err})") from err


def load_config(cls: Any, model: str, subfolder: str | None = None) -> dict[str, Any]:
    """The config dict of a diffusers `model` (only config.json is needed), offline; a missing file ->
    MissingWeightsError."""
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


def warn_random(model_name: str, what: str) -> None:
    """Log that a model runs on random weights (tests only); never silent."""
    log.warning("%s encoder built with RANDOM weights (%s, pretrained=False): for tests only", model_name, what)
