"""`emf probe` end to end on encoders that need no weights (bow, label), shards, configs and `--encoder all`."""

import io
import json

import numpy as np
import pytest
import yaml
from PIL import Image

from emf_lightning.commands import probe as cmd
from emf_lightning.encoders import ENCODERS

SMALL = ["--n", "24", "--k", "2", "--pairs", "4", "--seed", "3"]


def _read_png(path):
    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size


def test_probe_bow_and_label_write_json_and_png(tmp_path, capsys):
    out = tmp_path / "probe"
    assert cmd.main(["--encoder", "bow,label", *SMALL, "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "Discriminability probe (k=2)" in text and "bow" in text and "label" in text
    report = json.loads((out / "probe.json").read_text())
    assert set(report["encoders"]) == {"bow", "label"}
    assert report["probe_set"]["retrieval_captions"] == 24
    for name in ("bow", "label"):
        m = report["encoders"][name]["metrics"]
        assert 0.0 <= m["retrieval/relevance_at_k"] <= m["retrieval/ideal_relevance_at_k"] <= 1.0
        assert 0.0 <= m["minimal_pairs/accuracy"] <= 1.0
        assert 1.0 <= m["effective_rank/pooled"] <= report["encoders"][name]["dim"]
    width, height = _read_png(out / "probe.png")
    assert width > 300 and height > 300


def test_probe_all_skips_encoders_without_weights(tmp_path, capsys, monkeypatch):
    # Keep the run fast and deterministic: bow (no weights) and t5 forced to "absent".
    for name in list(ENCODERS):
        if name not in ("bow", "t5"):
            monkeypatch.delitem(ENCODERS, name)
    monkeypatch.setattr(ENCODERS["t5"], "weights_available", classmethod(lambda cls, **kw: False))
    out = tmp_path / "all"
    assert cmd.main(["--encoder", "all", *SMALL, "--out", str(out), "--no-figure"]) == 0
    text = capsys.readouterr().out
    assert "skip t5: pretrained weights not found on this machine" in text
    report = json.loads((out / "probe.json").read_text())
    assert list(report["encoders"]) == ["bow"]
    assert report["skipped"] == {"t5": "pretrained weights not found on this machine"}
    assert not (out / "probe.png").exists()


def test_resolve_all_lists_a_skip_line_for_every_absent_encoder():
    lines = []
    chosen, skipped = cmd.resolve_encoders("all", {}, lines.append)
    first = {c: n for n, c in reversed(list(ENCODERS.items()))}  # aliases are probed once, under the first name
    # a feature-cache folder ("precomputed") is not a model to compare: never listed
    absent = [n for n, c in ENCODERS.items() if first[c] == n and n != "precomputed" and not c.weights_available()]
    assert sorted(skipped) == sorted(absent)
    assert lines == [f"skip {n}: pretrained weights not found on this machine" for n in ENCODERS if n in absent]
    assert "bow" in [c.name for c in chosen]


def test_probe_unknown_encoder_and_bad_arguments():
    with pytest.raises(SystemExit, match="unknown encoder nope"):
        cmd.main(["--encoder", "nope", *SMALL])
    with pytest.raises(SystemExit, match="1 <= k < n"):
        cmd.main(["--encoder", "bow", "--n", "24", "--k", "0"])
    with pytest.raises(SystemExit, match="--encoder-arg expects KEY=VALUE"):
        cmd.main(["--encoder", "bow", "--encoder-arg", "oops", *SMALL])


def test_probe_encoder_from_yaml_config(tmp_path):
    cls = ENCODERS["bow"]
    config = tmp_path / "bow_run.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": {
                    "class_path": "emf_lightning.training.EMFModule",
                    "init_args": {"encoder": {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": {}}},
                }
            }
        )
    )
    out = tmp_path / "cfg"
    assert cmd.main(["--encoder", str(config), *SMALL, "--out", str(out), "--no-figure"]) == 0
    report = json.loads((out / "probe.json").read_text())
    assert list(report["encoders"]) == ["bow_run"]
    empty = tmp_path / "empty.yaml"
    empty.write_text("trainer: {max_steps: 1}\n")
    with pytest.raises(SystemExit, match="no encoder class_path found"):
        cmd.main(["--encoder", str(empty), *SMALL])


def _png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _write_shards(path, with_spec: bool):
    import webdataset as wds

    from emf_lightning.probe.sets import sample_specs
    from emf_lightning.shapes import describe, paraphrases

    specs = sample_specs(10, seed=7)
    rng = np.random.default_rng(0)
    with wds.TarWriter(str(path)) as sink:
        for i, spec in enumerate(specs):
            sample = {
                "__key__": f"{i:06d}",
                "png": _png(i),
                "txt": "\n".join([describe(spec), *paraphrases(spec, 2, rng)][:2]),
            }
            if with_spec:
                sample["json"] = json.dumps(spec).encode()
            sink.write(sample)
        sink.write({"__key__": "nocaption", "png": _png(99)})  # skipped and counted
    return specs


def test_probe_on_shards_with_scene_specs(tmp_path):
    shard = tmp_path / "shapes-000000.tar"
    _write_shards(shard, with_spec=True)
    out = tmp_path / "shards"
    assert cmd.main(["--encoder", "bow", "--data", str(shard), "--n", "20", "--out", str(out), "--no-figure"]) == 0
    report = json.loads((out / "probe.json").read_text())
    summary = report["probe_set"]
    assert summary["retrieval_captions"] == 20
    assert summary["relevance_source"].startswith("scene spec")
    assert any("1 x sample without caption: skipped" in note for note in summary["notes"])
    assert "retrieval/relevance_at_k" in report["encoders"]["bow"]["metrics"]


def test_probe_on_shards_without_specs_reports_missing_image_weights(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    shard = tmp_path / "plain-000000.tar"
    _write_shards(shard, with_spec=False)
    out = tmp_path / "plain"
    assert cmd.main(["--encoder", "bow", "--data", str(shard), "--n", "20", "--out", str(out), "--no-figure"]) == 0
    text = capsys.readouterr().out
    assert "image-feature relevance skipped" in text and "timm/vit_small_patch14_dinov2.lvd142m" in text
    report = json.loads((out / "probe.json").read_text())
    assert report["probe_set"]["relevance_source"] == "same image only (image-feature relevance skipped)"
    # With the weight-free pixel embedder chosen explicitly, relevance comes from images.
    assert (
        cmd.main(
            [
                "--encoder",
                "bow",
                "--data",
                str(shard),
                "--n",
                "20",
                "--image-encoder",
                "pixels",
                "--out",
                str(out),
                "--no-figure",
            ]
        )
        == 0
    )
    report = json.loads((out / "probe.json").read_text())
    assert report["probe_set"]["relevance_source"].startswith("image features (pixels)")


def test_probe_feature_cache_reuses_features(tmp_path):
    args = ["--encoder", "bow", *SMALL, "--no-figure", "--feature-cache", str(tmp_path / "cache")]
    assert cmd.main([*args, "--out", str(tmp_path / "a")]) == 0
    assert any((tmp_path / "cache").iterdir())
    assert cmd.main([*args, "--out", str(tmp_path / "b")]) == 0
    first = json.loads((tmp_path / "a" / "probe.json").read_text())["encoders"]["bow"]["metrics"]
    second = json.loads((tmp_path / "b" / "probe.json").read_text())["encoders"]["bow"]["metrics"]
    assert first == second
