"""Write ``EMFModule.predict_step`` samples to disk: one PNG per caption and step count, plus an index."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import BasePredictionWriter
from PIL import Image

from emf_lightning.utils.images import to_uint8


class SamplePNGWriter(BasePredictionWriter):
    """Save each predicted batch as ``<output_dir>/steps<n>/<key>.png``; index in ``captions-rank<r>.jsonl``.

    Use with ``emf predict`` (``--trainer.callbacks+=emf_lightning.predict_writer.SamplePNGWriter
    --trainer.callbacks.output_dir=samples``). Rows without a key are named ``r<rank>-b<batch>-<i>``.
    """

    def __init__(self, output_dir: str = "samples"):
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir)

    def write_on_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        prediction: dict[str, Any],
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        captions = list(prediction["caption"])
        keys = prediction.get("key") or [f"r{trainer.global_rank}-b{batch_idx}-{i}" for i in range(len(captions))]
        records = []
        for steps, images in prediction["images"].items():
            folder = self.output_dir / f"steps{steps}"
            folder.mkdir(parents=True, exist_ok=True)
            for key, array in zip(keys, to_uint8(images)):
                path = folder / f"{key}.png"
                Image.fromarray(array).save(path)
                records.append({"key": key, "steps": int(steps), "path": str(path)})
        by_key = dict(zip(keys, captions))
        # One index file per rank: ranks never write the same file.
        index = self.output_dir / f"captions-rank{trainer.global_rank}.jsonl"
        with index.open("a", encoding="utf-8") as f:
            for rec in records:
                f.write(json.dumps({**rec, "caption": by_key[rec["key"]]}, ensure_ascii=False) + "\n")
