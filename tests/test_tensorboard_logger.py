"""The documented TensorBoard override: `emf fit ... --trainer.logger lightning.pytorch.loggers.TensorBoardLogger
--trainer.logger.save_dir DIR` writes an event file with the training scalars, the evaluation metrics and the
evaluation grid as an image (through SummaryWriter.add_image). Skipped without the `tensorboard` extra."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from emf_lightning import cli

from helpers import TINY_DIT, write_shapes_shards

pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "smollm_shapes.yaml"
BOW = '{"class_path": "emf_lightning.encoders.BagOfWordsEncoder", "init_args": {"dim": 16}}'


def test_tensorboard_override_logs_scalars_and_the_evaluation_grid(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    shards = write_shapes_shards(tmp_path / "shards", n_train=8, n_val=4, resolution=16)
    evaluation = tmp_path / "eval.yaml"
    evaluation.write_text(
        json.dumps(
            {
                "trainer": {
                    "callbacks": [
                        {
                            "class_path": "emf_lightning.callbacks.evaluation.EvaluationCallback",
                            "init_args": {
                                "every_n_steps": 2,
                                "num_samples": 4,
                                "batch_size": 4,
                                "steps": [1],
                                "fid": False,
                                "clip_score": False,
                                "grid_prompts": 2,
                                "grid_upscale": 2,
                            },
                        }
                    ]
                }
            }
        )
    )
    args = [
        "fit",
        "--config",
        str(CONFIG),
        "--config",
        str(evaluation),
        f"--model.encoder={BOW}",
        f"--data.train_shards={shards['train']}",
        f"--data.val_shards={shards['val']}",
        "--data.batch_size=2",
        "--data.val_batch_size=2",
        "--data.num_workers=0",
        "--data.image_size=16",
        "--data.epoch_length=8",
        "--data.pin_memory=false",
        f"--model.backbone={TINY_DIT}",
        "--model.feature_cache_dir=null",
        "--trainer.accelerator=cpu",
        "--trainer.precision=32-true",
        "--trainer.max_steps=2",
        "--trainer.log_every_n_steps=1",
        "--trainer.limit_val_batches=0",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={tmp_path}",
        # The override as the README documents it:
        "--trainer.logger",
        "lightning.pytorch.loggers.TensorBoardLogger",
        "--trainer.logger.save_dir",
        str(tmp_path / "tb"),
    ]
    assert cli.main(args) == 0

    events = sorted((tmp_path / "tb").rglob("events.out.tfevents.*"))
    assert len(events) == 1
    run_dir = events[0].parent
    assert run_dir.parent.name == "smollm_shapes"  # the config's logger name carried over to the new class
    acc = EventAccumulator(str(run_dir), size_guidance={"images": 0, "scalars": 0}).Reload()
    assert "train/loss" in acc.Tags()["scalars"]
    assert any(tag.startswith("eval/shapes_") and tag.endswith("@1step_cfg1.0") for tag in acc.Tags()["scalars"])
    # The grid went through the logger's own image API and is exactly the PNG written beside the metrics.
    assert acc.Tags()["images"] == ["eval/samples"]
    (logged,) = acc.Images("eval/samples")
    assert logged.step == 2
    grids = sorted(run_dir.rglob("grid-step00000002.png"))
    assert len(grids) == 1
    on_disk = np.asarray(Image.open(grids[0]).convert("RGB"))
    in_tb = np.asarray(Image.open(io.BytesIO(logged.encoded_image_string)).convert("RGB"))
    assert (logged.width, logged.height) == (on_disk.shape[1], on_disk.shape[0])
    assert np.array_equal(in_tb, on_disk)
