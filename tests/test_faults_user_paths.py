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
from test_cli import CONFIGS, small_run_args, tiny_checkpoint


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
    """`emf fit` of the offline config, shrunk, with the final checkpoint and an evaluation callback (4 samples, not
    run during the fit) among its callbacks; returns its last.ckpt."""
    root = tmp_path_factory.mktemp("judged")
    validate_once = ["--trainer.val_check_interval=2", "--trainer.limit_val_batches=1"]
    evaluation = [
        "--trainer.callbacks+=emf_lightning.callbacks.evaluation.EvaluationCallback",
        "--trainer.callbacks.every_n_steps=0",  # not during this fit
        "--trainer.callbacks.on_train_end=false",
        "--trainer.callbacks.num_samples=4",
        "--trainer.callbacks.batch_size=4",
        "--trainer.callbacks.grid_prompts=2",
        "--trainer.callbacks.fid=false",
        "--trainer.callbacks.clip_score=false",
    ]
    return tiny_checkpoint(shards, root, "minilm_shapes.yaml", *validate_once, *evaluation)


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


# ================================================================================================================
# One line and exit 2 on the latent path
# ================================================================================================================

TINY_VAE = ["--vae", "sd-vae", "--vae-arg", "pretrained=false"]  # tiny random AutoencoderKL: f2, 4 channels


def cache_latents(shards: dict[str, str], out: Path, *extra: str) -> list[str]:
    return [
        "cache-latents",
        *TINY_VAE,
        "--shards",
        shards["train"],
        "--out",
        str(out / "train-%06d.tar"),
        "--image-size",
        "16",
        "--device",
        "cpu",
        *extra,
    ]


def latent_fit_args(shards: dict[str, str], root: Path, workers: int) -> list[str]:
    from test_cli import LATENT_RUN_ARGS

    return [
        "fit",
        "--config",
        str(CONFIGS / "minilm_shapes.yaml"),
        *small_run_args(shards, root),
        f"--model.encoder={BOW}",
        *[a for a in LATENT_RUN_ARGS if a != "--data.load_latents=false"],
        "--data.load_latents=true",  # but the shards hold images only
        f"--data.num_workers={workers}",
        "--trainer.fast_dev_run=true",
        "--trainer.callbacks=[]",
    ]


@pytest.mark.parametrize("workers", [0, 1])
def test_shards_without_latents_under_load_latents_is_one_line(shards, tmp_path, capfd, workers):
    # With a worker, torch re-raises the worker's error with its whole traceback as the message.
    assert cli.main(latent_fit_args(shards, tmp_path, workers)) == 2
    line = one_line_error(capfd.readouterr().err, "fit")
    assert "no precomputed latent" in line and "data.load_latents=false" in line and "Original" not in line


def test_worker_tracebacks_are_reduced_to_the_original_message():
    from emf_lightning.errors import ConfigError

    wrapped = ConfigError(
        "Caught ConfigError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
        '  File "x.py", line 1, in f\n    raise ConfigError("bad")\nemf_lightning.errors.ConfigError: set data.x=1\n'
    )
    assert cli.user_message(wrapped) == "set data.x=1"


def test_a_folder_whose_config_is_not_a_vae_is_one_line(shards, tmp_path, capfd):
    diffusers = pytest.importorskip("diffusers")
    from emf_lightning.autoencoders import build_autoencoder
    from emf_lightning.errors import ConfigError
    from emf_lightning.models.diffusers_adapter import SANA_CONFIGS

    folder = tmp_path / "sana"
    diffusers.SanaTransformer2DModel(**SANA_CONFIGS["tiny"]).save_pretrained(folder)
    args = cache_latents(shards, tmp_path / "lat")
    args[1:5] = ["--vae", str(folder)]
    assert cli.main(args) == 2
    line = one_line_error(capfd.readouterr().err, "cache-latents")
    assert "is not a VAE" in line and "SanaTransformer2DModel" in line and "model.autoencoder" in line
    with pytest.raises(ConfigError, match="is not a VAE"):  # what EMFModule(autoencoder=FOLDER) meets under fit
        build_autoencoder(str(folder))


def test_cache_latents_image_size_not_divisible_by_the_vae_factor_is_one_line(shards, tmp_path, capfd):
    args = cache_latents(shards, tmp_path / "lat")
    args[args.index("--image-size") + 1] = "15"
    assert cli.main(args) == 2
    line = one_line_error(capfd.readouterr().err, "cache-latents")
    assert "--image-size 15 is not divisible by the autoencoder's factor 2" in line
    assert not (tmp_path / "lat").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cache_latents_on_cuda_without_cuda_is_one_line(shards, tmp_path, capfd):
    args = cache_latents(shards, tmp_path / "lat")
    args[args.index("--device") + 1] = "cuda"
    assert cli.main(args) == 2
    assert "--device cuda: this machine has no cuda device" in one_line_error(capfd.readouterr().err, "cache-latents")


