"""Do a trained generator's slot tokens name the objects of captions it never trained on?

``model.object_supervision`` teaches each slot to name one object of the caption's scene. When a model draws
scenes of an unseen colour-shape pair worse than seen ones, this tells the two places it can go wrong apart: the
text side (the slots misname the unseen pair) or the image side (the slots name it, the backbone cannot draw it).
For each split's shards and each category, the matched slots' object accuracy (every attribute right) and each
attribute's accuracy, read through the (EMA) connector that sampling uses: its own namer (``model.named_slots``) or
the training-only one (``slot_object_head``). Slots are matched to objects at least cost, as in training. The
misnamings are counted too ("red triangle -> red square"), most frequent first.

For a model with a slot layout (``model.slot_layout``) it also judges the layouts the planner draws (one per
caption, seed 0), the image side left out: ``layout_count`` (as many slots placed as the scene has objects),
``layout_apart`` (every two placed objects' centres at least ``APART`` of the side apart) and, for position
captions, ``layout_relation`` (the places of the slots matched to the relation's two objects, their centre offset
within 60 degrees of the relation's direction, as ShapesEval's judge reads a drawn relation, without its slack),
and with ``model.slot_relations`` ``layout_relation_read`` (the relation the connector reads between those two
slots, which the planner is given, is the stated one).

    python tools/slot_names.py runs/compose/exp8/N_named/.../last.ckpt \\
        --shards val='runs/compose/shapes/val-*.tar' heldout='runs/compose/shapes/heldout-*.tar' \\
        --cache runs/compose/feature_cache --out runs/compose/diag/slot_names_N.json
"""

from __future__ import annotations

import argparse
import json
from collections import Counter, defaultdict
from pathlib import Path

import torch

from emf_lightning.data.datamodule import ShardDataModule
from emf_lightning.models.layout import RELATIONS, smallest_gaps
from emf_lightning.training import EMFModule
from emf_lightning.training.object_supervision import ATTRIBUTES, assign_slots, object_set_loss, object_targets

MEASURES = ["objects_accuracy", *(f"objects_{name}_accuracy" for name, _ in ATTRIBUTES), "objects_placing"]
LAYOUT_MEASURES = ["layout_count", "layout_apart", "layout_relation", "layout_relation_read"]
APART = 0.2  # the smallest shapes-world objects are 0.28 of the side wide: closer centres overlap
DIRECTIONS = {"left of": (-1.0, 0.0), "right of": (1.0, 0.0), "above": (0.0, -1.0), "below": (0.0, 1.0)}


def misnamings(logits: list[torch.Tensor], place: torch.Tensor, metas: list) -> Counter:
    """Matched slots that name their object wrong, counted as "colour shape size -> named colour shape size"."""
    targets, _ = object_targets(metas, place.shape[1])
    rows = targets.rows
    logits, place = [t[rows] for t in logits], place[rows]
    wanted, _, matched, _ = assign_slots(logits, place, targets)
    named = torch.stack([t.argmax(-1) for t in logits], -1)
    vocab = [(*values, "nothing") for _, values in ATTRIBUTES]

    def words(classes: torch.Tensor) -> str:
        return " ".join(v[int(c)] for v, c in zip(vocab, classes))

    wrong = matched & (named != wanted).any(-1)
    return Counter(f"{words(wanted[i, k])} -> {words(named[i, k])}" for i, k in wrong.nonzero().tolist())


def layout_judgements(
    logits: list[torch.Tensor],
    place: torch.Tensor,
    planned: torch.Tensor,
    present: torch.Tensor,
    metas: list,
    relations: torch.Tensor | None = None,
) -> dict[str, list[float]]:
    """Per scene, each layout measure that applies to it (1.0 / 0.0): the planner's places [B, K, 2] and which slots
    it placed [B, K], slots matched to the scene's objects as in training; with the connector's relation logits
    [B, K, K, R + 1] (``model.slot_relations``) also whether it reads each stated relation."""
    targets, _ = object_targets(metas, place.shape[1])
    rows = targets.rows.nonzero().flatten().tolist()
    out: dict[str, list[float]] = defaultdict(list)
    if not rows:
        return out
    _, _, _, slot_objects = assign_slots([t[rows] for t in logits], place[rows], targets)
    for j, i in enumerate(rows):
        meta, placed = metas[i], planned[i][present[i]]
        out["layout_count"].append(float(len(placed) == len(meta["objects"])))
        (gap,) = smallest_gaps(planned[i : i + 1], present[i : i + 1])
        if gap is not None:
            out["layout_apart"].append(float(gap >= APART))
        for rel in meta.get("relations") or []:
            slot_of = {int(o): k for k, o in enumerate(slot_objects[j].tolist()) if o >= 0}
            a, b = slot_of.get(rel["a"]), slot_of.get(rel["b"])
            if relations is not None:
                read = (
                    a is not None and b is not None and int(relations[i, a, b].argmax()) == RELATIONS.index(rel["rel"])
                )
                out["layout_relation_read"].append(float(read))
            if a is None or b is None or not (present[i, a] and present[i, b]):
                out["layout_relation"].append(0.0)
                continue
            offset = planned[i, a] - planned[i, b]
            cosine = float(offset @ torch.tensor(DIRECTIONS[rel["rel"]])) / max(float(offset.norm()), 1e-9)
            out["layout_relation"].append(float(cosine > 0.5))
    return out


