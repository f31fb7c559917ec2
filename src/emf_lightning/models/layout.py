"""Where each object stands: a layout planned from the slot tokens, painted as a map the backbone reads.

Why. On whole scenes the one-step U-Net draws the right objects but puts them anywhere: position stayed at or below
0.16 at one step in every run of docs/composition_2026-12-06.md, the oracle's exact scene features included. To
place "a red circle left of a blue square" in one pass the network must decide both objects' places together from
noise. A layout takes that decision out of the image model, as layout-to-image models (GLIGEN) and planners that
ask a language model for boxes first (LLM-grounded diffusion) do:

- ``LayoutPlanner``: a small flow-matching model over the K slots' places (x, y), conditioned on the slot tokens
  and reading the other slots through self-attention (the relation is between objects). Trained on the places of
  the objects the slots are matched to (``training.object_supervision``); sampled in ``LAYOUT_STEPS`` Euler steps of
  a network on K tokens, a negligible cost beside one step of the backbone. It samples: two objects that the
  caption does not relate get two different places, where a regression of the place would put both at the mean.
- ``SlotRelations`` (with ``model.slot_relations``): which relation the caption states between each pair of slots'
  objects (one of ``RELATIONS``, or none), a pairwise classifier on the slots taught by the scenes' stated relations.
  The planner reads, for each slot, the relations it stands in to the others. A planner that reads only the slots
  (or the caption's tokens) put the relation's subject on the right side a third of the time, chance, after as
  many steps as a screen trains; given who is the subject of which relation it learns the relation within a few
  hundred (docs/composition_2026-12-07.md, ninth round).
- ``ObjectCount`` (with ``model.slot_count``): how many objects the caption states, read from its pooled tokens;
  the planner places that many slots, the most object-like. Deciding presence slot by slot (a slot's "no object"
  below one half) placed extra objects for one-object captions of unseen colour-shape pairs in some seeds, where a
  count read from the caption's words was right (docs/composition_2026-12-07.md, tenth round).
- ``spread_places`` (with ``model.layout_spacing``): the sampled places pushed apart until every two placed objects'
  centres are at least the spacing apart, inside the image (at sampling only; training paints the true places). The
  planner is a small flow that puts some pairs closer than any two objects of its training scenes stand; the
  backbone then draws them as one blob (four objects counted as three), and spreading them at sampling recovers the
  count (docs/composition_2026-12-07.md, twelfth round).
- ``paint_layout``: each present slot's content (a linear map of its name, so an unseen colour-shape pair is a new
  sum of seen parts) as a Gaussian blob at its place; ``[B, C, H, W]``, added to the backbone's first features.

In training the map is painted at the true places of the matched objects (teacher forcing); at sampling at the
planner's.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch import Tensor

from .layers import TimestepEmbedder

# The relations a caption can state between two objects (the shapes world's, in its order; a caption states each
# from either end: "A left of B" = "B right of A"). SlotRelations' last class is "none stated".
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")

# Euler steps of the planner's flow at sampling (K tokens, a few thousand multiply-adds each).
LAYOUT_STEPS = 16
# Channels of the painted map, and the blobs' standard deviation as a fraction of the image side (objects are
# 0.25-0.42 of the side in the shapes world; the blob marks the centre, the backbone draws the extent).
LAYOUT_CHANNELS = 16
LAYOUT_SIGMA = 0.08
# Rounds of ``spread_places``' pairwise pushes (K slots: a few hundred multiply-adds a round); three or four
# crowded objects settle within a few dozen.
SPREAD_ROUNDS = 100


def check_spacing(spacing: float) -> None:
    """Refuse a spacing that is not a fraction of the image side in [0, 1) (0: no spreading)."""
    if not 0.0 <= spacing < 1.0:
        raise ValueError(f"spacing is a fraction of the image side in [0, 1), got {spacing}")


def smallest_gaps(places: Tensor, present: Tensor) -> list[float | None]:
    """Per row of places [B, K, 2] with present [B, K], the smallest distance between two present places (None
    with fewer than two)."""
    out: list[float | None] = []
    for row, keep in zip(places.float(), present):
        p = row[keep]
        out.append(float((torch.cdist(p, p) + torch.eye(len(p), device=p.device) * 9.0).min()) if len(p) > 1 else None)
    return out


def spread_places(places: Tensor, present: Tensor, spacing: float, rounds: int = SPREAD_ROUNDS) -> Tensor:
    """places [B, K, 2] in [0, 1] with present [B, K] -> the present places moved so that every two stand at least
    ``spacing`` (a fraction of the side) apart and each stays ``spacing / 2`` inside the image: each place a disc of
    diameter ``spacing``, the discs kept from overlapping and inside.

    Each round, every pair closer than ``spacing`` moves apart along the line between them, each by half of what it
    lacks, and the places are clamped inside. A move along that line scales the pair's offset on both axes, and the
    clamp keeps the order of coordinates, so of two objects (a relation's scene) the one left of or above the other
    stays so. Layouts the space cannot hold (more discs than fit) end as spread as ``rounds`` make them. A layout
    whose places all stand ``spacing`` apart is returned as it is, and absent slots are left alone."""
    check_spacing(spacing)
    if spacing == 0.0 or places.shape[1] < 2:
        return places
    k = places.shape[1]
    pairs = present[:, :, None] & present[:, None, :] & ~torch.eye(k, dtype=torch.bool, device=places.device)
    # Two places at one point have no line between them: each slot then leaves along its own direction, spread
    # evenly round the circle from the diagonal (four slots part towards the four corners, where four fit).
    angles = math.pi / 4 + 2 * math.pi * torch.arange(k, device=places.device, dtype=torch.float32) / k
    home = torch.stack([angles.cos(), angles.sin()], dim=-1)  # [K, 2]
    parting = home[:, None, :] - home[None, :, :]  # [K, K, 2], i's away from j's
    parting = parting / parting.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    moved = places.float()
    for _ in range(rounds):
        offset = moved[:, :, None, :] - moved[:, None, :, :]  # [B, K, K, 2]: i's place minus j's
        distance = offset.norm(dim=-1)
        short = pairs & (distance < spacing)
        if not bool(short.any()):
            break
        direction = torch.where(distance[..., None] > 1e-6, offset / distance.clamp_min(1e-6)[..., None], parting)
        push = ((spacing - distance) / 2 * short)[..., None] * direction
        spread = (moved + push.sum(dim=2)).clamp(spacing / 2, 1.0 - spacing / 2)
        crowded = short.flatten(1).any(dim=1)  # a row moves only while it is crowded: its batch mates do not matter
        moved = torch.where(crowded[:, None, None], spread, moved)
    return torch.where(present[..., None], moved.to(places.dtype), places)


def fourier_places(places: Tensor, frequencies: int = 4) -> Tensor:
    """[..., 2] in about [-1, 1] -> [..., 2 + 4 * frequencies]: each coordinate, then sin and cos of it at octave
    frequencies (pi / 2 to 4 pi at the default: a noisy place far outside [-1, 1] still reads smoothly)."""
    scales = (2.0 ** torch.arange(frequencies, device=places.device, dtype=places.dtype)) * (math.pi / 2)
    angles = places[..., None] * scales  # [..., 2, F]
    return torch.cat([places, torch.cat([angles.sin(), angles.cos()], dim=-1).flatten(-2)], dim=-1)


class LayoutPlanner(nn.Module):
    """v(z, t | slots, present) for the slots' places: a flow from N(0, 1) (t = 1) to the places (t = 0), in
    centred coordinates 2 * place - 1. Absent slots (``present`` False) neither move nor are read by the others."""

    def __init__(
        self,
        slot_dim: int,
        width: int = 64,
        layers: int = 2,
        heads: int = 4,
        frequencies: int = 4,
        relation_channels: int = 0,
    ):
        super().__init__()
        self.frequencies = frequencies
        self.relation_channels = relation_channels
        self.slot_in = nn.Sequential(nn.LayerNorm(slot_dim), nn.Linear(slot_dim, width))
        # What each slot stands in to the others (SlotRelations.features), when the planner is given it.
        self.relation_in = nn.Linear(relation_channels, width) if relation_channels else None
        self.place_in = nn.Linear(2 + 4 * frequencies, width)
        # t in [0, 1] scaled as diffusion timesteps: the planner has no JVP, so the scale costs nothing here.
        self.t_embedder = TimestepEmbedder(width, 64, scale=1000.0)
        layer = nn.TransformerEncoderLayer(
            width, heads, dim_feedforward=2 * width, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.out = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 2))

    def velocity(self, z: Tensor, t: Tensor, slots: Tensor, present: Tensor, relations: Tensor | None = None) -> Tensor:
        """z [B, K, 2] (centred places on the path), t [B], slots [B, K, D], present [B, K] bool, and for a planner
        built with ``relation_channels`` relations [B, K, relation_channels] -> [B, K, 2]."""
        if (relations is None) != (self.relation_in is None):
            raise ValueError(
                f"this planner reads {self.relation_channels} relation channels per slot: pass relations exactly "
                "when it was built with relation_channels > 0"
            )
        h = self.slot_in(slots) + self.place_in(fourier_places(z, self.frequencies)) + self.t_embedder(t)[:, None]
        if self.relation_in is not None:
            h = h + self.relation_in(relations.float())
        # A row without a present slot reads all of them (its output is unused): never an all-masked softmax.
        ignore = ~present & present.any(1, keepdim=True)
        return self.out(self.blocks(h, src_key_padding_mask=ignore))

    def loss(
        self,
        places: Tensor,
        present: Tensor,
        slots: Tensor,
        generator: torch.Generator | None = None,
        relations: Tensor | None = None,
    ) -> Tensor:
        """Flow matching on the present slots' places [B, K, 2] in [0, 1]: the mean squared error of the velocity
        (0 with a gradient path when no slot is present)."""
        x = 2.0 * places.float() - 1.0
        e = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        t = torch.rand(x.shape[0], generator=generator, device=x.device, dtype=x.dtype)
        z = (1.0 - t[:, None, None]) * x + t[:, None, None] * e
        err = (self.velocity(z, t, slots.float(), present, relations) - (e - x)).pow(2).sum(-1)
        return err[present].mean() if bool(present.any()) else err.sum() * 0.0

    @torch.no_grad()
    def sample(
        self,
        slots: Tensor,
        present: Tensor,
        generator: torch.Generator | None = None,
        steps: int = LAYOUT_STEPS,
        relations: Tensor | None = None,
    ) -> Tensor:
        """Places [B, K, 2] in [0, 1] for the slots (absent slots get the image centre); the same generator state
        gives the same layout."""
        b, k = present.shape
        draw_on = generator.device if generator is not None else slots.device  # a CPU seed: the same on any device
        z = torch.randn(b, k, 2, generator=generator, device=draw_on, dtype=torch.float32).to(slots.device)
        grid = torch.linspace(1.0, 0.0, steps + 1, device=slots.device)
        for t_i, t_next in zip(grid[:-1], grid[1:]):
            z = z - (t_i - t_next) * self.velocity(z, t_i.expand(b), slots.float(), present, relations)
        places = ((z + 1.0) / 2.0).clamp(0.0, 1.0)
        return torch.where(present[..., None], places, torch.full_like(places, 0.5))


class SlotRelations(nn.Module):
    """Which relation the caption states between the objects of slots i and j: logits [B, K, K, R + 1] over
    ``RELATIONS`` and "none stated", from both slots' vectors (an MLP on the pair, so "i left of j" and "j right of
    i" are two readings of one caption). Taught by ``model.object_supervision`` on the scenes' stated relations
    (``training.object_supervision.matched_layout``); the planner reads :meth:`features`."""

    def __init__(self, slot_dim: int, hidden: int = 128):
        super().__init__()
        self.norm = nn.LayerNorm(slot_dim)
        self.mlp = nn.Sequential(nn.Linear(2 * slot_dim, hidden), nn.GELU(), nn.Linear(hidden, len(RELATIONS) + 1))

    def forward(self, slots: Tensor) -> Tensor:
        """slots [B, K, D] -> logits [B, K, K, R + 1]: entry (i, j) is slot i's relation to slot j."""
        s = self.norm(slots.float())
        k = s.shape[1]
        return self.mlp(torch.cat([s[:, :, None].expand(-1, -1, k, -1), s[:, None].expand(-1, k, -1, -1)], -1))

    def features(self, slots: Tensor, present: Tensor) -> Tensor:
        """[B, K, R]: for each slot, the probability of each stated relation to the other present slots, summed
        over them (a slot with no stated relation, or absent, reads about zero)."""
        return relations_to_others(self(slots).softmax(-1)[..., :-1], present)


def relations_to_others(pairwise: Tensor, present: Tensor) -> Tensor:
    """[B, K, R]: for each present slot, ``pairwise`` [B, K, K, R] (entry (i, j): slot i's relations to slot j)
    summed over the other present slots; absent slots read zero."""
    others = present[:, None, :] & present[:, :, None]
    others = others & ~torch.eye(present.shape[1], dtype=torch.bool, device=present.device)
    return (pairwise * others[..., None]).sum(2)


class ObjectCount(nn.Module):
    """How many objects a caption states: logits [B, slots + 1] over 0..slots, from the mean of its (standardised)
    text tokens. The count is said by words that do not depend on which objects they count ("two", "and", "to the
    left of"), so it reads an unseen colour-shape pair's caption as it reads a seen one's; the slots, which must
    bind the pair, are not asked. Taught by ``model.object_supervision`` on the scenes' object counts."""

    def __init__(self, text_dim: int, slots: int, hidden: int = 128):
        super().__init__()
        self.slots = slots
        self.mlp = nn.Sequential(
            nn.LayerNorm(text_dim), nn.Linear(text_dim, hidden), nn.GELU(), nn.Linear(hidden, slots + 1)
        )

    def forward(self, tokens: Tensor, mask: Tensor | None = None) -> Tensor:
        """tokens [B, L, D] (mask [B, L] bool, True = real token) -> logits [B, slots + 1], fp32."""
        tokens = tokens.float()
        if mask is None:
            pooled = tokens.mean(1)
        else:
            weights = mask.to(tokens.dtype)[..., None]
            pooled = (tokens * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        return self.mlp(pooled)


def most_object_like(nothing: Tensor, count: Tensor) -> Tensor:
    """[B, K] bool: in each row the ``count`` [B] slots least likely to hold nothing (``nothing`` [B, K], the
    namer's "no object" probability), ties to the earlier slot."""
    ranks = nothing.argsort(dim=1, stable=True).argsort(dim=1)  # each slot's place in its row's order
    return ranks < count[:, None]


def paint_layout(
    places: Tensor, present: Tensor, content: Tensor, size: tuple[int, int], sigma: float = LAYOUT_SIGMA
) -> Tensor:
    """Sum over the present slots of content [B, K, C] times a Gaussian of std ``sigma`` (fraction of the side) at
    places [B, K, 2] ((x, y) in [0, 1], x to the right, y down), sampled at pixel centres -> [B, C, H, W]."""
    h, w = size
    ys = (torch.arange(h, device=places.device, dtype=places.dtype) + 0.5) / h
    xs = (torch.arange(w, device=places.device, dtype=places.dtype) + 0.5) / w
    dy = (ys[None, None, :] - places[..., 1:2]) ** 2  # [B, K, H]
    dx = (xs[None, None, :] - places[..., 0:1]) ** 2  # [B, K, W]
    blobs = torch.exp(-(dy[..., :, None] + dx[..., None, :]) / (2 * sigma**2))  # [B, K, H, W]
    blobs = blobs * present[..., None, None].to(blobs.dtype)
    return torch.einsum("bkhw,bkc->bchw", blobs, content.to(blobs.dtype))
