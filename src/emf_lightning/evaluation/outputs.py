"""What an evaluation leaves behind: ``grid-stepNNNNNNNN.png`` (rows: the first prompts; columns: real, then
each setting), ``metrics-stepNNNNNNNN.json`` and, on request, a rich table (rows: settings, columns: metrics)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from emf_lightning.evaluation.evaluator import REAL, EvaluationResult, HeldOutSet, setting_label
from emf_lightning.utils.grids import save_grid
from emf_lightning.utils.report import print_metrics_table, write_metrics_json


def write_outputs(
    result: EvaluationResult,
    held: HeldOutSet,
    out_dir: str | Path,
    grid_prompts: int = 8,
    grid_upscale: int | None = None,
    **context: Any,
) -> None:
    """Write the grid (unless ``grid_prompts`` is 0) and the JSON into ``out_dir``; sets ``result.grid_path``
    and ``result.json_path``. ``context`` (e.g. ``epoch``, ``checkpoint``) goes into the JSON as it is.
    ``grid_upscale``: magnification of the cells; ``None`` makes them at least 128 px."""
    out, stem = Path(out_dir), f"step{result.global_step:08d}"
    labels = [setting_label(s, c) for s, c in result.settings]
    result.grid_path = None
    if grid_prompts > 0 and result.images:
        g = min(grid_prompts, len(held))
        cells = np.stack([held.images[:g], *[result.images[label][:g] for label in labels]], axis=1)
        result.grid_path = save_grid(
            cells.reshape(-1, *cells.shape[2:]),
            out / f"grid-{stem}.png",
            nrow=cells.shape[1],
            row_labels=held.captions[:g],
            col_labels=["real", *labels],
            upscale=grid_upscale or max(1, math.ceil(128 / held.images.shape[1])),
        )
    payload = {
        "global_step": result.global_step,
        "num_samples": result.num_samples,
        "seed": result.seed,
        **context,
        "settings": [
            {"steps": s, "cfg_scale": c, "metrics": result.rows.get(label, {})}
            for (s, c), label in zip(result.settings, labels)
        ],
        "real": result.rows.get(REAL, {}),
        "metrics": result.flat(),
        "skipped": result.skipped,
        "feature_extractor": result.feature_extractor,
        "clip_model": result.clip_model,
        "grid": result.grid_path.name if result.grid_path is not None else None,
    }
    result.json_path = write_metrics_json(out / f"metrics-{stem}.json", payload)


def print_table(result: EvaluationResult) -> None:
    """The result as a rich table on stdout: one row per setting, then the real images."""
    rows = {label: result.rows[label] for label in [setting_label(s, c) for s, c in result.settings]}
    rows["real data"] = result.rows.get(REAL, {})
    print_metrics_table(rows, title=f"Evaluation at step {result.global_step} ({result.num_samples} prompts)")
