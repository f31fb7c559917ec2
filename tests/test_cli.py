"""The `emf` command: help, dispatch, LightningCLI subcommands on every config, sample, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from emf_lightning import cli
from emf_lightning.config_files import config_chain
from emf_lightning.training import EMFModule
from emf_lightning.utils.grids import make_labelled_grid
from emf_lightning.utils.weights import MissingWeightsError

from helpers import BOW, TINY_DIT

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
ALL_CONFIGS = sorted(p.name for p in CONFIGS.glob("*.yaml"))
# Configs whose encoder has no weights on an offline machine: tests build tiny random ones instead.
NO_OFFLINE_WEIGHTS = {
    "qwen_meanflow.yaml": "Qwen/Qwen3-0.6B",
    "dit_latent.yaml": "Qwen/Qwen3-0.6B",
    "emf_sana.yaml": "Qwen/Qwen3-0.6B",
    "emf_sana_512.yaml": "Qwen/Qwen3-0.6B",
    "t5_meanflow.yaml": "google/flan-t5-base",
    "clip_meanflow.yaml": "ViT-L-14",
}


# Latent-space configs: a tiny random VAE (f2, 4 channels) and the tiny DiT on its 8x8 latents of 16 px images,
# encoding the test's pixel shards on the fly.
LATENT_RUN_ARGS = [
    '--model.autoencoder={"class_path": "emf_lightning.autoencoders.KLAutoencoder", "init_args": {"pretrained": false}}',
    "--model.backbone.init_args.input_size=8",
    "--model.backbone.init_args.in_channels=4",
    "--model.backbone.init_args.patch_size=2",
    "--data.load_latents=false",
]


def small_run_args(shards: dict[str, str], root: Path) -> list[str]:
    """Overrides that shrink any config to a CPU-sized run on the test shards (16x16, one tiny block)."""
    return [
        f"--data.train_shards={shards['train']}",
        f"--data.val_shards={shards['val']}",
        "--data.batch_size=2",
        "--data.val_batch_size=2",
        "--data.num_workers=0",
        "--data.image_size=16",
        "--data.epoch_length=8",
        "--data.pin_memory=false",
        f"--model.backbone={TINY_DIT}",
        "--model.feature_cache_dir=null",
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        "--trainer.precision=32-true",
        f"--trainer.default_root_dir={root}",
        f"--trainer.logger.init_args.save_dir={root}",
        "--trainer.enable_progress_bar=false",
    ]


FINAL_CHECKPOINT = "emf_lightning.callbacks.checkpoint.FinalModelCheckpoint"


def tiny_checkpoint(
    shards: dict[str, str], root: Path, config: str, *extra: str, checkpoint: str = FINAL_CHECKPOINT
) -> Path:
    """A two-step `emf fit` of a shipped config shrunk by ``small_run_args`` (bag-of-words encoder), with only the
    ``checkpoint`` callback (save_last) and then ``extra`` overrides; returns its one last.ckpt."""
    args = [
        "fit",
        "--config",
        str(CONFIGS / config),
        *small_run_args(shards, root),
        f"--model.encoder={BOW}",
        "--trainer.max_steps=2",
        "--trainer.callbacks=[]",
        f"--trainer.callbacks+={checkpoint}",
        "--trainer.callbacks.save_last=true",
        *extra,
    ]
    assert cli.main(args) == 0
    (last,) = root.rglob("last.ckpt")
    return last


# ---------------------------------------------------------------------------------------------- front door


def test_help_lists_every_subcommand():
    out = subprocess.run(
        [sys.executable, "-m", "emf_lightning.cli", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for name in ["fit", "validate", "test", "predict", "sample", "probe", "shards", "bench", "cache-features"]:
        assert f"\n  {name} " in out, name


def test_unknown_command_is_a_clear_error(capsys):
    assert cli.main(["trian"]) == 2
    assert "emf: unknown command 'trian'" in capsys.readouterr().err


def test_tool_commands_dispatch_lazily_with_their_argv(monkeypatch):
    seen = []
    fake = types.ModuleType("emf_lightning.commands.bench")
    fake.main = lambda argv: seen.append(argv) or 3
    monkeypatch.setitem(sys.modules, "emf_lightning.commands.bench", fake)
    assert cli.main(["bench", "--size", "tiny"]) == 3
    assert seen == [["--size", "tiny"]]
    assert cli.command_module_name("cache-features") == "emf_lightning.commands.cache_features"


def test_missing_tool_module_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setattr(cli, "command_module_name", lambda name: "emf_lightning.commands._not_installed")
    assert cli.main(["bench"]) == 2
    assert "emf bench: not available in this installation (emf_lightning.commands._not_installed is missing)" in (
        capsys.readouterr().err
    )


def test_ckpt_is_an_alias_of_ckpt_path():
    argv = cli._rename_ckpt_alias(["validate", "--ckpt", "a.ckpt", "--ckpt=b.ckpt", "--ckpt_path", "c"])
    assert argv == ["validate", "--ckpt_path", "a.ckpt", "--ckpt_path=b.ckpt", "--ckpt_path", "c"]


def test_missing_checkpoint_is_a_clear_error(capsys, tmp_path):
    assert cli.main(["validate", "--ckpt", str(tmp_path / "nope.ckpt")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- bad config


def test_unknown_config_key_on_the_command_line(capsys, shards, tmp_path):
    with pytest.raises(SystemExit) as info:
        cli.main(["fit", "--config", str(CONFIGS / "smollm_shapes.yaml"), "--model.learning_rate=0.1"])
    assert info.value.code == 2
    assert "error: unrecognized arguments: --model.learning_rate=0.1" in capsys.readouterr().err


def test_unknown_config_key_in_a_yaml_file(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"extends: {CONFIGS / 'smollm_shapes.yaml'}\nmodel:\n  optim:\n    learning_rate: 0.001\n")
    with pytest.raises(SystemExit) as info:
        cli.main(["fit", "--config", str(bad)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "learning_rate" in err and "error:" in err


# ---------------------------------------------------------------------------------------------- every config


def config_backbone_class(config: str) -> str:
    """The class name of the config's own backbone, through its extends chain."""
    found = ""
    for _, content in config_chain(CONFIGS / config):
        backbone = (content.get("model") or {}).get("backbone") or {}
        found = backbone.get("class_path", found)
    return found.rsplit(".", 1)[-1]


