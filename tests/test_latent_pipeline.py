"""EMF's recipe end to end on tiny random models: cache-latents -> fit -> validate -> sample -> export -> reload.

A tiny AutoencoderKL (f2, 4 channels) and a tiny SANA transformer saved as a "pretrained" folder stand in for
DC-AE and SANA-1.6B; the same classes and code paths run.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from emf_lightning import cli
from emf_lightning.inference import MeanFlowGenerator
from emf_lightning.training import EMFModule

from helpers import BOW, write_shapes_shards

diffusers = pytest.importorskip("diffusers")
from emf_lightning.models.diffusers_adapter import SANA_CONFIGS  # noqa: E402  (needs diffusers)

VAE = {"class_path": "emf_lightning.autoencoders.KLAutoencoder", "init_args": {"pretrained": False}}
CAPTIONS = ["a red circle", "a small blue square"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("emf_recipe")
    torch.manual_seed(0)
    diffusers.SanaTransformer2DModel(**SANA_CONFIGS["tiny"]).save_pretrained(root / "sana" / "transformer")
    shards = write_shapes_shards(root / "pixels", n_train=8, n_val=4, resolution=16)
    for split in ("train", "val"):
        assert (
            cli.main(
                [
                    "cache-latents",
                    "--vae",
                    "sd-vae",
                    "--vae-arg",
                    "pretrained=false",
                    "--shards",
                    shards[split],
                    "--out",
                    str(root / "latents" / f"{split}-%06d.tar"),
                    "--image-size",
                    "16",
                    "--device",
                    "cpu",
                ]
            )
            == 0
        )
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_steps": 3,
            "logger": False,
            "precision": "32-true",
            "enable_progress_bar": False,
            "num_sanity_val_steps": 0,
            "limit_val_batches": 1,
            "val_check_interval": 3,
            "check_val_every_n_epoch": None,
            "default_root_dir": str(root / "run"),
            "callbacks": [
                {
                    "class_path": "emf_lightning.callbacks.checkpoint.FinalModelCheckpoint",
                    "init_args": {"dirpath": str(root / "ckpt"), "filename": "{step}", "save_last": True},
                }
            ],
        },
        "model": {
            "encoder": json.loads(BOW),
            "backbone": {
                "class_path": "emf_lightning.models.SanaMeanFlowBackbone",
                "init_args": {"model": str(root / "sana"), "trainable": "emf"},
            },
            "autoencoder": VAE,
            "loss": {
                "class_path": "emf_lightning.meanflow.MeanFlowLoss",
                "init_args": {"time_sampler": {"neq_ratio": 0.5}, "jvp_tangent": "predicted"},
            },
            "optim": {"lr": 1e-3, "ema_decay": 0.5},
            "feature_cache_dir": None,
            "cfg_scale": 1.5,
        },
        "data": {
            "train_shards": str(root / "latents" / "train-*.tar"),
            "val_shards": str(root / "latents" / "val-*.tar"),
            "batch_size": 4,
            "image_size": 16,
            "num_workers": 0,
            "epoch_length": 8,
            "load_latents": True,
        },
    }
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    assert cli.main(["fit", "--config", str(root / "config.yaml")]) == 0
    return {"root": root, "ckpt": root / "ckpt" / "last.ckpt"}


def test_checkpoint_leaves_out_the_frozen_pretrained_weights_and_loads_back(run):
    ckpt = torch.load(run["ckpt"], weights_only=True)
    rebuilt = ckpt["emf_rebuilt_keys"]
    assert rebuilt and all(k not in ckpt["state_dict"] for k in rebuilt)
    assert any(".pos_embed" in k or "patch_embed" in k for k in rebuilt)  # EMF's selection freezes the patch embed
    assert any("transformer_blocks" in k for k in ckpt["state_dict"])  # ... and trains the blocks
    module = EMFModule.load_from_checkpoint(run["ckpt"])
    assert module.data_shape == (4, 8, 8) and module.image_size == (16, 16)
    images = module.generate(CAPTIONS, steps=2, seed=3)
    assert images.shape == (2, 3, 16, 16) and images.abs().max() <= 1 and images.std() > 0


def test_validate_and_sample_run_from_the_checkpoint_alone(run, tmp_path, capsys):
    assert (
        cli.main(
            [
                "validate",
                "--ckpt",
                str(run["ckpt"]),
                "--trainer.logger=false",
                f"--trainer.default_root_dir={tmp_path}",
                "--trainer.enable_progress_bar=false",
                "--trainer.callbacks=[]",
            ]
        )
        == 0
    )
    assert "val/loss" in capsys.readouterr().out
    out = tmp_path / "grid.png"
    assert (
        cli.main(
            [
                "sample",
                "--ckpt",
                str(run["ckpt"]),
                "--prompt",
                CAPTIONS[0],
                "--steps",
                "1",
                "2",
                "--out",
                str(out),
                "--upscale",
                "1",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert Image.open(out).size[1] >= 16


def test_export_reloads_with_one_call_and_gives_identical_images(run, tmp_path):
    out = tmp_path / "export"
    assert cli.main(["export", "--ckpt", str(run["ckpt"]), "--out", str(out)]) == 0
    assert {p.name for p in out.iterdir()} >= {"config.json", "model.safetensors", "README.md", "transformer"}
    # diffusers alone loads the transformer folder, with the interval embedder in its guidance slot
    transformer = diffusers.SanaTransformer2DModel.from_pretrained(str(out / "transformer"))
    assert transformer.config.guidance_embeds
    module = EMFModule.load_from_checkpoint(run["ckpt"])
    exported = MeanFlowGenerator.from_pretrained(out)
    for steps in (1, 2):
        want = module.generate(CAPTIONS, steps=steps, cfg_scale=1.5, seed=7)
        got = exported.generate(CAPTIONS, steps=steps, cfg_scale=1.5, seed=7)
        assert torch.equal(got, want), steps
    assert exported.config["cfg_scale"] == 1.5
    card = (out / "README.md").read_text()
    assert "MeanFlowLoss, 3 optimiser steps" in card and "MeanFlowGenerator.from_pretrained" in card


def test_export_of_a_pixel_space_checkpoint_keeps_everything_in_safetensors(tmp_path):
    from emf_lightning.commands.export import export

    from helpers import tiny_module

    module = tiny_module()
    out = export(module, tmp_path / "px", global_step=0)
    assert not (out / "transformer").exists()
    exported = MeanFlowGenerator.from_pretrained(out)
    torch.testing.assert_close(exported.generate(CAPTIONS, steps=1, seed=2), module.generate(CAPTIONS, seed=2))


def test_exported_generate_defaults_to_the_saved_steps_and_cfg_scale(tmp_path):
    from emf_lightning.commands.export import export

    from helpers import tiny_module
    from test_models import perturb_zero_init

    module = tiny_module(sample_steps=(2, 4), cfg_scale=2.0)
    perturb_zero_init(module.ema_generator)  # a zero velocity would make every setting give the same images
    exported = MeanFlowGenerator.from_pretrained(export(module, tmp_path / "px", global_step=0))
    want = module.generate(CAPTIONS, steps=2, cfg_scale=2.0, seed=3)
    torch.testing.assert_close(exported.generate(CAPTIONS, seed=3), want)
    for steps, cfg_scale in ((1, 2.0), (2, 1.0)):  # each default alone changes the images
        assert not torch.allclose(module.generate(CAPTIONS, steps=steps, cfg_scale=cfg_scale, seed=3), want)


def test_export_refuses_a_folder_that_is_not_empty(run, tmp_path, capsys):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    assert cli.main(["export", "--ckpt", str(run["ckpt"]), "--out", str(tmp_path / "busy")]) == 2
    assert "exists and is not empty" in capsys.readouterr().err


def test_images_without_cached_latents_are_encoded_on_the_fly(run):
    """The same model trains on pixel shards: the autoencoder encodes the batch (no cache needed)."""
    from helpers import shapes_batch

    module = EMFModule.load_from_checkpoint(run["ckpt"])
    batch = shapes_batch(2, 16)
    latents = module.model_inputs(batch)
    torch.testing.assert_close(latents, module.autoencoder.encode(batch["image"]))
    assert latents.shape == (2, 4, 8, 8)
    wrong = dict(batch, latent=torch.zeros(2, 4, 4, 4))
    with pytest.raises(ValueError, match=r"batch latents \(from the shards\) have shape \(2, 4, 4, 4\)"):
        module.model_inputs(wrong)
    assert np.isfinite(float(module.compute_loss(batch, module.generator, torch.Generator(), train=False)[0]))
