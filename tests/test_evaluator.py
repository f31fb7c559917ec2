"""The Evaluator used directly, without a Trainer: scores against hand-computed values, one process against two
(gloo), the distributed helpers, the result's outputs and the metric report."""

from __future__ import annotations

import json
import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image
from rich.console import Console

from emf_lightning.evaluation import Evaluator, HeldOutSet, Processes, collect_held_out, write_outputs
from emf_lightning.evaluation.distributed import batch_plan, gather_in_order
from emf_lightning.evaluation.fid import extract_features, frechet_distance
from emf_lightning.shapes import ShapesWorld
from emf_lightning.utils.images import from_uint8, to_uint8
from emf_lightning.utils.report import format_value, metrics_table, table_width, write_metrics_json

from helpers import CountingFeatures, LookupGenerator, MeanPixelShapes, eval_items, mean_colour_clip


def _held(items: list[dict], source: list[str] | None = None) -> HeldOutSet:
    return HeldOutSet(
        to_uint8(torch.stack([x["image"] for x in items])),
        [x["caption"] for x in items],
        [x["spec"] for x in items],
        [x["key"] for x in items],
        source,
    )


# ---------------------------------------------------------------- no Trainer
def test_a_generator_returning_the_real_images_scores_shapes_eval_1_and_fid_0(tmp_path):
    world = ShapesWorld(seed=0, resolution=32, split="val", size=6)
    items = [
        {"image": from_uint8(s.image), "caption": s.caption, "spec": s.spec, "key": s.key}
        for s in (world[i] for i in range(6))
    ]
    held, model = _held(items), LookupGenerator(items, mode="real")
    evaluator = Evaluator(
        steps=(1, 2),
        batch_size=4,
        kid_subsets=3,
        clip_score=False,
        keep_images=3,
        fid_feature_extractor=CountingFeatures(),
    )  # the real ShapesEval
    result = evaluator.evaluate(model, held)  # torch.distributed not initialised: one process
    assert [label for label in result.rows] == ["real", "1 step, cfg 1.0", "2 steps, cfg 1.0"]
    for label in ("real", "1 step, cfg 1.0", "2 steps, cfg 1.0"):
        assert result.rows[label]["shapes_overall"] == 1.0, label
    for label in ("1 step, cfg 1.0", "2 steps, cfg 1.0"):
        assert abs(result.rows[label]["fid"]) < 1e-4 and {"kid", "kid_std"} <= set(result.rows[label])
        assert np.array_equal(result.images[label], held.images[:3])
    # seed + batch index, every setting: batches of 4 and 2
    assert [(len(c[0]), c[1], c[3]) for c in model.calls] == [(4, 1, 0), (2, 1, 1), (4, 2, 0), (2, 2, 1)]
    assert result.skipped == {} and result.feature_extractor == "CountingFeatures" and result.clip_model is None

    result.global_step = 12
    write_outputs(result, held, tmp_path, grid_prompts=2, grid_upscale=1, epoch=0)
    payload = json.loads((tmp_path / "metrics-step00000012.json").read_text())
    assert payload["metrics"] == pytest.approx(result.flat()) and payload["epoch"] == 0
    assert payload["num_samples"] == 6 and payload["grid"] == "grid-step00000012.png"
    assert [s["steps"] for s in payload["settings"]] == [1, 2]
    assert Image.open(tmp_path / "grid-step00000012.png").width == 200 + 3 * (32 + 2) + 2  # labels + real + 2


def test_noise_fid_matches_a_direct_computation_and_the_real_row_is_computed_once():
    items = eval_items(5)
    held, extractor = _held(items), CountingFeatures()
    evaluator = Evaluator(
        steps=(1,),
        cfg_scales=(1.0, 3.0),
        batch_size=2,
        kid_subsets=3,
        clip_scorer=mean_colour_clip(),
        fid_feature_extractor=extractor,
        shapes_evaluator=MeanPixelShapes(),
    )
    model = LookupGenerator(items, mode="noise")
    first, second = evaluator.evaluate(model, held), evaluator.evaluate(model, held)
    fake = torch.cat(
        [model.generate([x["caption"] for x in items[a : a + 2]], seed=b) for b, a in enumerate(range(0, 5, 2))]
    )
    reference = CountingFeatures()
    direct = frechet_distance(extract_features(reference, held.images), extract_features(reference, to_uint8(fake)))
    assert first.rows["1 step, cfg 1.0"]["fid"] == pytest.approx(direct, rel=1e-6) and direct > 1e-3
    assert first.rows == second.rows
    assert extractor.seen == 5 + 2 * 2 * 5  # the real images once, then 2 settings x 2 evaluations


def test_without_cfg_scales_a_model_is_judged_at_its_own_sampling_scale():
    items = eval_items(2)
    model = LookupGenerator(items)
    evaluator = Evaluator(steps=(1,), fid=False, clip_score=False, shapes_evaluator=MeanPixelShapes())
    assert evaluator.settings_for(model) == [(1, 1.0)]  # no hparams: unguided
    model.hparams = {"cfg_scale": 2.5}
    result = evaluator.evaluate(model, _held(items))
    assert result.settings == [(1, 2.5)] and {c[1:3] for c in model.calls} == {(1, 2.5)}
    assert Evaluator(steps=(1,), cfg_scales=(1.0,)).settings_for(model) == [(1, 1.0)]  # an explicit list wins
    with pytest.raises(ValueError, match="must not be empty"):
        Evaluator(cfg_scales=())


