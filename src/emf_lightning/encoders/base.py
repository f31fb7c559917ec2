"""The text-encoder protocol: `TextFeatures` and the frozen `TextEncoder` base class.

Every encoder returns token features right-packed (real tokens first, then exact zeros), a boolean mask and
a pooled vector. Subclasses implement `_encode_batch`; the base class does input checks, chunking into
`batch_size`, the truncation warning, freezing and the float32 output convention.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn as nn
from torch import Tensor

from emf_lightning.utils.model_helpers import resolve_dtype
from emf_lightning.utils.specs import RecordsInitArgs


class CaptionTruncationWarning(UserWarning):
    """Some captions were longer than the encoder's `max_length` and were cut."""


@dataclass
class TextFeatures:
    """Encoded captions.

    tokens: [B, L, D] float; positions where `mask` is False are exactly zero.
    mask:   [B, L] bool, True = real token; every row has at least one True.
    pooled: [B, D] float (mean over the mask, or the encoder's own pooled output, e.g. CLIP EOT).
    """

    tokens: Tensor
    mask: Tensor
    pooled: Tensor

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def dim(self) -> int:
        """Feature width D."""
        return self.tokens.shape[-1]

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> TextFeatures:
        """Move to a device and/or cast the float tensors (the mask stays bool)."""
        return TextFeatures(
            tokens=self.tokens.to(device=device, dtype=dtype),
            mask=self.mask.to(device=device),
            pooled=self.pooled.to(device=device, dtype=dtype),
        )

    def lengths(self) -> Tensor:
        """Number of real tokens per row, [B] long."""
        return self.mask.sum(dim=1)

    def validate(self) -> TextFeatures:
        """Check shapes, dtypes and the zero-padding invariant; return self so it can be chained."""
        if self.tokens.ndim != 3 or self.mask.ndim != 2 or self.pooled.ndim != 2:
            raise ValueError(
                f"TextFeatures needs tokens [B,L,D], mask [B,L], pooled [B,D]; got {tuple(self.tokens.shape)}, "
                f"{tuple(self.mask.shape)}, {tuple(self.pooled.shape)}"
            )
        b, length, d = self.tokens.shape
        if tuple(self.mask.shape) != (b, length) or tuple(self.pooled.shape) != (b, d):
            raise ValueError(
                f"TextFeatures shapes disagree: tokens {tuple(self.tokens.shape)}, mask {tuple(self.mask.shape)}, "
                f"pooled {tuple(self.pooled.shape)}"
            )
        if self.mask.dtype != torch.bool:
            raise ValueError(f"TextFeatures.mask must be bool, got {self.mask.dtype}")
        if not self.tokens.is_floating_point() or not self.pooled.is_floating_point():
            raise ValueError("TextFeatures.tokens and .pooled must be floating point")
        if b and not bool(self.mask.any(dim=1).all()):
            raise ValueError("every TextFeatures row needs at least one real token")
        if bool((self.tokens[~self.mask] != 0).any()):
            raise ValueError("TextFeatures.tokens must be exactly zero where mask is False")
        return self

    def row(self, i: int) -> TextFeatures:
        """Row `i` trimmed to its own length: tokens [1, l_i, D]."""
        n = int(self.mask[i].sum())
        return TextFeatures(self.tokens[i : i + 1, :n], self.mask[i : i + 1, :n], self.pooled[i : i + 1])

    @staticmethod
    def cat(parts: Sequence[TextFeatures]) -> TextFeatures:
        """Concatenate along the batch, right-padding every part to the longest sequence with zeros."""
        if not parts:
            raise ValueError("TextFeatures.cat needs at least one part")
        length = max(p.tokens.shape[1] for p in parts)
        tokens, masks = [], []
        for p in parts:
            pad = length - p.tokens.shape[1]
            tokens.append(nn.functional.pad(p.tokens, (0, 0, 0, pad)))
            masks.append(nn.functional.pad(p.mask, (0, pad), value=False))
        return TextFeatures(torch.cat(tokens), torch.cat(masks), torch.cat([p.pooled for p in parts]))


