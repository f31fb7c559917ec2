"""Offline loading of Hugging Face models: local path or HF cache only, never a download.

`locate_pretrained` decides *before* loading whether the weights are here, so a missing model gives a
`MissingWeightsError` naming the id and the cache path rather than a long transformers traceback.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from emf_lightning.utils.weights import MissingWeightsError, hf_cache_dir

log = logging.getLogger(__name__)

# Any one of these next to config.json means the weights are present.
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def _cached_file(repo_id: str, filename: str) -> str | None:
    """Path of `filename` from `repo_id` in the HF cache, or None (never touches the network)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, filename, cache_dir=str(hf_cache_dir()))
    except ValueError:  # not a valid repo id (e.g. a path that does not exist)
        return None
    return found if isinstance(found, str) else None


def hf_weights_available(model: str) -> bool:
    """True when `model` (local folder or HF id) has a config and weights on this machine."""
    path = Path(model).expanduser()
    if path.is_dir():
        return (path / "config.json").is_file() and any((path / f).is_file() for f in WEIGHT_FILES)
    if _cached_file(model, "config.json") is None:
        return False
    return any(_cached_file(model, f) is not None for f in WEIGHT_FILES)


def locate_pretrained(model: str) -> str:
    """Return what to pass to `from_pretrained` (a folder or a cached HF id) or raise MissingWeightsError."""
    path = Path(model).expanduser()
    if path.is_dir():
        if not hf_weights_available(str(path)):
            raise MissingWeightsError(model, str(path), hint="The folder has no config.json plus model weights.")
        return str(path)
    if hf_weights_available(model):
        return model
    looked = [str(hf_cache_dir())]
    if path.is_absolute() or model.startswith((".", "~")):
        looked.insert(0, str(path))
    raise MissingWeightsError(model, looked)


def load_pretrained(loader: Callable[..., Any], model: str, **kwargs: Any) -> Any:
    """Call `loader(model, local_files_only=True, **kwargs)`, turning a missing file into MissingWeightsError."""
    try:
        return loader(model, local_files_only=True, **kwargs)
    except OSError as err:  # transformers raises OSError (EnvironmentError) for files it cannot find
        raise MissingWeightsError(model, [model, str(hf_cache_dir())], hint=f"({err})") from err


def warn_random(encoder_name: str, what: str) -> None:
    """Log that an encoder runs on random weights (tests only); never silent."""
    log.warning("%s encoder built with RANDOM weights (%s, pretrained=False): for tests only", encoder_name, what)
