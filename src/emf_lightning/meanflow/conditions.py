"""Text conditions as the generator sees them: a tuple of batch-first tensors, and the null condition.

A condition is ``(text_tokens [B, L, D], text_mask [B, L] bool)``; the losses and samplers treat it as a
tuple of batch-first tensors and slice, pad and stack it together with the batch. The null condition
(classifier-free guidance, condition dropout, the empty caption ``""``) is one all-zero token that is attended
to (mask True). Inside a padded batch a null row is zeros everywhere with only position 0 unmasked; masked
positions never contribute to cross-attention, so that row gives the generator exactly the input of the
length-1 null condition.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from emf_lightning.encoders.base import TextFeatures

Cond = tuple[Tensor, ...]


def null_condition(
    batch_size: int, dim: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> Cond:
    """(tokens [B, 1, D] zeros, mask [B, 1] True): the one definition of the null condition."""
    tokens = torch.zeros(batch_size, 1, dim, device=device, dtype=dtype)
    mask = torch.ones(batch_size, 1, device=device, dtype=torch.bool)
    return tokens, mask


def null_features(like: TextFeatures) -> TextFeatures:
    """The null condition for ``like``'s batch as TextFeatures (pooled zero)."""
    tokens, mask = null_condition(like.tokens.shape[0], like.tokens.shape[-1], like.tokens.device, like.tokens.dtype)
    return TextFeatures(tokens=tokens, mask=mask, pooled=tokens[:, 0].clone())


def encode_with_null(
    captions: Sequence[str],
    encode: Callable[[list[str]], TextFeatures],
    dim: int,
    device: torch.device | str | None = None,
) -> TextFeatures:
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
    feats = encode([captions[i] for i in real]) if real else None
    length = max(1, feats.tokens.shape[1]) if feats is not None else 1
    tokens, mask = null_condition(len(captions), dim, device)
    tokens, mask = pad_dim1(tokens, length), pad_dim1(mask, length)
    pooled = torch.zeros(len(captions), dim, device=device, dtype=torch.float32)
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


def expand_rows(tensors: Cond, batch: int) -> Cond:
    """Broadcast batch-1 tensors (a shared null condition) to ``batch`` rows."""
    out = []
    for x in tensors:
        if x.shape[0] == batch:
            out.append(x)
        elif x.shape[0] == 1:
            out.append(x.expand(batch, *x.shape[1:]))
        else:
            raise ValueError(f"condition tensor has {x.shape[0]} rows, expected {batch} or 1")
    return tuple(out)


def pad_dim1(x: Tensor, length: int) -> Tensor:
    """Right-pad dim 1 with zeros (False for masks): padded text positions are masked out."""
    if x.shape[1] == length:
        return x
    pad = x.new_zeros((x.shape[0], length - x.shape[1], *x.shape[2:]))
    return torch.cat([x, pad], dim=1)


def _align(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Make two condition tensors concatenable: equal beyond dim 1, pad the shorter sequence dim."""
    if a.shape[1:] == b.shape[1:]:
        return a, b
    if a.ndim < 2 or a.ndim != b.ndim or a.shape[2:] != b.shape[2:]:
        raise ValueError(f"condition tensors of shapes {tuple(a.shape)} and {tuple(b.shape)} cannot be aligned")
    length = max(a.shape[1], b.shape[1])
    return pad_dim1(a, length), pad_dim1(b, length)


def _check_pair(cond: Cond, null_cond: Cond) -> None:
    if len(cond) != len(null_cond):
        raise ValueError(f"cond has {len(cond)} tensors but null_cond has {len(null_cond)}")


def merge_conditions(cond: Cond, null_cond: Cond, use_null: Tensor) -> Cond:
    """Per-sample choice between cond and null_cond (condition dropout). use_null: [B] bool."""
    _check_pair(cond, null_cond)
    batch = use_null.shape[0]
    out = []
    for c, n in zip(expand_rows(cond, batch), expand_rows(null_cond, batch), strict=True):
        c, n = _align(c, n)
        sel = use_null.to(c.device).view(batch, *([1] * (c.ndim - 1)))
        out.append(torch.where(sel, n, c))
    return tuple(out)


def concat_conditions(first: Cond, second: Cond) -> Cond:
    """Stack two conditions along the batch (for one forward over cond and null), padding sequences."""
    _check_pair(first, second)
    out = []
    for a, b in zip(first, second, strict=True):
        a, b = _align(a, b)
        out.append(torch.cat([a, b], dim=0))
    return tuple(out)


def take_rows(cond: Cond, index: Tensor) -> Cond:
    """The rows ``index`` of every condition tensor."""
    return tuple(c.index_select(0, index.to(c.device)) for c in cond)
