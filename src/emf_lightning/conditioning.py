"""Text conditions as the generator sees them: token features, their mask, and the null condition.

The null condition (classifier-free guidance, condition dropout, the empty caption ``""``) is one all-zero
token that is attended to (mask True), as ``encoders.base.null_features``. Inside a padded batch a null row
is zeros everywhere with only position 0 unmasked; masked positions never contribute to cross-attention,
so that row gives the generator exactly the input of the length-1 null condition.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from emf_lightning.encoders.base import TextFeatures
from emf_lightning.encoders.base import null_tokens as null_condition  # (tokens, mask) for a batch

__all__ = ["encode_with_null", "null_condition"]


def encode_with_null(captions: Sequence[str], encode: Callable[[list[str]], TextFeatures], dim: int,
                     device: torch.device | str | None = None) -> TextFeatures:
    """Encode ``captions``; empty captions ``""`` become null rows and never reach ``encode``.

    Returns float32 features on ``device``, right-padded to the longest caption (at least length 1).
    """
    captions = list(captions)
    if not captions:
        raise ValueError("encode_with_null needs at least one caption, got an empty list")
    for i, c in enumerate(captions):
        if not isinstance(c, str):
            raise TypeError(f"caption {i} is {type(c).__name__}, expected str")
    real = [i for i, c in enumerate(captions) if c != ""]
    batch = len(captions)
    feats = encode([captions[i] for i in real]) if real else None
    length = max(1, feats.tokens.shape[1]) if feats is not None else 1
    tokens = torch.zeros(batch, length, dim, device=device, dtype=torch.float32)
    mask = torch.zeros(batch, length, device=device, dtype=torch.bool)
    mask[:, 0] = True  # null rows: one zero token, attended to
    pooled = torch.zeros(batch, dim, device=device, dtype=torch.float32)
    if feats is not None:
        if feats.tokens.shape[-1] != dim:
            raise ValueError(f"encoder returned features of dim {feats.tokens.shape[-1]}, expected {dim}")
        idx = torch.tensor(real, device=device, dtype=torch.long)
        n = feats.tokens.shape[1]
        tokens[idx, :n] = feats.tokens.to(device=device, dtype=torch.float32)
        mask[idx] = False
        mask[idx, :n] = feats.mask.to(device=device, dtype=torch.bool)
        pooled[idx] = feats.pooled.to(device=device, dtype=torch.float32)
    return TextFeatures(tokens=tokens, mask=mask, pooled=pooled)