@torch.no_grad()
def slot_names(module: EMFModule, shards: str, batch_size: int = 200) -> dict[str, dict]:
    """Per category (and "all"): each measure's mean over the matched slots, the object count, and the
    misnamings (most frequent first)."""
    connector = module.ema_generator.connector
    if not module.hparams.get("object_supervision"):
        raise SystemExit("this checkpoint was not trained with model.object_supervision: its slots name nothing")
    dm = ShardDataModule(val_shards=shards, batch_size=batch_size, num_workers=0, image_size=32)
    dm.setup("validate")
    sums: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    wrong: dict[str, Counter] = defaultdict(Counter)
    judged: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    draws = torch.Generator().manual_seed(0)
    for batch in dm.val_dataloader():
        feats = module.batch_text_features(batch)
        logits, place, slots = module.read_slot_names(connector, feats.tokens, feats.mask)
        relations = connector.slot_relations(slots) if connector.relations else None
        if connector.layout:
            _, _, planned, present = module.ema_generator.sampling_condition(feats.tokens, feats.mask, draws)
        groups = defaultdict(list)
        for i, meta in enumerate(batch["meta"]):
            groups[(meta or {}).get("category", "unknown")].append(i)
        for category, rows in groups.items():
            metas = [batch["meta"][i] for i in rows]
            objects = sum(len((m or {}).get("objects") or []) for m in metas)
            if not objects:
                continue
            names = ([t[rows] for t in logits], place[rows])
            _, stats, _ = object_set_loss(*names, metas)
            errors = misnamings(*names, metas)
            layout = {}
            if connector.layout:
                read = relations[rows] if relations is not None else None
                layout = layout_judgements(*names, planned[rows], present[rows], metas, read)
            for key in (category, "all"):
                for measure, values in layout.items():
                    judged[key][measure] += values
                wrong[key].update(errors)
                sums[key]["objects"] += objects
                for measure in MEASURES:
                    sums[key][measure] += float(stats[measure]) * objects
    return {
        key: {
            "objects": int(v["objects"]),
            **{m: v[m] / v["objects"] for m in MEASURES},
            "misnamed": dict(wrong[key].most_common()),
            **{m: sum(j) / len(j) for m, j in judged[key].items() if j},
        }
        for key, v in sums.items()
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt")
    p.add_argument("--shards", nargs="+", required=True, metavar="SPLIT=PATTERN")
    p.add_argument("--cache", help="the feature cache the run used (default: the checkpoint's)")
    p.add_argument("--out", help="write the table as JSON here")
    a = p.parse_args(argv)
    overrides = {"feature_cache_dir": a.cache} if a.cache else {}
    module = EMFModule.load_from_checkpoint(a.ckpt, map_location="cpu", **overrides).eval()
    results = {}
    for item in a.shards:
        split, _, pattern = item.partition("=")
        results[split] = slot_names(module, pattern)
        print(f"{split}: " + ", ".join(f"{measure[8:]}" for measure in MEASURES))
        for category, row in sorted(results[split].items()):
            values = " ".join(f"{row[m]:.3f}" for m in MEASURES)
            common = ", ".join(f"{k} x{n}" for k, n in list(row["misnamed"].items())[:3])
            layout = " ".join(f"{m[7:]} {row[m]:.3f}" for m in LAYOUT_MEASURES if m in row)
            print(
                f"  {category:14s} {values} ({row['objects']} objects){'; layout ' + layout if layout else ''}"
                f"{'; ' + common if common else ''}"
            )
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps({"ckpt": a.ckpt, **results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
