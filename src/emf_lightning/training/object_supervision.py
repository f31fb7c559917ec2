"""An auxiliary training signal: the connector's slot tokens, supervised by the objects of each caption's scene.

Why. On whole scenes the one-step generator binds colours to shapes when each object arrives as one token (the
composition study's oracle features), and not when it reads a sentence encoder's word tokens, although one
cross-attention head reads the binding out of those tokens almost perfectly (docs/composition_2026-12-06.md).
Slot tokens (``model.text_slots``) can carry that one-token-per-object format, but the denoising loss alone does not
teach it to them. With ``model.object_supervision: w`` each slot also learns to name one object of the caption's
scene (its colour, shape and size, and where it stands), the slots matched to the objects by the assignment of
least cost (the set loss of DETR: slot order is free), the unmatched slots naming "no object". With
``model.slot_layout`` the matched objects' places are also the layout the backbone is shown in training
(:func:`matched_layout`) and what the connector's layout planner learns to sample; with ``model.slot_relations``
the relations the caption states between them (``meta["relations"]``) teach the connector's ``SlotRelations``. The slots still
read only the caption, so sampling needs nothing but a prompt. The slots are named by a ``SlotNamer``: a
training-only one outside the generator, its EMA copy and its exports (``EMFModule.slot_object_head``), or, with
``model.named_slots``, the connector's own, whose names the backbone then reads instead of the slots.

What it needs: object annotations in each sample's ``.json`` (``meta["objects"]``: dicts with ``color``,
``shape``, ``size`` and ``x``, ``y`` in [0, 1], as the shapes world's shards have them). A sample without them, or
with a value outside the vocabulary, or with more objects than there are slots, is left out of this term and
counted (:func:`object_set_loss` returns the counts); the denoising loss still trains on it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from emf_lightning.models.layout import RELATIONS, relations_to_others
from emf_lightning.models.slot_namer import ATTRIBUTE_SIZES
from emf_lightning.shapes.scene import ALL_SHAPES, COLORS, INVERSE_RELATION, SIZES
from emf_lightning.shapes.scene import RELATIONS as SCENE_RELATIONS

# The attributes a slot names, each with its vocabulary; index len(vocabulary) means "no object".
ATTRIBUTES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("color", tuple(COLORS)),
    ("shape", ALL_SHAPES),
    ("size", SIZES),
)
if tuple(len(vocab) for _, vocab in ATTRIBUTES) != ATTRIBUTE_SIZES:
    raise ImportError(
        f"models.slot_namer.ATTRIBUTE_SIZES {ATTRIBUTE_SIZES} no longer match the shapes world's vocabularies "
        f"{tuple(len(vocab) for _, vocab in ATTRIBUTES)}: update them together"
    )


if RELATIONS != SCENE_RELATIONS:
    raise ImportError(
        f"models.layout.RELATIONS {RELATIONS} no longer match the shapes world's {SCENE_RELATIONS}: update them together"
    )
# A pair of slots whose relation is not judged (unmatched, the same slot, or a row whose relations are unusable).
NOT_JUDGED = -100


class ObjectTargets(NamedTuple):
    """A batch's objects, padded to ``M`` per row: attribute indices [B, M, A], place (x, y) [B, M, 2] and which
    entries are real [B, M]; ``rows`` [B] bool marks the samples that take part at all."""

    classes: Tensor
    place: Tensor
    valid: Tensor
    rows: Tensor


def object_targets(metas: Sequence[Mapping[str, Any] | None], max_objects: int) -> tuple[ObjectTargets, Counter]:
    """The supervision targets of a batch's ``meta`` entries, and the count of samples left out, by reason."""
    n = len(metas)
    classes = torch.zeros(n, max_objects, len(ATTRIBUTES), dtype=torch.long)
    place = torch.zeros(n, max_objects, 2)
    valid = torch.zeros(n, max_objects, dtype=torch.bool)
    rows = torch.zeros(n, dtype=torch.bool)
    skipped: Counter = Counter()
    for i, meta in enumerate(metas):
        objects = (meta or {}).get("objects")
        if not objects:
            skipped["no objects in meta"] += 1
            continue
        if len(objects) > max_objects:
            skipped[f"more than {max_objects} objects"] += 1
            continue
        try:
            for j, obj in enumerate(objects):
                classes[i, j] = torch.tensor([vocab.index(obj[name]) for name, vocab in ATTRIBUTES])
                place[i, j] = torch.tensor([float(obj["x"]), float(obj["y"])])
        except (KeyError, ValueError, TypeError):
            skipped["object outside the vocabulary"] += 1
            classes[i], place[i] = 0, 0.0
            continue
        valid[i, : len(objects)] = True
        rows[i] = True
    return ObjectTargets(classes, place, valid, rows), skipped


