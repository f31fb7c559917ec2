"""The pooling a sentence-transformers model declares, and pooling token features that way.

A sentence-transformers folder lists its modules in ``modules.json``; the ``...models.Pooling`` entry names a
folder (usually ``1_Pooling``) whose ``config.json`` says how token states become one sentence vector:
``pooling_mode_mean_tokens`` (all-MiniLM-L6-v2), ``pooling_mode_cls_token`` (many retrieval models), ``max``,
``mean_sqrt_len`` or ``lasttoken``. Pooling the way the model was trained gives the vector it was trained
to make; a model without these files (a plain BERT) is mean-pooled.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from emf_lightning.utils.model_helpers import masked_mean

POOLING_MODES = ("mean", "cls", "max", "mean_sqrt_len", "last")
# config.json flags (sentence-transformers' Pooling.get_config_dict) -> our names
_FLAGS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "last",
}
# The string form sentence-transformers' Pooling(pooling_mode=...) accepts -> our names
_NAMES = {
    "mean": "mean",
    "cls": "cls",
    "max": "max",
    "mean_sqrt_len_tokens": "mean_sqrt_len",
    "weightedmean": "weightedmean",
    "lasttoken": "last",
}


def _read_json(source: str, name: str) -> Any | None:
    """``name`` inside ``source`` (a local folder, or a model id in the Hugging Face cache) as JSON, or None."""
    folder = Path(source).expanduser()
    if folder.is_dir():
        path = folder / name
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    from emf_lightning.utils.hub import cached_file

    found = cached_file(source, name)
    return json.loads(Path(found).read_text(encoding="utf-8")) if found else None


def pooling_from_config(config: dict[str, Any], where: str) -> str:
    """Our pooling name for a sentence-transformers Pooling ``config.json``; a clear error for what the
    encoder cannot do (several modes concatenated, weighted mean)."""
    mode = config.get("pooling_mode")
    modes = (
        [_NAMES.get(mode, mode)] if isinstance(mode, str) else [name for key, name in _FLAGS.items() if config.get(key)]
    )
    if len(modes) != 1:
        raise ValueError(
            f"{where} declares pooling {modes or 'none'}; SentenceEncoder pools one way, "
            f"one of {', '.join(POOLING_MODES)} (pass pooling=... to choose)"
        )
    if modes[0] not in POOLING_MODES:
        raise ValueError(
            f"{where} declares pooling {modes[0]!r}, which SentenceEncoder does not implement; "
            f"pass pooling= one of {', '.join(POOLING_MODES)}"
        )
    return modes[0]


def declared_pooling(source: str) -> str | None:
    """The pooling the model at ``source`` declares (``modules.json`` -> its Pooling module's ``config.json``),
    or None when it declares none (no ``modules.json``, or no Pooling module in it)."""
    modules = _read_json(source, "modules.json")
    if not isinstance(modules, list):
        return None
    entry = next((m for m in modules if str(m.get("type", "")).endswith("models.Pooling")), None)
    if entry is None:
        return None
    name = f"{entry.get('path') or ''}/config.json".lstrip("/")
    config = _read_json(source, name)
    if not isinstance(config, dict):
        raise ValueError(
            f"{source}: modules.json names a Pooling module but {name} is missing or not a JSON "
            "object; restore it or pass pooling=..."
        )
    return pooling_from_config(config, f"{source}/{name}")


def pool_tokens(tokens: Tensor, mask: Tensor, mode: str) -> Tensor:
    """Pool packed token features ``[B, L, D]`` (real tokens first, ``mask`` [B, L]) -> ``[B, D]``."""
    if mode == "mean":
        return masked_mean(tokens, mask)
    if mode == "cls":  # the first real token: [CLS] for BERT-style tokenizers
        return tokens[:, 0]
    if mode == "max":
        return tokens.masked_fill(~mask.unsqueeze(-1), -math.inf).amax(dim=1)
    count = mask.sum(dim=1)
    if mode == "mean_sqrt_len":
        return (tokens * mask.unsqueeze(-1)).sum(dim=1) / count.clamp(min=1).unsqueeze(-1).to(tokens.dtype).sqrt()
    if mode == "last":
        return tokens[torch.arange(tokens.shape[0], device=tokens.device), count - 1]
    raise ValueError(f"unknown pooling {mode!r}; choose one of {', '.join(POOLING_MODES)}")
