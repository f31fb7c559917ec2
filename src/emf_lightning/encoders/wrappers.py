"""Encoders around an encoder: case and punctuation normalisation (``NormalizedEncoder``) and the pooled
sentence vector as an extra token (``PooledTokenEncoder``), on a shared ``WrappedEncoder``. Both are off unless a
config wraps its encoder.

``NormalizedEncoder``.

A prompt typed as "A RED CIRCLE!" and the training grammar's "a red circle" differ only in case and
punctuation, yet an LLM tokenises them into different tokens with different hidden states, and a one-step
generator follows the surface form (README, "Prompts as users write them"). This wrapper maps every caption
to lower case, turns punctuation into spaces and collapses whitespace before the wrapped encoder sees it;
hyphens and apostrophes inside words stay ("three-sided", "it's"). Words, their order and their number are
never changed.

    encoder:
      class_path: emf_lightning.encoders.NormalizedEncoder
      init_args:
        encoder: {class_path: emf_lightning.encoders.LLMEncoder, init_args: {model: smollm2}}
"""

from __future__ import annotations

import re

import torch

from emf_lightning.encoders.base import TextEncoder, TextFeatures

_PUNCTUATION = re.compile(r"[^\w\s'-]+|(?<!\w)['-]|['-](?!\w)")
_SPACES = re.compile(r"\s+")


def normalize_caption(caption: str, lowercase: bool = True, punctuation: bool = True) -> str:
    """The caption in lower case, punctuation replaced by spaces, whitespace collapsed (each step optional).

    A caption made only of punctuation keeps its original text: the empty caption is the null condition.
    """
    out = caption.lower() if lowercase else caption
    if punctuation:
        out = _PUNCTUATION.sub(" ", out)
    out = _SPACES.sub(" ", out).strip()
    return out or caption


class WrappedEncoder(TextEncoder):
    """An encoder around ``encoder``: batch size, length limit, width and device are the wrapped encoder's, and
    its cache key is part of this one's. ``encoder`` is an instance or its ``{class_path, init_args}`` spec (as a
    checkpoint stores it). Subclasses change the captions or the features in ``_encode_batch``."""

    def __init__(self, encoder: TextEncoder | dict):
        from emf_lightning.utils.specs import build

        encoder = build(encoder, TextEncoder)
        super().__init__(batch_size=encoder.batch_size, max_length=encoder.max_length)
        self.encoder = encoder

    @property
    def dim(self) -> int:
        return self.encoder.dim

    @property
    def device(self) -> torch.device:
        return self.encoder.device

    @classmethod
    def weights_available(cls, **kwargs) -> bool:
        """The wrapped encoder's answer: an instance has its weights; a spec asks its class with its init_args."""
        from emf_lightning.utils.specs import import_class

        inner = kwargs.get("encoder")
        if isinstance(inner, dict) and "class_path" in inner:
            return import_class(inner["class_path"]).weights_available(**inner.get("init_args", {}))
        return True

    def _key_parts(self) -> list[str]:
        return [f"({self.encoder.cache_key})"]


class NormalizedEncoder(WrappedEncoder):
    """``encoder`` behind :func:`normalize_caption`.

    Args:
        encoder: the text encoder to wrap (frozen like any other).
        lowercase: map captions to lower case.
        punctuation: replace punctuation by spaces (hyphens and apostrophes inside words stay).
    """

    name = "normalized"

    def __init__(self, encoder: TextEncoder | dict, lowercase: bool = True, punctuation: bool = True):
        super().__init__(encoder)
        self.lowercase, self.punctuation = bool(lowercase), bool(punctuation)
        self._finish_init()

    def _key_parts(self) -> list[str]:
        return [f"lower{int(self.lowercase)}", f"punct{int(self.punctuation)}", *super()._key_parts()]

    def _encode_batch(self, captions: list[str]) -> tuple[TextFeatures, int]:
        normalized = [normalize_caption(c, self.lowercase, self.punctuation) for c in captions]
        return self.encoder._encode_batch(normalized)


class PooledTokenEncoder(WrappedEncoder):
    """``encoder``'s pooled vector (a sentence encoder's sentence embedding, an LLM's mean state) put in front of
    its tokens as one more token: the generator's cross-attention and pooled conditioning then read the
    encoder's own summary of the caption, which for a sentence encoder is the representation trained to
    match paraphrases, beside the token states.

    Args:
        encoder: the text encoder to wrap.
        keep_tokens: False conditions on the pooled vector alone (one token per caption): pooled rather than
            token-level conditioning, for an encoder whose pooled summary is its best representation.
    """

    name = "pooled-token"

    def __init__(self, encoder: TextEncoder | dict, keep_tokens: bool = True):
        super().__init__(encoder)
        self.keep_tokens = bool(keep_tokens)
        self._finish_init()

    def _key_parts(self) -> list[str]:
        # The key of the default (tokens kept) is unchanged, so existing feature caches stay valid.
        return ([] if self.keep_tokens else ["pooled-only"]) + super()._key_parts()

    def _encode_batch(self, captions: list[str]) -> tuple[TextFeatures, int]:
        feats, truncated = self.encoder._encode_batch(captions)
        pooled_token = feats.pooled[:, None].to(feats.tokens.dtype)
        if not self.keep_tokens:
            return TextFeatures(pooled_token, torch.ones_like(feats.mask[:, :1]), feats.pooled), truncated
        tokens = torch.cat([pooled_token, feats.tokens], dim=1)
        mask = torch.cat([torch.ones_like(feats.mask[:, :1]), feats.mask], dim=1)
        return TextFeatures(tokens, mask, feats.pooled), truncated