def object_set_loss(
    logits: Sequence[Tensor], place: Tensor, metas: Sequence[Mapping[str, Any] | None]
) -> tuple[Tensor, dict[str, Tensor], Counter]:
    """A ``SlotNamer``'s reading of K slots (logits [B, K, n_a + 1] per attribute, place [B, K, 2]) against the
    batch's scenes -> (loss, stats, samples left out by reason). The loss is the mean over the rows with objects of
    the per-slot cross-entropy summed over the attributes, plus the L1 error of the matched slots' places; 0 (with
    a gradient path) when no row has objects."""
    targets, skipped = object_targets(metas, place.shape[1])
    device = place.device
    rows = targets.rows.to(device)
    if not bool(rows.any()):
        zero = sum(t.sum() for t in logits) * 0.0 + place.sum() * 0.0
        return zero, {"objects_rows": torch.tensor(0.0)}, skipped
    logits, place = [t[rows] for t in logits], place[rows]
    wanted, place_target, matched, _ = assign_slots(logits, place, targets)
    naming = sum(F.cross_entropy(t.flatten(0, 1), wanted[..., a].flatten()) for a, t in enumerate(logits))
    placing = (place - place_target).abs().sum(-1)[matched].mean()
    with torch.no_grad():
        right = (torch.stack([t.argmax(-1) for t in logits], -1) == wanted)[matched]  # [matched slots, A]
    stats = {
        "objects_naming": naming.detach(),
        "objects_placing": placing.detach(),
        "objects_accuracy": right.all(-1).float().mean(),
        **{f"objects_{name}_accuracy": right[:, a].float().mean() for a, (name, _) in enumerate(ATTRIBUTES)},
        "objects_rows": rows.float().sum(),
    }
    return naming + placing, stats, skipped


class SlotLayout(NamedTuple):
    """The layout of a batch's matched objects (:func:`matched_layout`): places [B, K, 2] in [0, 1], present [B, K]
    bool, the relation each slot's object stands in to each other's as the caption states it [B, K, K] (an index of
    ``RELATIONS``, ``len(RELATIONS)`` for none stated, ``NOT_JUDGED`` off the matched pairs), the rows whose
    relations were left out, by reason, and each row's object count [B] (``NOT_JUDGED`` for rows without usable
    objects)."""

    places: Tensor
    present: Tensor
    relations: Tensor
    skipped: Counter
    counts: Tensor


@torch.no_grad()
def matched_layout(logits: Sequence[Tensor], place: Tensor, metas: Sequence[Mapping[str, Any] | None]) -> SlotLayout:
    """Where each slot's matched object stands and how it stands to the others, for ``model.slot_layout``'s
    training (the layout the backbone is shown, the planner's target and ``SlotRelations``' targets). Slots are
    matched as in :func:`object_set_loss`; unmatched slots and rows without usable objects are not present (their
    place is the image centre). A row whose relations name an unknown relation or object is left out of the
    relation targets (counted), not read as stating none."""
    targets, _ = object_targets(metas, place.shape[1])
    rows = targets.rows.to(place.device)
    b, k = place.shape[:2]
    places = torch.full(place.shape, 0.5, device=place.device)
    present = torch.zeros(b, k, dtype=torch.bool, device=place.device)
    relations = torch.full((b, k, k), NOT_JUDGED, dtype=torch.long)
    skipped: Counter = Counter()
    if bool(rows.any()):
        _, row_places, matched, slot_objects = assign_slots([t[rows] for t in logits], place[rows], targets)
        places[rows] = torch.where(matched[..., None], row_places, places[rows])
        present[rows] = matched
        # "None stated" between every two matched slots of a row, then each stated relation over it.
        others = ~torch.eye(k, dtype=torch.bool)
        for i, objects in zip(targets.rows.nonzero().flatten().tolist(), slot_objects.cpu().tolist()):
            stated = stated_relations(metas[i], {o: slot for slot, o in enumerate(objects) if o >= 0})
            if stated is None:
                skipped["unusable relations in meta"] += 1
                continue
            matched_row = torch.tensor(objects) >= 0
            relations[i][matched_row[:, None] & matched_row[None, :] & others] = len(RELATIONS)
            for (a, c), rel in stated.items():
                relations[i, a, c] = rel
    counts = torch.where(rows, present.sum(1), torch.full_like(rows, NOT_JUDGED, dtype=torch.long))
    return SlotLayout(places, present, relations.to(place.device), skipped, counts)