def test_cache_latents_rerun_with_other_settings_exits_2(shards, tmp_path, capfd):
    assert cli.main(cache_latents(shards, tmp_path / "lat")) == 0
    assert cli.main(cache_latents(shards, tmp_path / "lat", "--flip")) == 2
    line = one_line_error(capfd.readouterr().err, "cache-latents")
    assert "different settings" in line and "flip False" in line and "flip True" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_fit_with_accelerator_gpu_without_one_is_one_line(shards, tmp_path, capfd):
    args = ["fit", "--config", str(CONFIGS / "minilm_shapes.yaml"), *small_run_args(shards, tmp_path)]
    args += [f"--model.encoder={BOW}", "--trainer.accelerator=gpu", "--trainer.fast_dev_run=true"]
    assert cli.main(args) == 2
    line = one_line_error(capfd.readouterr().err, "fit")
    assert (
        "trainer.accelerator is 'gpu' but this machine has no CUDA GPU" in line and "--trainer.accelerator=cpu" in line
    )


# ================================================================================================================
# A class named later takes none of the earlier class's arguments
# ================================================================================================================


def test_emf_sana_does_not_inherit_the_dit_arguments_of_its_base(tmp_path):
    from emf_lightning.config_files import expand_config_args

    argv = expand_config_args(["fit", "--config", str(CONFIGS / "emf_sana.yaml")], tmp_path)
    files = [yaml_load(argv[i + 1]) for i, a in enumerate(argv) if a == "--config"]
    backbones = [f["model"]["backbone"] for f in files if "backbone" in f.get("model", {})]
    # base/gpu.yaml's DiT keeps its class but not its init_args (input_size 64 ...); the leaf's SANA has its own
    assert "init_args" not in backbones[0] and backbones[-1]["init_args"]["model"].startswith("Efficient-Large")
    assert "input_size" not in backbones[-1]["init_args"]


def test_switching_the_encoder_class_on_the_command_line_drops_the_recipes_encoder_arguments(tmp_path):
    from emf_lightning.config_files import expand_config_args

    bow = '{"class_path": "emf_lightning.encoders.BagOfWordsEncoder"}'
    argv = expand_config_args(["fit", "--config", str(CONFIGS / "emf_sana.yaml"), f"--model.encoder={bow}"], tmp_path)
    files = [yaml_load(argv[i + 1]) for i, a in enumerate(argv) if a == "--config"]
    encoders = [f["model"]["encoder"] for f in files if "encoder" in f.get("model", {})]
    assert encoders and all("init_args" not in e for e in encoders)  # no dtype: bfloat16, no max_length: 256
    # the same class named again keeps its arguments
    llm = "--model.encoder.class_path=emf_lightning.encoders.llm.LLMEncoder"
    argv = expand_config_args(["fit", "--config", str(CONFIGS / "emf_sana.yaml"), llm], tmp_path)
    files = [yaml_load(argv[i + 1]) for i, a in enumerate(argv) if a == "--config"]
    assert [f["model"]["encoder"]["init_args"]["max_length"] for f in files if "encoder" in f.get("model", {})] == [256]


def yaml_load(path: str) -> dict:
    import yaml

    return yaml.safe_load(Path(path).read_text()) or {}


# ================================================================================================================
# Nothing silent, and the traps
# ================================================================================================================


@pytest.fixture()
def sana_folder(tmp_path) -> Path:
    """A tiny random SANA transformer saved as a pretrained folder (seed 0)."""
    return save_tiny_sana(tmp_path / "sana", seed=0)


def save_tiny_sana(folder: Path, seed: int) -> Path:
    diffusers = pytest.importorskip("diffusers")
    from emf_lightning.models.diffusers_adapter import SANA_CONFIGS

    torch.manual_seed(seed)
    diffusers.SanaTransformer2DModel(**SANA_CONFIGS["tiny"]).save_pretrained(folder / "transformer")
    return folder


def sana_module(folder: Path, **backbone: object):
    from emf_lightning.training import EMFModule

    return EMFModule(
        encoder=json.loads(BOW),
        backbone={
            "class_path": "emf_lightning.models.SanaMeanFlowBackbone",
            "init_args": {"model": str(folder), "trainable": "emf", **backbone},
        },
        autoencoder={"class_path": "emf_lightning.autoencoders.KLAutoencoder", "init_args": {"pretrained": False}},
        feature_cache_dir=None,
    )


