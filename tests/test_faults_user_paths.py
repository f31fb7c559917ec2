"""Fault suite, the paths a new user walks (issue 22): `emf validate --ckpt` alone judges, the shipped configs
start at their own shapes, the latent path's bad input is one line with exit 2, nothing is silent. Each test
failed before its fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from emf_lightning import cli

from helpers import BOW
from test_cli import CONFIGS, small_run_args


def one_line_error(err: str, command: str) -> str:
    """The single error line `emf <command>` printed; fails on a traceback."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith(f"emf {command}: error: ")]
    assert len(lines) == 1, err
    return lines[0]


# ================================================================================================================
# emf validate --ckpt alone judges
# ================================================================================================================


@pytest.fixture(scope="module")
def judged_run(shards, tmp_path_factory) -> Path:
    """`emf fit` of the offline config, shrunk, with its own callbacks (checkpoint, data health, evaluation on 4
    samples); returns its last.ckpt."""
    root = tmp_path_factory.mktemp("judged")
    args = [
        "fit",
        "--config",
        str(CONFIGS / "minilm_shapes.yaml"),
        *small_run_args(shards, root),
        f"--model.encoder={BOW}",
        "--trainer.max_steps=2",
        "--trainer.val_check_interval=2",
        "--trainer.limit_val_batches=1",
        "--trainer.callbacks=[]",
        "--trainer.callbacks+=emf_lightning.callbacks.checkpoint.FinalModelCheckpoint",
        "--trainer.callbacks.save_last=true",
        "--trainer.callbacks+=emf_lightning.callbacks.evaluation.EvaluationCallback",
        "--trainer.callbacks.every_n_steps=0",  # not during this fit
        "--trainer.callbacks.on_train_end=false",
        "--trainer.callbacks.num_samples=4",
        "--trainer.callbacks.batch_size=4",
        "--trainer.callbacks.grid_prompts=2",
        "--trainer.callbacks.fid=false",
        "--trainer.callbacks.clip_score=false",
    ]
    assert cli.main(args) == 0
    (last,) = root.rglob("last.ckpt")
    return last


def test_validate_with_only_the_checkpoint_judges_as_the_run_did(judged_run, tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)  # nothing may land in (or depend on) the working directory
    assert cli.main(["validate", "--ckpt", str(judged_run)]) == 0
    out, err = capfd.readouterr()
    # The ShapesEval table per category and step count (the run's steps, 1 / 2 / 4) ...
    assert "shapes_overall" in out or "overall" in out, out
    for steps in ("1 step", "2 steps", "4 steps"):
        assert steps in out, out
    # ... its JSON and grid under the run's own CSV logger (not TensorBoard event files)
    run_dir = judged_run.parents[2]
    (metrics,) = (run_dir.parent).rglob("eval/metrics-*.json")
    judged = json.loads(metrics.read_text())
    assert [s["steps"] for s in judged["settings"]] == [1, 2, 4]
    assert all("shapes_overall" in s["metrics"] for s in judged["settings"]), judged
    assert list(metrics.parent.glob("*.png")), "no grid"
    assert not list(run_dir.parent.rglob("events.out.tfevents*")) and not (tmp_path / "lightning_logs").exists()
    # Lightning's advertising and deprecation noise is not shown
    for noise in ("Tip:", "litmodels", "LitLogger", "DeprecationWarning", "FutureWarning"):
        assert noise not in out + err, noise


def test_the_checkpoint_records_the_runs_logger_and_evaluation_callbacks(judged_run):
    ckpt = torch.load(judged_run, weights_only=True, map_location="cpu")
    recorded = ckpt["emf_judging_config"]
    assert recorded["logger"]["class_path"].endswith("CSVLogger")
    (callback,) = recorded["callbacks"]
    assert callback["class_path"].endswith("EvaluationCallback") and callback["init_args"]["num_samples"] == 4