def pack_tokens(hidden: Tensor, keep: Tensor) -> tuple[Tensor, Tensor]:
    """Move the kept positions of each row to the front, in order; zero the rest.

    hidden [B, T, D], keep [B, T] bool -> tokens [B, L, D], mask [B, L] with L = max kept count.
    Works for left padding, right padding and for keeping only a span (e.g. the caption inside a
    prompt template). Padding rows may hold garbage (even NaN from fully masked attention rows): we
    select with `where`, never multiply, so it cannot leak.
    """
    counts = keep.sum(dim=1)
    if bool((counts == 0).any()):
        raise ValueError("a caption produced no tokens to keep (was it truncated away entirely?)")
    length = int(counts.max())
    # A stable sort on "not kept" lists kept positions first, in their original order.
    order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices[:, :length]
    gathered = torch.gather(hidden, 1, order.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
    mask = torch.arange(length, device=hidden.device).unsqueeze(0) < counts.unsqueeze(1)
    tokens = torch.where(mask.unsqueeze(-1), gathered, torch.zeros((), dtype=hidden.dtype, device=hidden.device))
    return tokens, mask


def check_captions(captions: Any) -> list[str]:
    """Validate a caption list; the empty caption is the null condition and must not reach an encoder."""
    if isinstance(captions, str) or not isinstance(captions, (list, tuple)):
        raise TypeError(f"encode() takes a list of captions, got {type(captions).__name__}")
    out = list(captions)
    for i, caption in enumerate(out):
        if not isinstance(caption, str):
            raise TypeError(f"caption {i} is {type(caption).__name__}, not str")
        if caption == "":
            raise ValueError(
                f"caption {i} is empty: the empty caption is the null condition; use emf_lightning.meanflow.null_condition "
                "instead of encoding it"
            )
    return out


class TextEncoder(RecordsInitArgs, nn.Module):
    """A frozen text encoder: `encode(list[str]) -> TextFeatures`.

    Subclasses set `name`, implement `_encode_batch` (returning features and the number of captions cut
    at `max_length`), `dim` and `_key_parts`. Parameters never require grad and the module stays in eval
    mode even when a parent calls `.train()`. Features are returned as float32 on the encoder's device,
    whatever dtype the model computes in, so cached and fresh features are interchangeable. The constructor
    arguments are recorded in `init_args` (`utils.specs`): checkpoints keep them instead of the weights.
    """

    name: ClassVar[str] = ""

    def __init__(
        self,
        batch_size: int = 64,
        max_length: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
    ):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if max_length is not None and max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        self.batch_size = int(batch_size)
        self.max_length = max_length
        self.compute_dtype = resolve_dtype(dtype)
        self._init_device = torch.device(device) if device is not None else None

    # -- subclass interface -------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        """Feature width D."""
        raise NotImplementedError

    def _key_parts(self) -> list[str]:
        """What determines the features besides the class: model id, layer, template, max_length..."""
        raise NotImplementedError

    def _encode_batch(self, captions: list[str]) -> tuple[TextFeatures, int]:
        """Encode one chunk (at most `batch_size` captions); return features and how many were truncated."""
        raise NotImplementedError

    @classmethod
    def weights_available(cls, **kwargs: Any) -> bool:
        """Whether the weights this encoder would load with `kwargs` are on this machine (loads nothing)."""
        return True

    # -- shared machinery -----------------------------------------------------------------------------
    @property
    def cache_key(self) -> str:
        """Stable across processes: registry name plus everything that changes the features."""
        return ":".join([self.name or type(self).__name__, *self._key_parts()])

    @property
    def device(self) -> torch.device:
        """Where the model lives (and where features are returned)."""
        for tensor in self.parameters():
            return tensor.device
        for tensor in self.buffers():
            return tensor.device
        return self._init_device or torch.device("cpu")

    def _finish_init(self) -> None:
        """Freeze, move to the requested device/dtype. Subclasses call this at the end of __init__."""
        self.requires_grad_(False)
        if self._init_device is not None or self.compute_dtype != torch.float32:
            self.to(device=self._init_device)
            for module in self.children():
                module.to(dtype=self.compute_dtype)
        self.eval()

    def train(self, mode: bool = True) -> TextEncoder:
        """Always stays in eval mode: the encoder is frozen (no dropout), whatever the parent does."""
        return super().train(False)

    def encode(self, captions: list[str]) -> TextFeatures:
        """Encode captions in chunks of `batch_size`; right-padded to the longest caption of the call."""
        captions = check_captions(captions)
        if not captions:
            raise ValueError("encode() got an empty caption list")
        # Chunks of similar length waste less compute on padding; results go back in the caller's order.
        order = (
            sorted(range(len(captions)), key=lambda i: len(captions[i])) if len(captions) > self.batch_size else None
        )
        ordered = [captions[i] for i in order] if order else captions
        parts, truncated = [], 0
        with torch.no_grad():
            for start in range(0, len(ordered), self.batch_size):
                features, cut = self._encode_batch(ordered[start : start + self.batch_size])
                parts.append(features.to(dtype=torch.float32))
                truncated += cut
        if truncated:
            warnings.warn(
                f"{self.name} encoder: {truncated} of {len(captions)} captions were truncated to "
                f"max_length={self.max_length} tokens",
                CaptionTruncationWarning,
                stacklevel=2,
            )
        if len(parts) == 1:
            return parts[0]
        out = TextFeatures.cat(parts)
        inverse = torch.empty(len(order), dtype=torch.long)
        inverse[torch.tensor(order)] = torch.arange(len(order))
        inverse = inverse.to(out.tokens.device)
        return TextFeatures(out.tokens[inverse], out.mask[inverse], out.pooled[inverse])

    def forward(self, captions: list[str]) -> TextFeatures:
        """Same as `encode`."""
        return self.encode(captions)

    def extra_repr(self) -> str:
        return f"cache_key={self.cache_key!r}, dim={self.dim}"
