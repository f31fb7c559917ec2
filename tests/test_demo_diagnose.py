"""The demo's diagnosis stage on single objects, without a training run: rendered "samples" in place of a model's,
named by shapes.diagnosis like the compose demo's (tests/test_demo_compose.py runs the whole demo)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from emf_lightning.evaluation import HeldOutSet
from emf_lightning.shapes import render

from helpers import load_tool

demo = load_tool("demo")


def red_triangle(shape: str = "triangle", color: str = "red") -> dict:
    obj = {"shape": shape, "color": color, "size": "small", "x": 0.5, "y": 0.5}
    return {"objects": [obj], "relations": [], "category": "colors", "split": "heldout"}


def test_single_object_diagnosis_names_each_failure_and_labels_its_grid(tmp_path, monkeypatch, capsys):
    asked = red_triangle()
    drawn = [render(asked, 64), render(red_triangle(color="blue"), 64), render(red_triangle("square"), 64)]
    drawn.append(np.zeros((64, 64, 3), np.uint8))  # nothing drawn
    held = HeldOutSet(np.stack([drawn[0]] * 4), ["a red triangle"] * 4, [asked] * 4, [str(i) for i in range(4)])
    monkeypatch.setattr(demo, "held_out_set", lambda shards, n: held)
    monkeypatch.setattr(demo, "samples_of", lambda ckpt, held, steps: {s: np.stack(drawn) for s in steps})

    d = demo.diagnose(Path("unused.ckpt"), "unused", 4, tmp_path / "grids", single=True)

    assert d["failures_1step"] == {"colors": {"passed": 1, "nothing drawn": 1, "wrong shape": 1, "wrong colour": 1}}
    assert d["colour_present"] == 0.5  # the passed sample and the red square
    grid = Image.open(tmp_path / "grids" / "colors.png")  # real, 1, 2 and 4 steps, each cell 64 px x 4
    assert grid.width == 260 + 4 * (4 * 64 + 2) + 2
    demo.summarise({"diagnose": 1.0}, {}, tmp_path, {"heldout": d})
    out = capsys.readouterr().out
    assert "How 1-step heldout samples fail (of 4 scenes)" in out
    assert "prompted colour (any shape): 0.500" in out
    assert json.loads((tmp_path / "summary.json").read_text())["diagnosis_1step"]["heldout"]["n"] == 4