@pytest.fixture(scope="session")
def tiny_sana_folder(tmp_path_factory) -> Path:
    """A tiny random SANA transformer saved as a pretrained folder (4 latent channels, 8x8, caption width 24)."""
    diffusers = pytest.importorskip("diffusers")
    from emf_lightning.models.diffusers_adapter import SANA_CONFIGS

    root = tmp_path_factory.mktemp("tiny_sana")
    torch.manual_seed(0)
    diffusers.SanaTransformer2DModel(**SANA_CONFIGS["tiny"]).save_pretrained(root / "transformer")
    return root


def own_backbone_args(config: str, sana_folder: Path | None, latent: bool) -> list[str]:
    """Shrink the config's own backbone class (never swapped for another) to a CPU-sized stand-in; a pretrained
    SANA becomes a tiny random one saved as a folder, loaded through the config's own key ``model``."""
    name = config_backbone_class(config)
    arg = "--model.backbone.init_args."
    if name == "SanaMeanFlowBackbone":
        return [f"{arg}model={sana_folder}", f"{arg}input_size=8"]
    size, channels, patch = (8, 4, 2) if latent else (16, 3, 4)
    if name == "DiT":
        return [
            f"{arg}preset=tiny",
            f"{arg}input_size={size}",
            f"{arg}in_channels={channels}",
            f"{arg}patch_size={patch}",
            f"{arg}hidden_size=32",
            f"{arg}depth=1",
            f"{arg}num_heads=2",
        ]
    if name == "UNet":
        return [f"{arg}preset=tiny", f"{arg}input_size={size}", f"{arg}in_channels={channels}"]
    raise AssertionError(f"{config}: no stand-in for backbone {name!r}")


# Configs with real offline weights (SmolLM2, MiniLM) load them: slow. The others build tiny random models.
@pytest.mark.parametrize(
    "config", [c if c in NO_OFFLINE_WEIGHTS else pytest.param(c, marks=pytest.mark.slow) for c in ALL_CONFIGS]
)
def test_every_config_runs_fast_dev_run_offline(config, shards, tmp_path, tiny_sana_folder):
    """Each shipped config with its own backbone class (a tiny stand-in built from configs), not a swapped-in DiT."""
    # Where the last callback is the DiscriminabilityProbe, shrink its probe set (it encodes ~600 captions
    # at fit start, a minute with SmolLM2 on two busy cores); everything else runs as configured.
    run_args = [a for a in small_run_args(shards, tmp_path) if not a.startswith("--model.backbone=")]
    args = ["fit", "--config", str(CONFIGS / config), *run_args, "--trainer.fast_dev_run=true"]
    if "class_path: emf_lightning.callbacks.probe.DiscriminabilityProbe" in (CONFIGS / config).read_text():
        args += ["--trainer.callbacks.n=8", "--trainer.callbacks.n_pairs=2"]
    if config in NO_OFFLINE_WEIGHTS:
        args.append("--model.encoder.init_args.pretrained=false")
    latent = any("autoencoder" in content.get("model", {}) for _, content in config_chain(CONFIGS / config))
    if latent:
        args += [a for a in LATENT_RUN_ARGS if not a.startswith("--model.backbone.")]
    args += own_backbone_args(config, tiny_sana_folder, latent)
    seen = []
    with pytest.MonkeyPatch.context() as patch:
        from emf_lightning.training import EMFModule as Module

        original = Module.on_fit_start if hasattr(Module, "on_fit_start") else None

        def record(module):
            seen.append(type(module.generator.backbone).__name__)
            if original is not None:
                original(module)

        patch.setattr(Module, "on_fit_start", record)
        assert cli.main(args) == 0
    assert seen == [config_backbone_class(config)]


