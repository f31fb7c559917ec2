"""Per-channel statistics of a frozen encoder's token features, and the standardisation that uses them.

docs/probe_results.md found SmolLM2's features dominated by two channels (means of 21 and 17 against a median
of 0.4): cosines between captions then mostly measure those channels. Z-scoring each channel over the real
tokens of the training captions removes that; ``TextConnector(standardize=True)`` applies it inside the
generator and ``emf probe --standardize`` scores the features it produces.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor

from emf_lightning.encoders.base import TextFeatures
from emf_lightning.utils.model_helpers import masked_mean, standardize_tokens

# A channel that barely varies is not scaled up by more than 1 / this times the median channel's std: such a
# channel carries no information about the caption, and dividing by ~0 would only amplify numerical noise.
MIN_STD_RATIO = 1e-2


def channel_statistics(batches: Iterable[TextFeatures], min_std_ratio: float = MIN_STD_RATIO) -> tuple[Tensor, Tensor]:
    """Mean and standard deviation [D] of every channel over the real tokens (``mask``) of all ``batches``.

    Accumulated in float64 (sums over many tokens); the std is the population std, floored at
    ``min_std_ratio`` times the median channel std (and a tiny absolute floor for all-constant features).
    """
    count, total, squares = 0, None, None
    for feats in batches:
        real = feats.tokens[feats.mask].double()
        if total is None:
            total = torch.zeros(real.shape[-1], dtype=torch.float64)
            squares = torch.zeros_like(total)
        count += real.shape[0]
        total += real.sum(0).cpu()
        squares += real.square().sum(0).cpu()
    if not count:
        raise ValueError("channel_statistics needs at least one real token")
    mean = total / count
    std = (squares / count - mean.square()).clamp(min=0).sqrt()
    floor = max(float(std.median()) * min_std_ratio, 1e-8)
    return mean.float(), std.clamp(min=floor).float()


def fit_channel_statistics(
    encode: Callable[[list[str]], TextFeatures], captions: Sequence[str], batch_size: int = 256
) -> tuple[Tensor, Tensor]:
    """``channel_statistics`` of ``encode``'s features for the unique ``captions`` (each caption counted once)."""
    unique = list(dict.fromkeys(captions))
    if not unique:
        raise ValueError("no captions to fit standardisation statistics on")
    return channel_statistics(encode(unique[i : i + batch_size]) for i in range(0, len(unique), batch_size))


def standardize_features(feats: TextFeatures, mean: Tensor, std: Tensor) -> TextFeatures:
    """The features as the generator sees them after standardisation; pooled = mean of the standardised tokens."""
    tokens = standardize_tokens(feats.tokens, mean, std)
    return TextFeatures(tokens, feats.mask, masked_mean(tokens, feats.mask))
