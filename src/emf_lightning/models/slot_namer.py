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
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

# How many values each attribute a slot names can take (the shapes world's colours, shapes and sizes), in the order
# of ``training.object_supervision.ATTRIBUTES``; the namer adds one class to each for "no object".
ATTRIBUTE_SIZES: tuple[int, ...] = (8, 4, 2)


class SlotNamer(nn.Module):
    """slots [B, K, D] -> logits per attribute (its vocabulary plus "no object") and the place (x, y) in [0, 1]."""

    def __init__(self, dim: int):
        super().__init__()
        self.sizes = [n + 1 for n in ATTRIBUTE_SIZES]
        self.classify = nn.Linear(dim, sum(self.sizes))
        self.place = nn.Linear(dim, 2)

    @property
    def name_width(self) -> int:
        """Width of :meth:`describe`'s output: every attribute's class probabilities, then x and y."""
        return sum(self.sizes) + 2

    def forward(self, slots: Tensor) -> tuple[list[Tensor], Tensor]:
        """slots [B, K, D] -> ([logits [B, K, n_a + 1] per attribute], place [B, K, 2]), in fp32 under autocast
        too (a tiny head; its cross-entropy, matching costs and softmax want the precision)."""
        with torch.autocast(slots.device.type, enabled=False):
            slots = slots.float()
            return list(self.classify(slots).split(self.sizes, dim=-1)), torch.sigmoid(self.place(slots))

    def probabilities(self, slots: Tensor) -> list[Tensor]:
        """slots [B, K, D] -> [probabilities [B, K, n_a + 1] per attribute] fp32, "no object" last."""
        logits, _ = self(slots)
        return [t.softmax(-1) for t in logits]

    def describe(self, slots: Tensor) -> Tensor:
        """slots [B, K, D] -> [B, K, name_width] fp32: each attribute's class probabilities, then the place."""
        logits, place = self(slots)
        return torch.cat([*(t.softmax(-1) for t in logits), place], dim=-1)