def test_dry_run_of_every_shipped_config_builds_its_own_backbone_at_its_own_shapes(capsys):
    """`emf fit --config X --dry-run` on every shipped config: no weights, its own backbone class, shapes that fit
    (no MISMATCH), a trainable count and a memory estimate; it stops (no run directory, exit 0)."""
    for config in ALL_CONFIGS:
        assert cli.main(["fit", "--config", str(CONFIGS / config), "--dry-run"]) == 0, config
        out = capsys.readouterr().out
        assert f"backbone   {config_backbone_class(config)} " in out, (config, out)
        assert "MISMATCH" not in out, (config, out)
        assert " trainable of " in out and "GiB per GPU" in out, (config, out)


def test_dry_run_of_emf_sana_shows_the_real_recipe_shapes(capsys):
    from emf_lightning.dry_run import dry_run

    assert cli.main(["fit", "--config", str(CONFIGS / "emf_sana.yaml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    # 1024 px through DC-AE f32 -> 32 x 32 x 32 latents, SANA-1.6B at its own 32 x 32 (not base/gpu.yaml's 64)
    assert "-> [8, 32, 32, 32]" in out and "input [8, 32, 32, 32]" in out, out
    assert "SanaMeanFlowBackbone (the published config" in out, out
    report = dry_run(
        {
            "model": {
                "encoder": json.loads(BOW),
                "backbone": {
                    "class_path": "emf_lightning.models.DiT",
                    "init_args": {"preset": "tiny", "input_size": 16},
                },
            },
            "data": {"batch_size": 2, "image_size": 16},
            "trainer": {"precision": "32-true"},
        }
    )
    assert report.output_shape == (2, 3, 16, 16) and report.trainable_parameters == report.total_parameters > 0
    assert report.memory_bytes > 4 * 4 * report.total_parameters  # weights, EMA, gradients, two moments


@pytest.mark.parametrize("config", sorted(NO_OFFLINE_WEIGHTS))
def test_configs_without_offline_weights_name_the_model(config, shards, tmp_path, capsys):
    args = ["fit", "--config", str(CONFIGS / config), *small_run_args(shards, tmp_path), "--trainer.fast_dev_run=true"]
    assert cli.main(args) == 2  # one line, no traceback
    err = capsys.readouterr().err
    assert "emf fit: error: Pretrained weights for '" in err and NO_OFFLINE_WEIGHTS[config] in err
    with pytest.raises(MissingWeightsError) as info:  # --debug shows the exception itself
        cli.main([*args, "--debug"])
    assert NO_OFFLINE_WEIGHTS[config] in str(info.value)


def test_all_six_configs_exist():
    assert set(ALL_CONFIGS) >= {
        "smollm_shapes.yaml",
        "qwen_meanflow.yaml",
        "t5_meanflow.yaml",
        "clip_meanflow.yaml",
        "minilm_shapes.yaml",
        "flow_matching_shapes.yaml",
    }


# ---------------------------------------------------------------------------------------------- a real run


@pytest.fixture(scope="module")
def trained(shards, tmp_path_factory) -> Path:
    """`emf fit` of the offline config, shrunk, with the bag-of-words encoder; returns last.ckpt."""
    root = tmp_path_factory.mktemp("run")
    validate_once = ["--trainer.val_check_interval=2", "--trainer.limit_val_batches=1"]
    return tiny_checkpoint(
        shards, root, "smollm_shapes.yaml", *validate_once, checkpoint="lightning.pytorch.callbacks.ModelCheckpoint"
    )


def test_cli_checkpoint_rebuilds_the_module_with_its_encoder(trained):
    ckpt = torch.load(trained, weights_only=True)
    assert ckpt["global_step"] == 2
    # The encoder's recorded arguments under its defining class path; the config's LLMEncoder init_args do not
    # carry over to the class named on the command line (max_length is BagOfWordsEncoder's own default, 256).
    assert ckpt["hyper_parameters"]["encoder"] == {
        "class_path": "emf_lightning.encoders.bow.BagOfWordsEncoder",
        "init_args": {"dim": 16, "seed": 0, "max_length": 256, "batch_size": 256, "device": None, "dtype": None},
    }
    assert not any(k.startswith("encoder") for k in ckpt["state_dict"])
    module = EMFModule.load_from_checkpoint(trained, map_location="cpu")
    assert type(module.encoder).__name__ == "BagOfWordsEncoder" and module.encoder.dim == 16


def test_sample_writes_the_prompt_by_steps_grid(trained, tmp_path, capsys):
    out = tmp_path / "grid.png"
    prompts = ["a red circle", "two blue squares"]
    rc = cli.main(
        [
            "sample",
            "--ckpt",
            str(trained),
            "--prompt",
            prompts[0],
            "--prompt",
            prompts[1],
            "--steps",
            "1",
            "2",
            "--cfg",
            "1.5",
            "--seed",
            "4",
            "--out",
            str(out),
            "--upscale",
            "1",
        ]
    )
    assert rc == 0 and "wrote" in capsys.readouterr().out
    module = EMFModule.load_from_checkpoint(trained, map_location="cpu")
    cells = [module.generate(prompts, steps=s, cfg_scale=1.5, seed=4) for s in (1, 2)]
    expected = torch.stack(cells, dim=1).flatten(0, 1)  # row = prompt, column = step count
    want = make_labelled_grid(expected, nrow=2, row_labels=prompts, col_labels=["1 step", "2 steps"], upscale=1)
    assert np.array_equal(np.asarray(Image.open(out).convert("RGB")), np.asarray(want.convert("RGB")))


def test_sample_with_no_prompt_is_a_clear_error(trained, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["sample", "--ckpt", str(trained), "--steps", "1"])
    assert info.value.code == 2
    assert 'no prompts given: pass at least one --prompt "..."' in capsys.readouterr().err


def test_sample_refuses_a_foreign_checkpoint(tmp_path, capsys):
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {"layer.weight": torch.zeros(2)}}, foreign)
    assert cli.main(["sample", "--ckpt", str(foreign), "--prompt", "a red circle"]) == 2
    assert "is not an emf-lightning checkpoint" in capsys.readouterr().err
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint")
    assert cli.main(["sample", "--ckpt", str(garbage), "--prompt", "a red circle"]) == 2
    assert "cannot read checkpoint" in capsys.readouterr().err


def test_validate_with_only_a_checkpoint(trained, tmp_path, capsys):
    # The model and data config come from the checkpoint; only where to write is given.
    rc = cli.main(
        [
            "validate",
            "--ckpt",
            str(trained),
            "--trainer.logger=false",
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.enable_progress_bar=false",
        ]
    )
    assert rc == 0
    assert "val/loss" in capsys.readouterr().out


def test_the_encoder_a_leaf_config_names_follows_its_extends_chain(tmp_path):
    """cache-features and probe read the encoder of a leaf that only extends the config naming it (compose_shapes)
    and of a leaf that overrides one init arg; a config naming none is None, not a guess."""
    from emf_lightning.commands.cache_features import spec_from_file
    from emf_lightning.config_files import encoder_spec_in

    spec = spec_from_file(CONFIGS / "compose_shapes.yaml")
    assert spec == {
        "class_path": "emf_lightning.encoders.SentenceEncoder",
        "init_args": {"model": "minilm", "max_length": 64},
    }
    leaf = tmp_path / "leaf.yaml"
    leaf.write_text(
        f"extends: {CONFIGS / 'minilm_shapes.yaml'}\nmodel:\n  encoder:\n    init_args: {{max_length: 16}}\n"
    )
    assert encoder_spec_in(leaf)["init_args"] == {"model": "minilm", "max_length": 16}
    assert encoder_spec_in(CONFIGS / "base" / "shapes_cpu.yaml") is None
    with pytest.raises(SystemExit, match="no encoder class_path in .*shapes_cpu.yaml"):
        spec_from_file(CONFIGS / "base" / "shapes_cpu.yaml")


def test_bf16_autocast_on_a_cpu_without_native_bf16_trains_in_float32(capsys):
    from emf_lightning.lightning_cli import cpu_precision

    assert cpu_precision("bf16-mixed", "cpu", bf16_native=False) == "32-true"
    assert "has no native bf16" in capsys.readouterr().err
    assert cpu_precision("bf16-mixed", "cpu", bf16_native=True) == "bf16-mixed"
    for other in ("32-true", "16-mixed", None):
        assert cpu_precision(other, "cpu", bf16_native=False) == other
    assert capsys.readouterr().err == ""
