"""Errors and helpers for pretrained weights that may be absent on an offline machine."""

from __future__ import annotations

import os
from pathlib import Path


class MissingWeightsError(FileNotFoundError):
    """Pretrained weights are not on this machine. The message names the model and where we looked."""

    def __init__(self, model: str, looked_in: list[str] | str, hint: str = ""):
        places = [looked_in] if isinstance(looked_in, str) else list(looked_in)
        msg = (
            f"Pretrained weights for '{model}' were not found (offline). Looked in: "
            + ", ".join(places)
            + ". Download them on a machine with hub access (e.g. `huggingface-cli download "
            + f"{model}`) and copy the Hugging Face cache here, or pass a local path."
        )
        if hint:
            msg += " " + hint
        super().__init__(msg)
        self.model = model
        self.looked_in = places


def hf_cache_dir() -> Path:
    """Where huggingface_hub looks for cached models (honours HF_HUB_CACHE / HF_HOME)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME", os.path.join(os.path.expanduser("~"), ".cache", "huggingface"))
    return Path(home) / "hub"


def emf_cache_dir() -> Path:
    """emf-lightning's own cache (converted GGUF weights, text features, reference statistics)."""
    return Path(os.environ.get("EMF_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "emf-lightning")))
