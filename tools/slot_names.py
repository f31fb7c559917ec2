"""Do a trained generator's slot tokens name the objects of captions it never trained on?

``model.object_supervision`` teaches each slot to name one object of the caption's scene. When a model draws
scenes of an unseen colour-shape pair worse than seen ones, this tells the two places it can go wrong apart: the
text side (the slots misname the unseen pair) or the image side (the slots name it, the backbone cannot draw it).
For each split's shards and each category, the matched slots' object accuracy (every attribute right) and each
attribute's accuracy, read through the (EMA) connector that sampling uses: its own namer (``model.named_slots``) or
the training-only one (``slot_object_head``). Slots are matched to objects at least cost, as in training. The
misnamings are counted too ("red triangle -> red square"), most frequent first.

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
from emf_lightning.training import EMFModule
from emf_lightning.training.object_supervision import ATTRIBUTES, assign_slots, object_set_loss, object_targets

MEASURES = ["objects_accuracy", *(f"objects_{name}_accuracy" for name, _ in ATTRIBUTES), "objects_placing"]


def misnamings(logits: list[torch.Tensor], place: torch.Tensor, metas: list) -> Counter:
    """Matched slots that name their object wrong, counted as "colour shape size -> named colour shape size"."""
    targets, _ = object_targets(metas, place.shape[1])
    rows = targets.rows
    logits, place = [t[rows] for t in logits], place[rows]
    wanted, _, matched = assign_slots(logits, place, targets)
    named = torch.stack([t.argmax(-1) for t in logits], -1)
    vocab = [(*values, "nothing") for _, values in ATTRIBUTES]

    def words(classes: torch.Tensor) -> str:
        return " ".join(v[int(c)] for v, c in zip(vocab, classes))

    wrong = matched & (named != wanted).any(-1)
    return Counter(f"{words(wanted[i, k])} -> {words(named[i, k])}" for i, k in wrong.nonzero().tolist())


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
    for batch in dm.val_dataloader():
        feats = module.batch_text_features(batch)
        logits, place = module.name_slots(connector, feats.tokens, feats.mask)
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
            for key in (category, "all"):
                wrong[key].update(errors)
                sums[key]["objects"] += objects
                for measure in MEASURES:
                    sums[key][measure] += float(stats[measure]) * objects
    return {
        key: {
            "objects": int(v["objects"]),
            **{m: v[m] / v["objects"] for m in MEASURES},
            "misnamed": dict(wrong[key].most_common()),
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
            print(f"  {category:14s} {values} ({row['objects']} objects){'; ' + common if common else ''}")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps({"ckpt": a.ckpt, **results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