def stated_relations(meta: Mapping[str, Any], slot_of: Mapping[int, int]) -> dict[tuple[int, int], int] | None:
    """{(slot a, slot b): relation index} for each relation the scene states, both ways round ("a left of b" and
    "b right of a"); None when one names an unknown relation or an object without a slot."""
    out: dict[tuple[int, int], int] = {}
    for rel in meta.get("relations") or []:
        name, a, b = rel.get("rel"), slot_of.get(rel.get("a")), slot_of.get(rel.get("b"))
        if name not in RELATIONS or a is None or b is None or a == b:
            return None
        out[a, b], out[b, a] = RELATIONS.index(name), RELATIONS.index(INVERSE_RELATION[name])
    return out


def relation_loss(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor | None]:
    """``SlotRelations``' logits [B, K, K, R + 1] against :func:`matched_layout`'s relations -> (the mean
    cross-entropy over the judged pairs, 0 with a gradient path when there are none; the accuracy on the pairs
    with a stated relation, None when there are none)."""
    judged = targets != NOT_JUDGED
    if not bool(judged.any()):
        return logits.sum() * 0.0, None
    loss = F.cross_entropy(logits[judged].float(), targets[judged])
    stated = judged & (targets < len(RELATIONS))
    if not bool(stated.any()):
        return loss, None
    return loss, (logits[stated].argmax(-1) == targets[stated]).float().mean()


def stated_relation_features(relations: Tensor, present: Tensor) -> Tensor:
    """What ``SlotRelations.features`` would read from a perfect classifier: for each slot, how many of the other
    present slots it stands in each stated relation to ([B, K, R] float), from :func:`matched_layout`'s relations
    [B, K, K] and presence [B, K]. The planner's input in training with ``model.relation_teacher_forcing``."""
    stated = (relations >= 0) & (relations < len(RELATIONS))
    one_hot = F.one_hot(relations.clamp(0, len(RELATIONS) - 1), len(RELATIONS)).float()
    return relations_to_others(one_hot * stated[..., None], present)


def count_loss(logits: Tensor, counts: Tensor) -> tuple[Tensor, Tensor | None]:
    """``ObjectCount``'s logits [B, K + 1] against :func:`matched_layout`'s object counts [B] -> (the mean
    cross-entropy over the judged rows, 0 with a gradient path when there are none; their accuracy, or None)."""
    judged = counts != NOT_JUDGED
    if not bool(judged.any()):
        return logits.sum() * 0.0, None
    right = (logits[judged].argmax(-1) == counts[judged]).float().mean()
    return F.cross_entropy(logits[judged].float(), counts[judged]), right


def assign_slots(
    logits: Sequence[Tensor], place: Tensor, targets: ObjectTargets
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The set loss's targets for the rows with objects (``logits`` and ``place`` already restricted to
    ``targets.rows``): what each slot should name [b, K, A] (its matched object's classes, else "no object"), the
    place it should give [b, K, 2], which slots are matched [b, K], and the index of each slot's object in the
    scene [b, K] (-1 when unmatched). Slots are matched to objects at least cost: the negative log-likelihood of
    the object's attributes plus the L1 place error."""
    device = place.device
    classes, where, valid = (t[targets.rows].to(device) for t in targets[:3])
    b, k, m = place.shape[0], place.shape[1], classes.shape[1]
    cost = torch.cdist(place, where, p=1)
    for a, lp in enumerate(t.log_softmax(-1) for t in logits):
        cost = cost - lp.gather(-1, classes[..., a][:, None, :].expand(b, k, m))
    wanted = torch.stack([torch.full((b, k), t.shape[-1] - 1, device=device) for t in logits], -1)
    matched = torch.zeros(b, k, dtype=torch.bool, device=device)
    place_target = torch.zeros_like(place)
    slot_objects = torch.full((b, k), -1, dtype=torch.long, device=device)
    for i, (s, o) in enumerate(match_slots(cost, valid)):
        s, o = torch.as_tensor(s, device=device), torch.as_tensor(o, device=device)
        wanted[i, s] = classes[i, o]
        place_target[i, s] = where[i, o]
        matched[i, s] = True
        slot_objects[i, s] = o
    return wanted, place_target, matched, slot_objects


def match_slots(cost: Tensor, valid: Tensor) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per row, the (slot indices, object indices) of the assignment of least total ``cost`` [B, K, M] among the
    row's real objects (``valid`` [B, M]); every real object gets one slot (K >= objects)."""
    cost = cost.detach().float().cpu().numpy()
    out = []
    for row, real in zip(cost, valid.cpu().numpy()):
        objects = np.flatnonzero(real)
        slots, picked = linear_sum_assignment(row[:, objects])
        out.append((slots, objects[picked]))
    return out
