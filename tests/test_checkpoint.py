"""Save, load and resume: the step count, the EMA and the random streams continue exactly."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from emf_lightning.meanflow import MeanFlowLoss, TimeSampler
from emf_lightning.training import EMFModule

from helpers import FixedBatches, HashWordEncoder, shapes_batch, tiny_module

STEPS = 3  # one epoch = STEPS fixed batches; the resumed run starts exactly at an epoch boundary


def fresh_module() -> EMFModule:
    # Same initial weights for every run; progress schedules over the full 2N steps in all runs.
    torch.manual_seed(0)
    return tiny_module(
        optim={"schedule_steps": 2 * STEPS, "warmup_steps": 2},
        loss=MeanFlowLoss(TimeSampler(mu=(-0.5, 0.5), neq_ratio=(0.25, 0.75))),
    )


def run(module: EMFModule, max_steps: int, ckpt_dir: Path | None = None, ckpt_path: str | None = None) -> pl.Trainer:
    batches = [shapes_batch(2, 16, seed=s) for s in range(STEPS)]
    callbacks = []
    if ckpt_dir is not None:
        callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, filename="{step}", every_n_train_steps=STEPS, save_top_k=-1))
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=ckpt_dir is not None,
        callbacks=callbacks,
        gradient_clip_val=1.0,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, torch.utils.data.DataLoader(FixedBatches(batches), batch_size=None), ckpt_path=ckpt_path)
    return trainer


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An uninterrupted 2N-step run, an N-step run with a checkpoint, and its resumption to 2N."""
    ckpt_dir = tmp_path_factory.mktemp("ckpt")
    whole = fresh_module()
    run(whole, 2 * STEPS)
    first = fresh_module()
    run(first, STEPS, ckpt_dir=ckpt_dir)
    ckpt = ckpt_dir / f"step={STEPS}.ckpt"
    resumed = fresh_module()
    trainer = run(resumed, 2 * STEPS, ckpt_path=str(ckpt))
    return {"whole": whole, "first": first, "resumed": resumed, "trainer": trainer, "ckpt": ckpt}


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_resume_continues_step_count(runs):
    assert runs["trainer"].global_step == 2 * STEPS
    ckpt = torch.load(runs["ckpt"], weights_only=True)  # hyper-parameters are plain data
    assert ckpt["global_step"] == STEPS


def test_resumed_run_equals_uninterrupted_run(runs):
    # Same weights, EMA and optimiser trajectory: the per-step random streams depend only on (seed, step).
    _assert_same_weights(runs["resumed"].generator, runs["whole"].generator)
    _assert_same_weights(runs["resumed"].ema_generator, runs["whole"].ema_generator)
    assert not torch.equal(  # and the EMA is not just a copy of the weights
        next(runs["whole"].generator.parameters()), next(runs["whole"].ema_generator.parameters())
    )


def test_checkpoint_holds_ema_and_no_encoder_weights(runs):
    state = torch.load(runs["ckpt"], weights_only=True)["state_dict"]
    assert any(k.startswith("ema_generator.") for k in state)
    assert not any(k.startswith("encoder") or "table" in k for k in state)
    ema = {k[len("ema_generator.") :]: v for k, v in state.items() if k.startswith("ema_generator.")}
    for k, v in runs["first"].ema_generator.state_dict().items():
        assert torch.equal(ema[k], v), k


def test_load_from_checkpoint_rebuilds_the_encoder_from_its_spec(runs):
    loaded = EMFModule.load_from_checkpoint(runs["ckpt"], map_location="cpu")
    assert isinstance(loaded.encoder, HashWordEncoder) and loaded.encoder.width == 16
    assert loaded.hparams["encoder"]["class_path"] == "helpers.HashWordEncoder"
    _assert_same_weights(loaded.ema_generator, runs["first"].ema_generator)
    captions = ["a red circle", "two blue squares"]
    assert torch.equal(loaded.generate(captions, steps=2, seed=3), runs["first"].generate(captions, steps=2, seed=3))


def test_load_from_checkpoint_accepts_an_encoder_instance(runs):
    loaded = EMFModule.load_from_checkpoint(runs["ckpt"], map_location="cpu", encoder=HashWordEncoder())
    assert loaded.hparams["encoder"]["class_path"] == "helpers.HashWordEncoder"
    _assert_same_weights(loaded.generator, runs["first"].generator)


@pytest.mark.parametrize("max_steps", [5, 6])
def test_last_checkpoint_holds_the_final_weights_when_max_steps_is_off_the_interval(max_steps, tmp_path):
    from emf_lightning.callbacks.checkpoint import FinalModelCheckpoint

    torch.manual_seed(0)
    module = tiny_module()
    ckpt = FinalModelCheckpoint(
        dirpath=tmp_path, filename="{step}", every_n_train_steps=3, save_last=True, save_top_k=-1
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        logger=False,
        callbacks=[ckpt],
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    batches = [shapes_batch(2, 16, seed=s) for s in range(3)]
    trainer.fit(module, torch.utils.data.DataLoader(FixedBatches(batches), batch_size=None))
    last = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert last["global_step"] == max_steps  # 5: after the step-3 file; 6: written once, on the interval
    saved = {k.removeprefix("generator."): v for k, v in last["state_dict"].items() if k.startswith("generator.")}
    for name, value in module.generator.state_dict().items():
        assert torch.equal(saved[name], value), name
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["last.ckpt", "step=3.ckpt"] + (["step=6.ckpt"] if max_steps == 6 else [])
    )


def test_checkpoints_that_recorded_retired_options_still_load():
    """Options removed since (interval_scale, qk_norm, prefetch_factor, caption_dropout) are dropped when they hold the
    value that behaves as the code does now; any other value would change the run and is refused."""
    from emf_lightning.checkpoint_config import config_from_checkpoint
    from emf_lightning.training.checkpoint_format import (
        FORMAT_KEY,
        FORMAT_VERSION,
        CheckpointFormatError,
        module_hyperparameters,
    )

    sana = "emf_lightning.models.diffusers_adapter.SanaMeanFlowBackbone"
    ckpt = {
        FORMAT_KEY: FORMAT_VERSION,
        "hyper_parameters": {"backbone": {"class_path": sana, "init_args": {"config": "tiny", "interval_scale": None}}},
        "datamodule_hyper_parameters": {"batch_size": 4, "prefetch_factor": None, "caption_dropout": 0.0},
    }
    config = config_from_checkpoint(ckpt)
    assert config["model"]["backbone"]["init_args"] == {"config": "tiny"}
    assert config["data"] == {"batch_size": 4}
    ckpt["datamodule_hyper_parameters"]["caption_dropout"] = 0.1
    with pytest.raises(CheckpointFormatError, match="caption_dropout"):
        config_from_checkpoint(ckpt)
    dit = {"class_path": "emf_lightning.models.DiT", "init_args": {"preset": "tiny", "qk_norm": True}}
    converted = module_hyperparameters({FORMAT_KEY: FORMAT_VERSION, "hyper_parameters": {"backbone": dit}})
    assert converted["backbone"]["init_args"] == {"preset": "tiny"}
    dit["init_args"]["qk_norm"] = False  # a model without QK-norm cannot be rebuilt any more
    with pytest.raises(CheckpointFormatError, match="qk_norm"):
        module_hyperparameters({FORMAT_KEY: FORMAT_VERSION, "hyper_parameters": {"backbone": dit}})
