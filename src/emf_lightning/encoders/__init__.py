"""Frozen text encoders behind one interface, and a registry from short names to classes.

    enc = build_encoder("llm")                     # SmolLM2-135M-Instruct, offline
    feats = enc.encode(["a red circle left of a blue square"])   # TextFeatures(tokens, mask, pooled)

Registry names: llm, qwen3, t5, clip, minilm, bow, label, precomputed (features from a cache folder).
"""

from __future__ import annotations

from typing import Any

from emf_lightning.encoders.base import (
    CaptionTruncationWarning,
    TextEncoder,
    TextFeatures,
    pack_tokens,
)
from emf_lightning.encoders.bow import BagOfWordsEncoder
from emf_lightning.encoders.cache import FeatureCache
from emf_lightning.encoders.clip import CLIPTextEncoder
from emf_lightning.encoders.label import LabelEncoder
from emf_lightning.encoders.llm import EMF_PROMPT_TEMPLATE, LLMEncoder, Qwen3Encoder
from emf_lightning.encoders.precomputed import PrecomputedEncoder
from emf_lightning.encoders.sentence import SentenceEncoder
from emf_lightning.encoders.t5 import T5Encoder
from emf_lightning.encoders.wrappers import NormalizedEncoder, PooledTokenEncoder, normalize_caption
from emf_lightning.utils.model_helpers import masked_mean
from emf_lightning.utils.specs import resolve_class

ENCODERS: dict[str, type[TextEncoder]] = {
    "llm": LLMEncoder,
    "qwen3": Qwen3Encoder,
    "t5": T5Encoder,
    "clip": CLIPTextEncoder,
    "minilm": SentenceEncoder,
    "bow": BagOfWordsEncoder,
    "label": LabelEncoder,
    "precomputed": PrecomputedEncoder,
}


def encoder_class(name: str) -> type[TextEncoder]:
    """Registry name (e.g. "llm") or dotted class path (e.g. "emf_lightning.encoders.LLMEncoder") -> class."""
    return resolve_class(name, TextEncoder, ENCODERS, "text encoder")


def build_encoder(name: str, **kwargs: Any) -> TextEncoder:
    """Build an encoder by registry name or class path; kwargs go to its constructor."""
    return encoder_class(name)(**kwargs)


def build_encoder_from_config(config: dict[str, Any]) -> TextEncoder:
    """Build from a config dict: {"class_path": ..., "init_args": {...}} (as in LightningCLI YAML) or
    {"name": ..., **kwargs}."""
    config = dict(config)
    if "class_path" in config:
        return build_encoder(config["class_path"], **(config.get("init_args") or {}))
    if "name" in config:
        name = config.pop("name")
        return build_encoder(name, **config)
    raise ValueError("encoder config needs 'class_path' (with optional 'init_args') or 'name'")


__all__ = [
    "ENCODERS",
    "BagOfWordsEncoder",
    "CLIPTextEncoder",
    "CaptionTruncationWarning",
    "EMF_PROMPT_TEMPLATE",
    "FeatureCache",
    "LLMEncoder",
    "LabelEncoder",
    "NormalizedEncoder",
    "PooledTokenEncoder",
    "PrecomputedEncoder",
    "Qwen3Encoder",
    "SentenceEncoder",
    "T5Encoder",
    "TextEncoder",
    "TextFeatures",
    "build_encoder",
    "build_encoder_from_config",
    "encoder_class",
    "masked_mean",
    "normalize_caption",
    "pack_tokens",
]
