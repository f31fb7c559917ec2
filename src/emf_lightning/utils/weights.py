"""Errors and helpers for pretrained weights that may be absent on an offline machine."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


class MissingWeightsError(FileNotFoundError):
    """Pretrained weights are not on this machine. The message names the model and where we looked."""

    def __init__(self, model: str, looked_in: list[str] | str, hint: str = ""):
        places = [looked_in] if isinstance(looked_in, str) else list(looked_in)
        path = Path(model).expanduser()
        if looks_like_a_path(model) and not path.exists():
            # a folder the user named: a hub download hint would mislead
            msg = (
                f"Pretrained weights for '{model}' were not found: the folder {path.absolute()} does not exist "
                f"(a relative path is taken from the working directory, {Path.cwd()})."
            )
        else:
            msg = (
                f"Pretrained weights for '{model}' were not found (offline). Looked in: "
                + ", ".join(places)
                + f". Download them on a machine with hub access (e.g. `hf download {model}`) and copy the "
                "Hugging Face cache here, or pass a local path."
            )
            if hint:
                msg += " " + hint
        super().__init__(msg)
        self.model = model
        self.looked_in = places

    def naming_key(self, key: str) -> MissingWeightsError:
        """The same error, its message ending with the config key that names the model (what to override)."""
        self.args = (f"{self.args[0]} Set {key} to the folder that holds them.",)
        return self


@contextlib.contextmanager
def naming_the_key(key: str) -> Iterator[None]:
    """Missing weights met inside: the message names ``key``, the config key to point at a local folder."""
    try:
        yield
    except MissingWeightsError as err:
        err.naming_key(key)
        raise


def looks_like_a_path(model: str) -> bool:
    """A local path rather than a hub id (``org/name``): absolute, ``./``, ``../``, ``~`` or more than one ``/``."""
    return os.path.isabs(model) or model.startswith((".", "~")) or model.count("/") > 1


def hf_cache_dir() -> Path:
    """Where huggingface_hub looks for cached models (honours HF_HUB_CACHE / HF_HOME)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME", os.path.join(os.path.expanduser("~"), ".cache", "huggingface"))
    return Path(home) / "hub"


def emf_cache_dir() -> Path:
    """emf-lightning's own cache (converted GGUF weights, text features, reference statistics)."""
    return Path(os.environ.get("EMF_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "emf-lightning")))