def test_latents_cached_with_another_autoencoder_are_refused(shards, tmp_path, capfd):
    assert cli.main(cache_latents(shards, tmp_path / "lat")) == 0  # tiny KL VAE, seed 0
    args = latent_fit_args(shards, tmp_path, workers=0)
    args[args.index(f"--data.train_shards={shards['train']}")] = f"--data.train_shards={tmp_path}/lat/train-*.tar"
    args[args.index(f"--data.val_shards={shards['val']}")] = f"--data.val_shards={tmp_path}/lat/train-*.tar"
    other = '{"class_path": "emf_lightning.autoencoders.KLAutoencoder", "init_args": {"pretrained": false, "seed": 1}}'
    assert cli.main([*args, f"--model.autoencoder={other}"]) == 2  # same latent shape, other weights
    line = one_line_error(capfd.readouterr().err, "fit")
    assert "were made with the autoencoder" in line and "set model.autoencoder" in line
    assert cli.main(args) == 0  # the autoencoder that made them trains


def test_a_different_base_model_in_the_same_folder_is_refused(sana_folder):
    from emf_lightning.errors import CheckpointError

    module = sana_module(sana_folder)
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    sana_module(sana_folder).on_load_checkpoint(dict(checkpoint))  # the same base: loads
    save_tiny_sana(sana_folder, seed=1)  # another base model put in its place
    with pytest.raises(CheckpointError, match="not those this checkpoint was trained on"):
        sana_module(sana_folder).on_load_checkpoint(dict(checkpoint))


def test_relative_model_folders_are_recorded_as_absolute_paths(sana_folder, monkeypatch):
    monkeypatch.chdir(sana_folder.parent)
    module = sana_module(Path("sana"))
    assert module.hparams.backbone["init_args"]["model"] == str(sana_folder)


def test_from_pretrained_takes_the_encoder_and_autoencoder_from_elsewhere(tmp_path):
    from emf_lightning.commands.export import export
    from emf_lightning.encoders import BagOfWordsEncoder
    from emf_lightning.inference import MeanFlowGenerator

    from helpers import tiny_module

    out = export(tiny_module(), tmp_path / "px", global_step=0)
    encoder = BagOfWordsEncoder(dim=tiny_module().encoder.dim)
    loaded = MeanFlowGenerator.from_pretrained(out, encoder=encoder, autoencoder="none")
    assert loaded.encoder is encoder


def test_lora_with_a_trainable_preset_is_refused(sana_folder):
    from emf_lightning.errors import ConfigError
    from emf_lightning.models import SanaMeanFlowBackbone

    with pytest.raises(ConfigError, match="trainable=none"):
        SanaMeanFlowBackbone(model=str(sana_folder), lora={"r": 4}, trainable="emf")


def test_the_exported_transformer_carries_the_interval_scale(sana_folder, tmp_path):
    from emf_lightning.models import SanaMeanFlowBackbone

    backbone = SanaMeanFlowBackbone(model=str(sana_folder), trainable="emf")
    backbone.export_pretrained(tmp_path)
    config = json.loads((tmp_path / "transformer" / "config.json").read_text())
    assert config["guidance_embeds"] and config["guidance_embeds_scale"] == backbone.time_scale == 1000.0


def test_missing_weights_name_the_key_and_a_missing_folder(tmp_path, monkeypatch, capfd):
    from emf_lightning.utils.weights import MissingWeightsError

    monkeypatch.chdir(tmp_path)
    with pytest.raises(MissingWeightsError) as info:
        sana_module(Path("../models/sana"))
    message = str(info.value)
    assert "the folder" in message and "does not exist" in message and "download" not in message
    assert message.endswith("Set model.backbone.init_args.model to the folder that holds them.")
    hub = str(MissingWeightsError("org/model", ["cache"]))
    assert "`hf download org/model`" in hub and "huggingface-cli" not in hub


def test_cache_latents_draws_its_bar_through_the_progress_helper(shards, tmp_path, monkeypatch):
    from emf_lightning.utils import progress

    seen = []
    original = progress.track

    def spy(items, description, *args, **kwargs):
        seen.append(description)
        return original(items, description, *args, **kwargs)

    monkeypatch.setattr(progress, "track", spy)
    assert cli.main(cache_latents(shards, tmp_path / "lat")) == 0
    assert seen == ["encoding shards"]


def test_export_onto_an_existing_file_is_one_line(tmp_path, capfd):
    target = tmp_path / "model.bin"
    target.write_text("x")
    assert cli.main(["export", "--ckpt", str(tmp_path / "any.ckpt"), "--out", str(target)]) == 2
    assert "is a file, not a folder" in one_line_error(capfd.readouterr().err, "export")