# ---------------------------------------------------------------- two processes
def _evaluator() -> Evaluator:
    return Evaluator(
        steps=(1, 2),
        batch_size=2,
        kid_subsets=3,
        fid_feature_extractor=CountingFeatures(),
        clip_scorer=mean_colour_clip(),
        shapes_evaluator=MeanPixelShapes(),
        keep_images=None,
    )


class CollectiveLookup(LookupGenerator):
    """Says its forward is a collective (sharded weights), so every rank must call it equally often."""

    generation_is_collective = True


def _gloo_worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        model = CollectiveLookup(eval_items(5), mode="noise")
        result = _evaluator().evaluate(model, _held(eval_items(5)), Processes.from_torch_distributed())
        torch.save(
            {"rows": result.rows, "images": result.images, "calls": len(model.calls)},
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_give_the_one_process_result(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_gloo_worker, args=(port, str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    single = _evaluator().evaluate(CollectiveLookup(eval_items(5), mode="noise"), _held(eval_items(5)))
    # 5 captions in batches of 2: rank 0 has batches 0 and 2, rank 1 batch 1 and one padding call, per setting.
    assert [r["calls"] for r in ranks] == [4, 4]
    for r in ranks:
        assert r["rows"].keys() == single.rows.keys()
        for label, row in single.rows.items():
            # float32 features computed under other thread counts: equal to rounding
            assert r["rows"][label] == pytest.approx(row, rel=1e-5, abs=1e-9), label
        assert all(np.array_equal(r["images"][k], v) for k, v in single.images.items())


# ---------------------------------------------------------------- helpers
def test_batch_plan_covers_every_index_once_across_ranks():
    for world in (1, 2, 3):
        covered = sorted(i for r in range(world) for _, a, b in batch_plan(11, 3, r, world) for i in range(a, b))
        assert covered == list(range(11))
    assert batch_plan(11, 3, 1, 2) == [(1, 3, 6), (3, 9, 11)]


def test_gather_in_order_reassembles_two_simulated_ranks():
    total, bs, world = 7, 2, 2
    data = torch.arange(total * 3, dtype=torch.float32).reshape(total, 3)
    per_rank = []
    for r in range(world):
        idx = [i for _, a, b in batch_plan(total, bs, r, world) for i in range(a, b)]
        per_rank.append((data[idx], torch.tensor(idx)))
    max_rows = max(len(i) for _, i in per_rank)

    def padded(t, fill):
        pad = max_rows - t.shape[0]
        return torch.cat([t, t.new_full((pad, *t.shape[1:]), fill)])

    def fake_all_gather(t):  # what DDP's all_gather returns: [world, rows, ...] from every rank
        if t.dtype == torch.long:
            return torch.stack([padded(i, -1) for _, i in per_rank])
        return torch.stack([padded(rows, 0) for rows, _ in per_rank])

    rows0, idx0 = per_rank[0]
    out = gather_in_order(rows0, idx0, total, world, max_rows, fake_all_gather)
    assert torch.equal(out, data)


def test_collect_held_out_stops_at_n_and_skips_empty_captions():
    batches = [
        {"image": torch.zeros(2, 3, 4, 4), "caption": ["a", ""], "spec": [None, None], "key": ["0", "1"]},
        {"image": torch.ones(2, 3, 4, 4), "caption": ["b", "c"], "key": ["2", "3"]},
    ]
    held = collect_held_out(batches, n=2)
    assert held.captions == ["a", "b"] and held.keys == ["0", "2"] and held.specs == [None, None]
    assert held.images.shape == (2, 4, 4, 3) and held.images.dtype == np.uint8
    assert held.images[0].max() == 128 and held.images[1].min() == 255  # 0 -> 128, 1 -> 255 via to_uint8
    with pytest.raises(ValueError, match="no samples with a caption"):
        collect_held_out([{"image": torch.zeros(1, 3, 4, 4), "caption": [""]}], n=3)


def test_report_table_and_json(tmp_path):
    rows = {"1 step, cfg 1.0": {"fid": 12.345678, "clip_score": 30.0}, "real data": {"clip_score": 31.5, "n": 3}}
    console = Console(record=True, width=120)
    console.print(metrics_table(rows, title="t"))
    text = console.export_text()
    assert "12.35" in text and "31.5" in text and "-" in text  # the real row has no fid
    assert format_value(float("nan")) == "-" and format_value(None) == "-" and format_value(7) == "7"
    path = write_metrics_json(tmp_path / "m.json", {"fid": float("nan"), "x": np.float32(1.5), "t": torch.tensor(2.0)})
    assert json.loads(path.read_text()) == {"fid": None, "x": 1.5, "t": 2.0}


def test_table_width_fits_every_header_when_not_a_terminal():
    rows = {"1 step, cfg 1.0": {f"shapes_category_number_{i}": 0.5 for i in range(9)}, "real data": {"fid": 1.0}}
    width = table_width(rows)
    console = Console(record=True, width=width)
    console.print(metrics_table(rows))
    text = console.export_text()
    assert all(f"shapes_category_number_{i}" in text for i in range(9))
    assert "…" not in text
    narrow = Console(record=True, width=width - 20)
    narrow.print(metrics_table(rows))
    assert "shapes_category_number_8" not in narrow.export_text()  # would need folding: the width is tight


def test_the_evaluation_probe_and_shapes_packages_import_no_lightning():
    """The Evaluator is usable where Lightning is not wanted (a notebook, a tool): its packages never import it."""
    import subprocess
    import sys

    code = (
        "import sys, emf_lightning.evaluation, emf_lightning.probe, emf_lightning.shapes; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
