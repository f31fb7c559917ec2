"""EvaluationCallback end to end with a real Lightning Trainer and a stand-in generator."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from lightning.pytorch import LightningDataModule, Trainer
from lightning.pytorch.loggers.logger import Logger
from PIL import Image
from torch.utils.data import DataLoader

from emf_lightning.callbacks.evaluation import EvaluationCallback
from emf_lightning.evaluation import metric_key
from emf_lightning.evaluation.fid import extract_features, frechet_distance
from emf_lightning.utils.images import to_uint8

from helpers import (
    EVAL_RES,
    CountingFeatures,
    LookupGenerator,
    MeanPixelShapes,
    StandInModule,
    eval_items,
    expected_clip,
    mean_colour_clip,
)


# ---------------------------------------------------------------- stand-ins
def _collate(items: list[dict]) -> dict:
    return {
        "image": torch.stack([x["image"] for x in items]),
        "caption": [x["caption"] for x in items],
        "spec": [x["spec"] for x in items],
        "key": [x["key"] for x in items],
    }


class ListDataModule(LightningDataModule):
    def __init__(self, items: list[dict], val_shards: str | None = None):
        super().__init__()
        self.items = items
        self.val_shards = val_shards

    def train_dataloader(self):
        return DataLoader(self.items, batch_size=2, collate_fn=_collate)

    def val_dataloader(self):
        return DataLoader(self.items, batch_size=4, collate_fn=_collate)


class StandInGenerator(StandInModule):
    """A LightningModule around LookupGenerator: the real image for each caption, or seeded noise."""

    def __init__(self, items: list[dict], mode: str = "real", objective: str = "meanflow"):
        super().__init__()
        self.stand_in = LookupGenerator(items, mode, objective)
        self.objective, self.calls = self.stand_in.objective, self.stand_in.calls

    def generate(self, *args, **kwargs):
        return self.stand_in.generate(*args, **kwargs)


class RecordingLogger(Logger):
    def __init__(self, root):
        super().__init__()
        self._root = str(root)
        self.metrics: list[tuple[int | None, dict]] = []
        self.images: list[tuple[str, np.ndarray, int | None]] = []

    @property
    def name(self):
        return "rec"

    @property
    def version(self):
        return 0

    @property
    def save_dir(self):
        return self._root

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.metrics.append((step, dict(metrics)))

    def log_image(self, key, images, step=None, **kwargs):
        self.images.append((key, images[0], step))


def _callback(**kw) -> EvaluationCallback:
    args = dict(
        every_n_steps=2,
        num_samples=5,
        batch_size=2,
        grid_prompts=3,
        grid_upscale=2,
        kid_subsets=3,
        fid_feature_extractor=CountingFeatures(),
        clip_scorer=mean_colour_clip(),
        shapes_evaluator=MeanPixelShapes(),
    )
    args.update(kw)
    return EvaluationCallback(**args)


def _trainer(tmp_path, callback, logger=None, max_steps=4, limit_val_batches=0) -> Trainer:
    return Trainer(
        default_root_dir=tmp_path,
        max_steps=max_steps,
        callbacks=[callback],
        logger=logger if logger is not None else False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=limit_val_batches,
        accelerator="cpu",
    )


METRICS = ("fid", "kid", "kid_std", "clip_score", "shapes_overall", "shapes_n")


# ---------------------------------------------------------------- fit: every metric at every step count
def test_fit_logs_every_metric_per_step_count_and_writes_grid_and_json(tmp_path):
    items = eval_items()
    logger = RecordingLogger(tmp_path / "logs")
    cb = _callback()
    module = StandInGenerator(items, mode="real")
    _trainer(tmp_path, cb, logger).fit(module, datamodule=ListDataModule(items))

    evals = [(step, m) for step, m in logger.metrics if any(k.startswith("eval/") for k in m)]
    assert [step for step, _ in evals] == [2, 4]
    metrics = evals[-1][1]
    for steps in (1, 2, 4):
        for name in METRICS:
            assert metric_key(name, steps, 1.0) in metrics, (name, steps)
    assert "eval/fid@1step_cfg1.0" in metrics  # the naming scheme, spelled out once
    assert set(metrics) >= {"eval/clip_score@real", "eval/shapes_overall@real", "eval/shapes_n@real"}

    # The generator returns the real images: FID is 0 and the scores equal the real-image ceiling.
    held = [x["image"] for x in items[:5]]
    captions = [x["caption"] for x in items[:5]]
    for steps in (1, 2, 4):
        assert abs(metrics[metric_key("fid", steps)]) < 1e-4
        assert metrics[metric_key("clip_score", steps)] == pytest.approx(expected_clip(torch.stack(held), captions))
        assert metrics[metric_key("shapes_overall", steps)] == pytest.approx(metrics["eval/shapes_overall@real"])
        assert metrics[metric_key("shapes_n", steps)] == 5.0
    assert metrics["eval/shapes_overall@real"] == pytest.approx(to_uint8(torch.stack(held)).mean() / 255.0)

    # Generation: EMA weights, each step count, seed = seed + batch index (batches of 2 over 5 prompts).
    first_eval = module.calls[: 3 * 3]
    assert [(c[1], c[3], c[4]) for c in first_eval] == [(s, b, True) for s in (1, 2, 4) for b in (0, 1, 2)]
    assert first_eval[2][0] == ("prompt number 4",)

    # Grid: 3 prompt rows x (real + 3 settings), cells 8 px * 2, 200 px labels, two text lines of header.
    grid_path = tmp_path / "logs" / "eval" / "grid-step00000004.png"
    assert grid_path.is_file()
    grid = Image.open(grid_path)
    cell = EVAL_RES * 2
    assert grid.width == 200 + 4 * (cell + 2) + 2
    assert grid.height > 3 * (cell + 2) + 2  # plus the header margin
    assert [key for key, _, step in logger.images] == ["eval/samples", "eval/samples"]
    assert logger.images[-1][1].shape == (grid.height, grid.width, 3)

    payload = json.loads((tmp_path / "logs" / "eval" / "metrics-step00000004.json").read_text())
    assert payload["global_step"] == 4 and payload["num_samples"] == 5 and payload["grid"] == grid_path.name
    assert payload["metrics"] == pytest.approx(metrics)
    assert [(s["steps"], s["cfg_scale"]) for s in payload["settings"]] == [(1, 1.0), (2, 1.0), (4, 1.0)]
    assert payload["skipped"] == {}


def test_noise_generator_scores_worse_and_fid_matches_a_direct_computation(tmp_path):
    items = eval_items()
    cb = _callback(every_n_steps=1, num_samples=6, batch_size=4, steps=(1,), cfg_scales=(1.0, 2.0))
    module = StandInGenerator(items, mode="noise")
    _trainer(tmp_path, cb, max_steps=1).fit(module, datamodule=ListDataModule(items))
    result = cb.last_result
    assert [(s, g) for s, g in result.settings] == [(1, 1.0), (1, 2.0)]
    flat = result.flat()
    # Independent: the same noise (seeds 0 and 1 for batches of 4 and 2) through the same extractor.
    fake = torch.cat(
        [
            module.generate([x["caption"] for x in items[0:4]], seed=0),
            module.generate([x["caption"] for x in items[4:6]], seed=1),
        ]
    )
    ext = CountingFeatures()
    real_f = extract_features(ext, to_uint8(torch.stack([x["image"] for x in items])))
    fake_f = extract_features(ext, to_uint8(fake))
    assert flat["eval/fid@1step_cfg1.0"] == pytest.approx(frechet_distance(real_f, fake_f), rel=1e-6)
    assert flat["eval/fid@1step_cfg1.0"] > 1e-3
    assert flat["eval/fid@1step_cfg2.0"] == pytest.approx(flat["eval/fid@1step_cfg1.0"])  # stand-in ignores cfg


def test_flow_matching_objective_defaults_to_fifty_steps_too(tmp_path):
    items = eval_items()
    cb = _callback(every_n_steps=1, fid=False, clip_score=False, grid_prompts=0)
    _trainer(tmp_path, cb, max_steps=1).fit(
        StandInGenerator(items, objective="flow_matching"), datamodule=ListDataModule(items)
    )
    assert [s for s, _ in cb.last_result.settings] == [1, 2, 4, 50]
    assert "eval/shapes_overall@50step_cfg1.0" in cb.last_result.flat()
    assert not any(k.startswith("eval/fid") or k.startswith("eval/clip") for k in cb.last_result.flat())


# ---------------------------------------------------------------- validate: table, JSON, missing weights
def test_validate_prints_table_writes_json_and_warns_once_per_missing_model(tmp_path, monkeypatch, capsys):
    # No Inception, no CLIP anywhere: isolate every default cache.
    monkeypatch.setenv("EMF_CACHE", str(tmp_path / "emf"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "tmp"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    items = eval_items()
    cb = _callback(fid_feature_extractor=None, clip_scorer=None, output_dir=str(tmp_path / "out"))
    module = StandInGenerator(items)
    trainer = _trainer(tmp_path, cb, limit_val_batches=1)
    dm = ListDataModule(items)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = trainer.validate(module, datamodule=dm, verbose=False)
        trainer.validate(module, datamodule=dm, verbose=False)
    messages = [str(w.message) for w in caught if "EvaluationCallback: skipping" in str(w.message)]
    assert len([m for m in messages if "skipping fid" in m]) == 1
    assert len([m for m in messages if "skipping clip_score" in m]) == 1
    assert len(messages) == 2
    fid_msg = next(m for m in messages if "skipping fid" in m)
    assert "inception-2015-12-05.pt" in fid_msg and str(tmp_path / "emf") in fid_msg
    clip_msg = next(m for m in messages if "skipping clip_score" in m)
    assert "timm/vit_base_patch32_clip_224.openai" in clip_msg

    # ShapesEval still runs, and validate() returns the logged numbers.
    assert first[0]["eval/shapes_overall@1step_cfg1.0"] == pytest.approx(first[0]["eval/shapes_overall@real"])
    assert not any("fid" in k or "clip" in k for k in first[0])
    out = capsys.readouterr().out
    assert "Evaluation at step 0" in out and "shapes_overall" in out and "real data" in out
    payload = json.loads((tmp_path / "out" / "metrics-step00000000.json").read_text())
    assert set(payload["skipped"]) == {"fid", "clip_score"}
    assert payload["feature_extractor"] is None and payload["clip_model"] is None
    assert (tmp_path / "out" / "grid-step00000000.png").is_file()


def test_reference_features_are_cached_on_disk_per_dataset(tmp_path):
    items = eval_items()
    dm = ListDataModule(items, val_shards="/data/val-{000000..000001}.tar")
    runs = []
    for _ in range(2):
        ext = CountingFeatures(feature_id="counting-v1")
        cb = _callback(
            every_n_steps=1,
            steps=(1,),
            clip_scorer=None,
            clip_score=False,
            fid_feature_extractor=ext,
            reference_cache_dir=str(tmp_path / "refs"),
        )
        _trainer(tmp_path, cb, max_steps=1).fit(StandInGenerator(items), datamodule=dm)
        runs.append((ext.seen, cb.last_result.flat()["eval/fid@1step_cfg1.0"]))
    assert runs[0][0] == 5 + 5  # real images + one setting's samples
    assert runs[1][0] == 5  # real features came from the cache
    assert runs[0][1] == pytest.approx(runs[1][1])
    assert len(list((tmp_path / "refs").glob("*.npz"))) == 1


def test_no_specs_means_no_shapes_eval_and_no_warning(tmp_path):
    items = eval_items()
    for x in items:
        x["spec"] = None
    cb = _callback(every_n_steps=1, shapes_evaluator=None, fid=False, clip_score=False, grid_prompts=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _trainer(tmp_path, cb, max_steps=1).fit(StandInGenerator(items), datamodule=ListDataModule(items))
    assert not [w for w in caught if "EvaluationCallback" in str(w.message)]
    assert cb.last_result.flat() == {}
    assert "shapes" in cb.last_result.skipped


def test_constructor_rejects_bad_arguments():
    with pytest.raises(ValueError, match="steps must be a non-empty list of integers >= 1"):
        EvaluationCallback(steps=(0, 1))
    with pytest.raises(ValueError, match="num_samples must be >= 1"):
        EvaluationCallback(num_samples=0)


# ---------------------------------------------------------------- integration: real EMFModule + ShardDataModule
@pytest.mark.slow
def test_real_module_and_shard_datamodule_fit_then_validate(tmp_path):
    from emf_lightning.data.datamodule import ShardDataModule

    from helpers import tiny_module, write_shapes_shards

    urls = write_shapes_shards(tmp_path / "shards", n_train=8, n_val=4, resolution=16)
    dm = ShardDataModule(
        train_shards=urls["train"], val_shards=urls["val"], batch_size=4, image_size=16, num_workers=0, epoch_length=8
    )
    from emf_lightning.shapes import ShapesEval

    module = tiny_module()
    shapes_res = {}

    class Recording(ShapesEval):
        def evaluate(self, images, specs):
            shapes_res["shape"] = images.shape
            shapes_res["specs"] = specs
            return super().evaluate(images, specs)

    cb = EvaluationCallback(
        every_n_steps=2,
        num_samples=4,
        batch_size=4,
        steps=(1, 2),
        clip_score=False,
        fid_feature_extractor=CountingFeatures(),
        shapes_evaluator=Recording(),
        grid_prompts=2,
        kid_subsets=2,
        reference_cache_dir=str(tmp_path / "refs"),
    )
    trainer = Trainer(
        default_root_dir=tmp_path,
        max_steps=2,
        max_epochs=1,
        callbacks=[cb],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        accelerator="cpu",
    )
    trainer.fit(module, datamodule=dm)
    fit_result = cb.last_result
    assert fit_result is not None and fit_result.global_step == 2
    assert set(fit_result.flat()) >= {metric_key(m, s) for m in ("fid", "kid", "shapes_overall") for s in (1, 2)}
    assert shapes_res["shape"] == (4, 16, 16, 3)
    assert all(isinstance(spec, dict) and "objects" in spec for spec in shapes_res["specs"])
    # The real ShapesEval reads the real held-out images perfectly: the ceiling row is 1.0.
    assert fit_result.flat()["eval/shapes_overall@real"] == 1.0

    # validate reuses nothing from fit but the weights; same seed -> same samples -> same numbers.
    cb2 = EvaluationCallback(
        num_samples=4,
        batch_size=4,
        steps=(1, 2),
        clip_score=False,
        fid_feature_extractor=CountingFeatures(),  # default ShapesEval this time
        grid_prompts=2,
        kid_subsets=2,
        output_dir=str(tmp_path / "val"),
    )
    # max_steps as the YAML configs set it: EMFModule.progress() asserts on a Trainer with neither limit.
    val_trainer = Trainer(
        default_root_dir=tmp_path,
        max_steps=2,
        callbacks=[cb2],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=1,
        accelerator="cpu",
    )
    out = val_trainer.validate(module, datamodule=dm, verbose=False)[0]
    for key, value in fit_result.flat().items():
        assert out[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    assert (tmp_path / "val" / "grid-step00000000.png").is_file()
    assert (tmp_path / "val" / "metrics-step00000000.json").is_file()


def test_grid_goes_to_tensorboard_style_and_log_image_loggers(tmp_path):
    class Writer:  # the SummaryWriter surface TensorBoardLogger.experiment exposes
        def __init__(self):
            self.calls = []

        def add_image(self, tag, image, step, dataformats="CHW"):
            self.calls.append((tag, image.shape, step, dataformats))

    class TBLike:
        def __init__(self):
            self.experiment = Writer()

    class Plain:  # CSVLogger-like: no image support, must be left alone
        experiment = object()

    rec, tb = RecordingLogger(tmp_path), TBLike()
    path = tmp_path / "g.png"
    Image.fromarray(np.zeros((5, 7, 3), np.uint8)).save(path)

    class FakeTrainer:
        loggers = [rec, tb, Plain()]

    EvaluationCallback._log_image(FakeTrainer(), path, step=3)
    assert tb.experiment.calls == [("eval/samples", (5, 7, 3), 3, "HWC")]
    assert [(k, img.shape, s) for k, img, s in rec.images] == [("eval/samples", (5, 7, 3), 3)]


def test_validate_from_a_checkpoint_names_outputs_by_the_checkpoint_step():
    from types import SimpleNamespace

    from lightning.pytorch.trainer.states import TrainerFn

    cb = EvaluationCallback()
    validating = SimpleNamespace(state=SimpleNamespace(fn=TrainerFn.VALIDATING), global_step=0)
    fitting = SimpleNamespace(state=SimpleNamespace(fn=TrainerFn.FITTING), global_step=7)
    assert cb._model_step(validating) == 0
    cb.on_load_checkpoint(validating, None, {"global_step": 1234})
    assert cb._model_step(validating) == 1234
    assert cb._model_step(fitting) == 7  # a resumed fit counts on from the trainer


@pytest.mark.parametrize("max_steps, on_train_end, expected", [(5, True, [4, 5]), (5, False, [4]), (4, True, [4])])
def test_on_train_end_evaluates_final_weights_once(tmp_path, max_steps, on_train_end, expected):
    """A run that ends off the every_n_steps grid (max_time, interrupt) still reports its final weights,
    and a run ending on the grid is not evaluated twice."""
    items = eval_items()
    callback = _callback(every_n_steps=4, on_train_end=on_train_end, output_dir=str(tmp_path / "eval"))
    _trainer(tmp_path, callback, max_steps=max_steps).fit(StandInGenerator(items), ListDataModule(items))
    written = sorted(int(p.stem.removeprefix("metrics-step")) for p in (tmp_path / "eval").glob("metrics-*.json"))
    assert written == expected


def test_sampling_progress_advances_once_per_generation_batch_and_names_each_setting(tmp_path, monkeypatch):
    from contextlib import contextmanager

    import emf_lightning.evaluation.evaluator as evaluation
    from emf_lightning.utils.progress import Advance

    bars = []

    class Recording(Advance):
        def __call__(self, n=1, description=None):
            super().__call__(n, description)
            if description:
                self.descriptions.append(description)

    @contextmanager
    def recording_progress(description, total=None, **kwargs):
        advance = Recording()
        advance.descriptions = [description]
        bars.append((total, kwargs, advance))
        yield advance

    monkeypatch.setattr(evaluation, "progress", recording_progress)
    items = eval_items()
    _trainer(tmp_path, _callback(every_n_steps=4)).fit(StandInGenerator(items), datamodule=ListDataModule(items))
    # 5 prompts in batches of 2 -> 3 generation batches, for each of 1, 2 and 4 steps.
    ((total, kwargs, advance),) = bars
    assert total == 9 and advance.completed == 9 and kwargs == {"enabled": True}
    assert advance.descriptions == [
        "evaluation",
        "evaluation: 1 step, cfg 1.0",
        "evaluation: 2 steps, cfg 1.0",
        "evaluation: 4 steps, cfg 1.0",
    ]
