"""Do a layout model's one-step images fail where its planner puts objects close, and does spreading the planned
places (``model.layout_spacing``) mend them?

For each spacing given (0: the planner's own places), every caption of the shards is sampled at one step with the
same noise and the same planner draws (seeded per batch, the batch's index, as ``EMFModule.generate`` seeds them)
and ShapesEval judges each image: the share passed per category, and their mean. With spacing 0 among them, the
scenes are also binned by the smallest distance between two of the planner's centres (a fraction of the image
side), with how many of each bin passed: the table that shows whether failures stand on crowded layouts.

    python tools/layout_gaps.py runs/compose/exp11/N32_pointer/.../last.ckpt --shards 'runs/compose/shapes/val-*.tar' \\
        --cache runs/compose/feature_cache --spacings 0 0.35 0.45 --out runs/compose/diag/layout_gaps_N32.json
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import torch

from emf_lightning.data.datamodule import ShardDataModule
from emf_lightning.inference import sampling_conditions
from emf_lightning.meanflow.draws import make_noise
from emf_lightning.models.layout import smallest_gaps
from emf_lightning.shapes.judge import ShapesEval
from emf_lightning.shapes.scene import CATEGORIES
from emf_lightning.training import EMFModule

GAP_BINS = (0.1, 0.2, 0.3, 0.4, 0.5)  # upper edges; the last bin is everything from 0.5 on


def gap_bin(gap: float) -> str:
    """The label of the bin that holds a smallest gap: "<0.1", "0.1-0.2", ..., ">=0.5"."""
    lower = 0.0
    for edge in GAP_BINS:
        if gap < edge:
            return f"<{edge:g}" if lower == 0.0 else f"{lower:g}-{edge:g}"
        lower = edge
    return f">={GAP_BINS[-1]:g}"


BIN_LABELS = [gap_bin(0.0)] + [gap_bin(edge) for edge in GAP_BINS]  # in order of the gap


@torch.no_grad()
def layout_gaps(module: EMFModule, shards: str, spacings: list[float], batch_size: int = 200) -> dict:
    """{"spacings": {spacing: {category: passed share, "overall": their mean, "scenes": n}}, "by_gap": {category:
    {bin: [passed, scenes]}}} (by_gap only with spacing 0, judged on its images)."""
    net = module.ema_generator.eval()
    connector = net.connector
    if not connector.layout:
        raise SystemExit("this checkpoint has no slot layout (model.slot_layout): it plans no places to judge")
    judge = ShapesEval()
    dm = ShardDataModule(val_shards=shards, batch_size=batch_size, num_workers=0, image_size=32)
    dm.setup("validate")
    passed: dict[float, dict[str, list[bool]]] = {s: defaultdict(list) for s in spacings}
    by_gap: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    kept_spacing = connector.spacing
    try:
        for seed, batch in enumerate(dm.val_dataloader()):
            metas = batch["meta"]
            feats = module.batch_text_features(batch)
            noise = make_noise((len(metas), *module.data_shape), seed, device=module.device)
            for spacing in spacings:
                connector.spacing = spacing
                cond, _ = sampling_conditions(net, feats, module.encoder.dim, 1.0, seed, module.device)
                gaps = smallest_gaps(cond[2], cond[3]) if spacing == 0.0 else [None] * len(metas)
                x = module.loss_fn.sampler(net, noise, cond, steps=1, cfg_scale=1.0, null_cond=None)
                images = module.autoencoder.decode(x.float())
                for gap, result in zip(gaps, judge.evaluate_detailed(images, metas)):
                    if result["passed"] is None:
                        continue
                    passed[spacing][result["category"]].append(bool(result["passed"]))
                    if gap is not None:  # binned on the planner's own places (spacing 0) only
                        counts = by_gap[result["category"]][gap_bin(gap)]
                        counts[0] += bool(result["passed"])
                        counts[1] += 1
    finally:
        connector.spacing = kept_spacing
    table = {}
    for spacing, categories in passed.items():
        shares = {c: sum(v) / len(v) for c in CATEGORIES if (v := categories.get(c))}
        table[f"{spacing:g}"] = {
            **shares,
            "overall": sum(shares.values()) / max(len(shares), 1),
            "scenes": sum(len(v) for v in categories.values()),
        }
    return {"spacings": table, "by_gap": {c: dict(bins) for c, bins in by_gap.items()}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt")
    p.add_argument("--shards", required=True, help="the scenes to sample (a val or heldout split's shards)")
    p.add_argument("--spacings", type=float, nargs="+", default=[0.0, 0.45])
    p.add_argument("--cache", help="the feature cache the run used (default: the checkpoint's)")
    p.add_argument("--batch-size", type=int, default=200)
    p.add_argument("--out", help="write the tables as JSON here")
    a = p.parse_args(argv)
    overrides = {"feature_cache_dir": a.cache} if a.cache else {}
    module = EMFModule.load_from_checkpoint(a.ckpt, map_location="cpu", **overrides).eval()
    result = layout_gaps(module, a.shards, a.spacings, a.batch_size)
    for spacing, row in result["spacings"].items():
        cells = ", ".join(f"{c} {row[c]:.3f}" for c in CATEGORIES if c in row)
        print(f"spacing {spacing}: {cells}; overall {row['overall']:.3f} ({row['scenes']} scenes)")
    for category, bins in sorted(result["by_gap"].items()):
        order = [b for b in BIN_LABELS if b in bins]
        print(
            f"  {category:12s} by smallest planned gap: " + ", ".join(f"{b} {bins[b][0]}/{bins[b][1]}" for b in order)
        )
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps({"ckpt": a.ckpt, "shards": a.shards, **result}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
