"""Reading one object out of one slot token: its colour, shape and size (each a vocabulary plus "no object") and
where it stands.

Two users. ``model.object_supervision`` trains the connector's free slot tokens through a training-only namer
(``EMFModule.slot_object_head``), so the slots learn to carry one object each. With
``model.named_slots`` the connector owns the namer and the backbone reads the slot's *name* instead of the slot:
the class probabilities and the place, mapped linearly to the context width. An object is then a sum of one
embedding per attribute, as in the composition study's oracle features, so a colour-shape pair never seen in
training is a new sum of parts the backbone has seen (docs/composition_2026-12-06.md).

The vocabulary is the shapes world's, the only data here with object annotations (``meta["objects"]``). Models sit
below the shapes world in the package layering, so this module keeps only the vocabulary sizes;
``training.object_supervision.ATTRIBUTES`` holds the words and refuses, at import, sizes that disagree.

Two namers. ``SlotNamer`` reads the slot alone. ``PointingNamer`` (``model.slot_pointer``) reads each attribute from
the caption's words slot k points at, and decides *which kind* of word to read (a colour word, a shape word) from
each word alone and *which object's* from k and the word's position only. A slot token mixes its object's words
non-linearly, and on training data where red is never a triangle a namer of the slot learns "red, so not a
triangle": unseen pairs were misnamed, and the one-step backbone draws what the name says. Letting the slot token
choose the words fails the same way (its choice goes astray on unseen pairs). Pointed at by word kind, slot index
and position alone, every one of which training shows in every combination, an unseen pair's words are read as
in training (docs/composition_2026-12-07.md, eleventh round).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import sincos_1d

# How many values each attribute a slot names can take (the shapes world's colours, shapes and sizes), in the order
# of ``training.object_supervision.ATTRIBUTES``; the namer adds one class to each for "no object".
ATTRIBUTE_SIZES: tuple[int, ...] = (8, 4, 2)


class _Namer(nn.Module):
    """What both namers share: the outputs' layout (per attribute its classes plus "no object", then the place)
    and the readings built on ``forward(slots, words, words_mask)``."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes = [n + 1 for n in ATTRIBUTE_SIZES]

    @property
    def name_width(self) -> int:
        """Width of :meth:`describe`'s output: every attribute's class probabilities, then x and y."""
        return sum(self.sizes) + 2

    def probabilities(
        self, slots: Tensor, words: Tensor | None = None, words_mask: Tensor | None = None
    ) -> list[Tensor]:
        """[probabilities [B, K, n_a + 1] per attribute] fp32, "no object" last."""
        logits, _ = self(slots, words, words_mask)
        return [t.softmax(-1) for t in logits]

    def describe(self, slots: Tensor, words: Tensor | None = None, words_mask: Tensor | None = None) -> Tensor:
        """[B, K, name_width] fp32: each attribute's class probabilities, then the place."""
        logits, place = self(slots, words, words_mask)
        return torch.cat([*(t.softmax(-1) for t in logits), place], dim=-1)


class SlotNamer(_Namer):
    """slots [B, K, D] -> logits per attribute (its vocabulary plus "no object") and the place (x, y) in [0, 1]."""

    def __init__(self, dim: int):
        super().__init__()
        self.classify = nn.Linear(dim, sum(self.sizes))
        self.place = nn.Linear(dim, 2)

    def forward(
        self, slots: Tensor, words: Tensor | None = None, words_mask: Tensor | None = None
    ) -> tuple[list[Tensor], Tensor]:
        """slots [B, K, D] (the caption's words are not read) -> ([logits [B, K, n_a + 1] per attribute], place
        [B, K, 2]), in fp32 under autocast too (a tiny head; its cross-entropy, matching costs and softmax want the
        precision)."""
        with torch.autocast(slots.device.type, enabled=False):
            slots = slots.float()
            return list(self.classify(slots).split(self.sizes, dim=-1)), torch.sigmoid(self.place(slots))


class PointingNamer(_Namer):
    """slots [B, K, D] and the caption's mapped words [B, L, D] -> the ``SlotNamer``'s outputs, each attribute's
    classes read from an attention-weighted mix of the words.

    The weight of word l for attribute a of slot k is softmax over l of ``kind_a(word_l) + which_k,a .
    position_a(l)``: how much the word looks like a word of that attribute (from the word alone), plus how well its
    position in the caption suits the k-th slot (a learned preference over positions, the first object's words
    for one slot, the last's for another: the slots become ordinal). "No object" adds a term read from the slot
    token, and the place is read from it: whether a slot holds an object, and where, is the slot token's business;
    what the object is, the words'. A row without real words (the null condition) reads them all.
    """

    def __init__(self, dim: int, slots: int, key_dim: int = 32, max_tokens: int = 1024):
        super().__init__()
        attributes = len(self.sizes)
        self.key_dim = key_dim
        self.word_kind = nn.Linear(dim, attributes)
        self.which_words = nn.Parameter(torch.randn(slots, attributes * key_dim))
        self.word_position = nn.Linear(dim, attributes * key_dim)
        self.classify = nn.ModuleList(nn.Linear(dim, n) for n in self.sizes)
        self.nothing = nn.Linear(dim, attributes)
        self.place = nn.Linear(dim, 2)
        # Fixed positions (as the slots' reader adds to the words), a buffer outside the state dict.
        self.register_buffer("positions", sincos_1d(torch.arange(max_tokens), dim).float(), persistent=False)

    def pointing(self, words: Tensor, words_mask: Tensor | None) -> Tensor:
        """[B, A, K, L] fp32: each slot's weights over the words, per attribute (rows sum to 1)."""
        n = words.shape[1]
        if n > self.positions.shape[0]:
            raise ValueError(f"the pointing namer takes at most {self.positions.shape[0]} text tokens, got {n}")
        a, d = len(self.sizes), self.key_dim
        kind = self.word_kind(words).transpose(1, 2)[:, :, None, :]  # [B, A, 1, L]: from each word alone
        position = self.word_position(self.positions[:n]).view(n, a, d)
        order = torch.einsum("kad,lad->akl", self.which_words.view(-1, a, d), position) / math.sqrt(d)  # [A, K, L]
        scores = kind + order[None]
        if words_mask is not None:
            readable = words_mask | ~words_mask.any(-1, keepdim=True)
            scores = scores.masked_fill(~readable[:, None, None, :], float("-inf"))
        return scores.softmax(-1)

    def forward(
        self, slots: Tensor, words: Tensor | None = None, words_mask: Tensor | None = None
    ) -> tuple[list[Tensor], Tensor]:
        """slots [B, K, D], words [B, L, D], words_mask [B, L] bool (True = a real word) or None -> ([logits
        [B, K, n_a + 1] per attribute], place [B, K, 2]), fp32 under autocast too."""
        if words is None:
            raise ValueError("the pointing namer reads the caption's words: pass words")
        if slots.shape[1] != self.which_words.shape[0]:
            raise ValueError(
                f"the pointing namer was built for {self.which_words.shape[0]} slots, got {slots.shape[1]}"
            )
        with torch.autocast(slots.device.type, enabled=False):
            slots, words = slots.float(), words.float()
            read = torch.einsum("bakl,bld->bkad", self.pointing(words, words_mask), words)
            nothing = self.nothing(slots)
            logits = [
                classify(read[:, :, a]) + F.pad(nothing[..., a : a + 1], (n - 1, 0))
                for a, (classify, n) in enumerate(zip(self.classify, self.sizes))
            ]
            return logits, torch.sigmoid(self.place(slots))
