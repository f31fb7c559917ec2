"""tools/side_by_side.py: a fitted run judged again under a sampling-time setting (``--judge-set``, ``--tag``) keeps
its fit and its first judgement, and passes the setting to ``emf validate``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import load_tool

tool = load_tool("side_by_side")


def _fitted_run(out: Path) -> Path:
    run = out / "R"
    (run / "logs").mkdir(parents=True)
    (run / "logs" / "last.ckpt").write_bytes(b"")
    (run / "fit_seconds").write_text("12.0")
    (run / "results.json").write_text('{"first": "judgement"}')
    return run


def test_a_fitted_run_is_judged_again_with_the_setting_under_its_tag(tmp_path, monkeypatch):
    run = _fitted_run(tmp_path)
    commands = []

    def fake_run(cmd, **kwargs):  # what `emf validate` would write: one metrics file in its root dir
        commands.append(cmd)
        assert cmd[1] == "validate", "a fitted run is not fitted again"
        folder = Path(next(c for c in cmd if c.startswith("--trainer.default_root_dir=")).split("=", 1)[1])
        folder.mkdir(parents=True)
        metrics = {"shapes_overall": 0.5 if folder.name.startswith("eval_val") else 0.25}
        (folder / "metrics-step1.json").write_text(json.dumps({"settings": [{"steps": 1, "metrics": metrics}]}))

    monkeypatch.setattr(tool.subprocess, "run", fake_run)
    args = ["R", "--out", str(tmp_path), "--wordings", "none", "--judge-set", "model.layout_spacing=0.45"]
    assert tool.main([*args, "--tag", "_spaced"]) == 0
    assert len(commands) == 2 and all("--model.layout_spacing=0.45" in cmd for cmd in commands)
    result = json.loads((run / "results_spaced.json").read_text())
    assert result["val"]["1"]["shapes_overall"] == 0.5 and result["heldout"]["1"]["shapes_overall"] == 0.25
    assert (run / "eval_val_spaced").is_dir() and not (run / "eval_val").exists()
    assert json.loads((run / "results.json").read_text()) == {"first": "judgement"}
    assert tool.main([*args, "--tag", "_spaced"]) == 0 and len(commands) == 2  # judged once per tag


def test_a_setting_without_a_tag_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        tool.main(["R", "--out", str(tmp_path), "--judge-set", "model.layout_spacing=0.45"])
    assert "name the judgement with --tag" in capsys.readouterr().err
