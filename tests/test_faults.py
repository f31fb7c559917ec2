"""Fault suite: bad input and faults a new user hits, each answered by a clear error, a counted skip, or a file
that is never written. Each test failed before its fix.

Section "CLI and checkpoints": checkpoint overrides, structural contradictions, one-line errors (exit 2, no
traceback; ``--debug`` keeps it), non-finite numbers, exploded weights, atomic checkpoint files.

Section "Data path and evaluation": other people's WebDatasets, failing evaluations, undecodable captions, and
resuming the training stream mid-epoch.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import webdataset as wds
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from PIL import Image
from torch import nn

from emf_lightning import cli
from emf_lightning.callbacks.checkpoint import FinalModelCheckpoint
from emf_lightning.callbacks.evaluation import EvaluationCallback
from emf_lightning.checkpoint_io import AtomicCheckpointIO
from emf_lightning.data.datamodule import ShardDataModule
from emf_lightning.data.health import SkipCounter
from emf_lightning.data.sources import folder_samples
from emf_lightning.errors import CheckpointError, ConfigError, InputNotFoundError
from emf_lightning.meanflow import MeanFlowLoss, TimeSampler
from emf_lightning.shapes import ShapesWorld, scene_spec_or_none
from emf_lightning.training import EMFModule, NonFiniteLossError, OptimConfig
from emf_lightning.training.sharding import max_abs

from helpers import BOW, FixedBatches, StandInModule, shapes_batch, tiny_module
from test_cli import CONFIGS, small_run_args, tiny_checkpoint

# ================================================================================================================
# CLI and checkpoints
# ================================================================================================================


@pytest.fixture(scope="module")
def trained(shards, tmp_path_factory) -> Path:
    """`emf fit` of the offline config, shrunk (bag-of-words encoder, tiny DiT, 16 px), with the configs' own
    FinalModelCheckpoint; returns its last.ckpt (saved cfg_scale 1.0, val_batch_size 2)."""
    root = tmp_path_factory.mktemp("run")
    validate_once = ["--trainer.val_check_interval=2", "--trainer.limit_val_batches=1"]
    return tiny_checkpoint(shards, root, "smollm_shapes.yaml", *validate_once)


def validate_args(ckpt: Path, root: Path) -> list[str]:
    return [
        "validate",
        "--ckpt",
        str(ckpt),
        "--trainer.logger=false",
        f"--trainer.default_root_dir={root}",
        "--trainer.enable_progress_bar=false",
        "--trainer.limit_val_batches=1",
    ]


def one_line_error(err: str, command: str) -> str:
    """The single error line `emf <command>` printed; fails on a traceback."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith(f"emf {command}: error: ")]
    assert len(lines) == 1, err
    return lines[0]


def test_command_line_overrides_under_ckpt_win_and_are_reported(trained, tmp_path, monkeypatch, capsys):
    seen = {}

    def record(module):
        seen["cfg_scale"] = module.hparams.cfg_scale
        seen["sample_steps"] = list(module.hparams.sample_steps)
        seen["val_batch_size"] = module.trainer.datamodule.val_batch_size

    monkeypatch.setattr(EMFModule, "on_validation_start", record, raising=False)
    args = [
        *validate_args(trained, tmp_path),
        "--model.cfg_scale=3.0",
        "--model.sample_steps=[1]",
        "--data.val_batch_size=1",
    ]
    assert cli.main(args) == 0
    # Lightning 2.6 re-applied the checkpoint's hyper-parameters after the command line: cfg_scale was 1.0.
    assert seen == {"cfg_scale": 3.0, "sample_steps": [1], "val_batch_size": 1}
    reported = [line for line in capsys.readouterr().err.splitlines() if line.startswith("overriding")]
    assert reported == [
        "overriding the checkpoint's model.sample_steps: [1, 2, 4] -> [1]",
        "overriding the checkpoint's model.cfg_scale: 1.0 -> 3.0",
        "overriding the checkpoint's data.val_batch_size: 2 -> 1",
    ]


def test_ckpt_without_overrides_reports_nothing(trained, tmp_path, capsys):
    assert cli.main(validate_args(trained, tmp_path)) == 0
    assert "overriding" not in capsys.readouterr().err


@pytest.mark.parametrize(
    "override, key, saved, given",
    [
        (
            "--model.backbone=emf_lightning.models.UNet",
            "model.backbone.class_path",
            "'emf_lightning.models.dit.DiT'",
            "'emf_lightning.models.unet.UNet'",
        ),
        ("--model.backbone.init_args.input_size=32", "model.backbone.init_args.input_size", "16", "32"),
        ("--model.backbone.init_args.in_channels=1", "model.backbone.init_args.in_channels", "3", "1"),
        ("--model.backbone.init_args.patch_size=2", "model.backbone.init_args.patch_size", "4", "2"),
        ("--model.backbone.init_args.hidden_size=64", "model.backbone.init_args.hidden_size", "32", "64"),
        (
            "--model.loss=emf_lightning.meanflow.FlowMatchingLoss",
            "model.loss.class_path",
            "'emf_lightning.meanflow.losses.MeanFlowLoss'",
            "'emf_lightning.meanflow.losses.FlowMatchingLoss'",
        ),
        (
            "--model.encoder=emf_lightning.encoders.LabelEncoder",
            "model.encoder.class_path",
            "'emf_lightning.encoders.bow.BagOfWordsEncoder'",
            "'emf_lightning.encoders.label.LabelEncoder'",
        ),
    ],
)
def test_structural_override_of_a_checkpoint_is_an_error(trained, tmp_path, capsys, override, key, saved, given):
    assert cli.main([*validate_args(trained, tmp_path), override]) == 2
    line = one_line_error(capsys.readouterr().err, "validate")
    assert f"{key} is {saved} in the checkpoint but {given} on the command line" in line


def test_encoder_of_another_width_under_ckpt_is_an_error(trained, tmp_path, capsys):
    # Same class, other arguments: only the built encoder shows that its features no longer fit the generator.
    assert cli.main([*validate_args(trained, tmp_path), "--model.encoder.init_args.dim=32"]) == 2
    line = one_line_error(capsys.readouterr().err, "validate")
    assert "model.encoder gives features of width 32, but the generator in" in line and "trained on width 16" in line


def test_resume_with_another_architecture_is_an_error(trained, shards, tmp_path, capsys):
    args = [
        "fit",
        "--ckpt_path",
        str(trained),
        "--model.backbone=emf_lightning.models.UNet",
        "--trainer.logger=false",
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.max_steps=3",
    ]
    assert cli.main(args) == 2
    line = one_line_error(capsys.readouterr().err, "fit")
    assert (
        "model.backbone.class_path is 'emf_lightning.models.dit.DiT' in the checkpoint but "
        "'emf_lightning.models.unet.UNet' on the command line"
    ) in line


@pytest.mark.parametrize("content", ["truncated", "text"])
@pytest.mark.parametrize("command", ["validate", "test", "predict", "sample"])
def test_unreadable_checkpoint_is_one_line(trained, tmp_path, capsys, content, command):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(trained.read_bytes()[:5000] if content == "truncated" else b"hello\n")
    args = [command, "--ckpt", str(bad)] + (["--prompt", "a red circle"] if command == "sample" else [])
    assert cli.main(args) == 2  # before: KeyError: 101 (text) or an OSError traceback (truncated)
    line = one_line_error(capsys.readouterr().err, command)
    assert f"cannot read checkpoint {bad}: it is not a complete torch.save archive" in line


def test_debug_flag_and_env_keep_the_traceback(tmp_path, monkeypatch, capsys):
    bad = tmp_path / "bad.ckpt"
    bad.write_text("hello\n")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        cli.main(["validate", "--ckpt", str(bad), "--debug"])  # --debug is stripped before LightningCLI
    monkeypatch.setenv("EMF_DEBUG", "1")
    with pytest.raises(CheckpointError):
        cli.main(["validate", "--ckpt", str(bad)])
    monkeypatch.setenv("EMF_DEBUG", "0")
    assert cli.main(["validate", "--ckpt", str(bad)]) == 2


def test_unexpected_exceptions_keep_their_traceback(monkeypatch):
    # Only UserInputError (and MissingWeightsError) become one line: a bug must not be hidden.
    def bug(argv):
        raise KeyError("a bug")

    monkeypatch.setattr(cli, "run_lightning", bug)
    with pytest.raises(KeyError, match="a bug"):
        cli.main(["validate", "--ckpt", "x.ckpt"])


def test_sample_on_a_device_this_machine_lacks_is_one_line(trained, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = ["sample", "--ckpt", str(trained), "--prompt", "a red circle", "--out", str(tmp_path / "g.png")]
    assert cli.main([*args, "--device", "cuda"]) == 2  # before: RuntimeError from torch.load's map_location
    assert "--device cuda: this machine has no cuda device" in one_line_error(capsys.readouterr().err, "sample")
    assert cli.main([*args, "--device", "cuda:x"]) == 2
    assert "--device 'cuda:x' is not a device" in one_line_error(capsys.readouterr().err, "sample")
    assert not (tmp_path / "g.png").exists()


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_sample_refuses_a_non_finite_cfg(trained, tmp_path, capsys, value):
    out = tmp_path / "g.png"
    with pytest.raises(SystemExit) as info:  # argparse's usage error; before: a black image and exit 0
        cli.main(["sample", "--ckpt", str(trained), "--prompt", "a red circle", f"--cfg={value}", "--out", str(out)])
    assert info.value.code == 2
    assert f"argument --cfg: must be a finite number, got '{value}'" in capsys.readouterr().err
    assert not out.exists()


NAN = float("nan")


@pytest.mark.parametrize(
    "build, name",
    [
        (lambda: tiny_module(cfg_scale=NAN), "model.cfg_scale"),
        (lambda: tiny_module(max_weight_abs=NAN), "model.max_weight_abs"),
        (lambda: OptimConfig(lr=NAN), "optim.lr"),
        (lambda: OptimConfig(betas=(NAN, 0.95)), "optim.betas"),
        (lambda: MeanFlowLoss(guidance_omega=NAN), "loss.guidance_omega"),
        (lambda: MeanFlowLoss(adaptive_c=NAN), "loss.adaptive_c"),
        (lambda: TimeSampler(mu=(NAN, 0.5)), "time_sampler.mu"),
    ],
    ids=["cfg_scale", "max_weight_abs", "lr", "betas", "guidance_omega", "adaptive_c", "time_mu"],
)
def test_module_refuses_non_finite_numbers(build, name):
    with pytest.raises(ConfigError, match=f"{name} must be a finite number"):
        build()


def test_generate_refuses_a_non_finite_cfg_scale():
    with pytest.raises(ConfigError, match="cfg_scale must be a finite number"):
        tiny_module().generate(["a red circle"], cfg_scale=float("nan"))


@pytest.mark.parametrize(
    "override, message",
    [
        ("--data.batch_size=0", "batch_size must be >= 1, got 0"),
        (
            "--data.image_size=32",
            "data.image_size=32 but the model makes 16x16 images (the backbone's input_size)",
        ),  # was "Error while merging hparams"
        ("--data.train_shards={root}/nothing-*.tar", "matches no files"),
        ("--data.train_shards={root}/train-{{000000..000009}}.tar", "8 shard file(s) not found"),
    ],
)
def test_fit_config_errors_are_one_line(shards, tmp_path, capsys, override, message):
    root = Path(shards["train"]).parent
    args = [
        "fit",
        "--config",
        str(CONFIGS / "smollm_shapes.yaml"),
        *small_run_args(shards, tmp_path),
        f"--model.encoder={BOW}",
        "--trainer.max_steps=1",
        override.format(root=root),
    ]
    assert cli.main(args) == 2
    assert message in one_line_error(capsys.readouterr().err, "fit")


def test_config_error_types_keep_their_builtin_bases():
    assert issubclass(ConfigError, ValueError) and issubclass(InputNotFoundError, FileNotFoundError)


# ---------------------------------------------------------------------------------------------- weight guard


def _tensors(path: Path) -> list[torch.Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    return [v for v in state.values() if v.is_floating_point()]


def test_a_diverging_run_never_checkpoints_exploded_weights(tmp_path):
    torch.manual_seed(0)
    module = tiny_module(optim={"lr": 1e6})  # one Adam step moves every weight by ~1e6, far above max_weight_abs=1e4
    ckpt = FinalModelCheckpoint(
        dirpath=tmp_path, filename="{step}", every_n_train_steps=1, save_last=True, save_top_k=-1
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=4,
        logger=False,
        callbacks=[ckpt],
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    batches = [shapes_batch(2, 16, seed=s) for s in range(4)]
    with pytest.raises(NonFiniteLossError) as info:
        trainer.fit(module, torch.utils.data.DataLoader(FixedBatches(batches), batch_size=None))
    # Before the weight check, step=1..3.ckpt and last.ckpt held weights ~1e6; the run died later on a NaN loss.
    for path in tmp_path.iterdir():
        assert all(torch.isfinite(t).all() and t.abs().max() <= 1e4 for t in _tensors(path)), path
    assert not list(tmp_path.glob("*.ckpt"))  # the very first step exploded: nothing was worth keeping
    assert "a weight of magnitude" in str(info.value) and "(above model.max_weight_abs=10000)" in str(info.value)
    assert "after optimiser step 0: the run diverged" in str(info.value)
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)  # FinalModelCheckpoint installed it


def test_weight_check_sees_nan_in_the_ema_copy_and_refuses_the_checkpoint():
    module = tiny_module(max_weight_abs=None)  # None: no bound, but non-finite weights still stop the run
    module.check_weights("now")  # healthy weights pass
    with torch.no_grad():
        next(module.ema_generator.parameters()).view(-1)[3] = float("nan")
    with pytest.raises(NonFiniteLossError, match="holds a NaN or infinite weight now"):
        module.check_weights("now")
    with pytest.raises(NonFiniteLossError, match="Refusing to write a checkpoint"):
        module.on_save_checkpoint({})


def test_on_save_checkpoint_refuses_exploded_weights_by_itself():
    module = tiny_module(max_weight_abs=100.0)
    with torch.no_grad():
        next(module.generator.parameters()).view(-1)[0] = 150.0
    with pytest.raises(NonFiniteLossError, match=r"Refusing to write a checkpoint\..*magnitude 150 .*=100\)"):
        module.on_save_checkpoint({})


def test_max_abs_is_the_largest_magnitude_and_inf_for_non_finite():
    tensors = [torch.tensor([1.0, -7.5]), torch.empty(0), torch.tensor([[2.0], [3.0]]).bfloat16()]
    assert max_abs(tensors).item() == 7.5 == max(t.abs().max().item() for t in tensors if t.numel())
    assert max_abs([]).item() == 0.0
    for bad in (float("nan"), float("inf"), -float("inf")):
        assert max_abs([*tensors, torch.tensor([0.0, bad])]).item() == math.inf


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_max_abs_sees_nan_on_cuda():
    # CUDA's fused multi-tensor inf-norm must propagate a NaN (a plain max would drop it).
    tensors = [torch.randn(4096, device="cuda"), torch.randn(3, 5, device="cuda").bfloat16()]
    assert max_abs(tensors).item() == max(t.abs().max().item() for t in tensors)
    tensors[0][1234] = float("nan")
    assert max_abs(tensors).item() == math.inf


@pytest.mark.slow
def test_max_abs_is_reduced_over_fsdp2_shards(tmp_path):
    """Two gloo ranks shard a linear layer with fully_shard; a spike or a NaN in one rank's shard reaches both."""
    script = textwrap.dedent("""
        import os, sys, torch, torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor import DTensor
        from emf_lightning.training.sharding import max_abs
        dist.init_process_group("gloo")
        rank = dist.get_rank()
        torch.manual_seed(0)
        layer = torch.nn.Linear(4, 6)
        with torch.no_grad():
            layer.weight.clamp_(-0.5, 0.5)
            layer.bias.clamp_(-0.5, 0.5)
        fully_shard(layer, mesh=init_device_mesh("cpu", (2,)))
        assert isinstance(layer.weight, DTensor)
        out = [max_abs(layer.parameters()).item()]
        with torch.no_grad():
            if rank == 1:
                layer.weight.to_local()[0, 0] = -42.0
        out.append(max_abs(layer.parameters()).item())
        with torch.no_grad():
            if rank == 0:
                layer.bias.to_local()[0] = float("nan")
        out.append(max_abs(layer.parameters()).item())
        print("RESULT", rank, *out, flush=True)
        dist.destroy_process_group()
    """)
    path = tmp_path / "fsdp_max_abs.py"
    path.write_text(script)
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"}
    env["MASTER_PORT"] = str(29500 + os.getpid() % 1000)
    procs = [
        subprocess.Popen(
            [sys.executable, str(path)],
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(2)
    ]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    results = sorted(line for out in outs for line in out.splitlines() if line.startswith("RESULT"))
    assert len(results) == 2, outs
    for line in results:
        before, spike, nan = map(float, line.split()[2:])
        assert before <= 0.5 and spike == 42.0 and nan == math.inf, line


# ---------------------------------------------------------------------------------------------- atomic writes


def test_a_writer_failing_mid_write_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    target = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.arange(4.0)}, target)

    def half_then_die(obj, path, *args, **kwargs):
        Path(path).write_bytes(b"PK\x03\x04 half a zip")  # what a writer leaves when it is interrupted
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", half_then_die)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"step": 2, "w": torch.zeros(4)}, target)
    monkeypatch.undo()
    assert torch.equal(torch.load(target, weights_only=True)["w"], torch.arange(4.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # the partial file is removed


KILL_CHILD = """
import errno, os, sys
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from emf_lightning.checkpoint_io import AtomicCheckpointIO

# $TMPDIR on another filesystem than the checkpoints: a rename between the two folders fails with EXDEV, and
# shutil.move (Lightning's writer, through fsspec) falls back to copying into the target.
real_rename = os.rename
def rename(src, dst, *args, **kwargs):
    if os.path.dirname(os.path.abspath(src)) != os.path.dirname(os.path.abspath(dst)):
        raise OSError(errno.EXDEV, "Invalid cross-device link")
    return real_rename(src, dst, *args, **kwargs)
os.rename = rename

target, kind = sys.argv[1], sys.argv[2]
io = AtomicCheckpointIO() if kind == "atomic" else TorchCheckpointIO()
io.save_checkpoint({"step": 1, "w": torch.arange(4.0)}, target)
big = {"step": 2, "w": torch.ones(16 * 2**20)}  # 64 MB: the parent kills us while it is written
print("ready", flush=True)
sys.stdin.readline()
io.save_checkpoint(big, target)
print("written", flush=True)
"""


def kill_during_second_save(tmp_path: Path, kind: str) -> Path:
    """Run KILL_CHILD and SIGKILL it at the first change in the checkpoint folder; returns the target path."""
    folder, elsewhere = tmp_path / "ckpts", tmp_path / "tmpdir"
    folder.mkdir()
    elsewhere.mkdir()
    target = folder / "last.ckpt"
    child = subprocess.Popen(
        [sys.executable, "-c", KILL_CHILD, str(target), kind],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "TMPDIR": str(elsewhere)},
    )
    try:
        assert child.stdout.readline().strip() == "ready"
        first = os.stat(target)
        names = set(os.listdir(folder))
        child.stdin.write("go\n")
        child.stdin.flush()
        while child.poll() is None:
            now = os.stat(target)
            if set(os.listdir(folder)) != names or (now.st_ino, now.st_size, now.st_mtime_ns) != (
                first.st_ino,
                first.st_size,
                first.st_mtime_ns,
            ):
                os.kill(child.pid, signal.SIGKILL)
                break
        child.wait(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == -signal.SIGKILL, "the child finished before it could be killed"
    return target


def test_a_kill_during_the_write_leaves_the_previous_checkpoint(tmp_path):
    target = kill_during_second_save(tmp_path, "atomic")
    # With Lightning's TorchCheckpointIO ("lightning") the kill lands in the copy onto last.ckpt and truncates it.
    previous = torch.load(target, weights_only=True)
    assert previous["step"] == 1 and torch.equal(previous["w"], torch.arange(4.0))
    # What the kill interrupted is at most a stale last.ckpt.partial, which the next save overwrites.
    assert set(os.listdir(target.parent)) <= {"last.ckpt", "last.ckpt.partial"}


# ================================================================================================================
# Data path and evaluation
# ================================================================================================================

RES = 16


# ------------------------------------------------------------------------------------------------ writers
def _jpeg(seed: int, size: tuple[int, int] = (24, 20)) -> bytes:
    rng = np.random.default_rng(seed)
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(out, format="JPEG")
    return out.getvalue()


def img2dataset_meta(key: str, caption: str, i: int) -> dict:
    """The .json img2dataset writes for a downloaded sample (url/caption columns, hashes on)."""
    return {
        "url": f"https://example.com/img/{i}.jpg",
        "caption": caption,
        "key": key,
        "status": "success",
        "error_message": None,
        "width": 24,
        "height": 20,
        "original_width": 640,
        "original_height": 533,
        "exif": "{}",
        "sha256": hashlib.sha256(str(i).encode()).hexdigest(),
    }


def write_img2dataset_shard(path: Path, shard_id: int, n: int) -> list[str]:
    """One tar laid out as img2dataset's WebDatasetSampleWriter writes it: webdataset's TarWriter with
    {"__key__": "<shard><index>", "jpg": bytes, "txt": str, "json": json.dumps(meta, indent=4)}. Returns the keys."""
    keys = []
    with open(path, "wb") as fd, wds.TarWriter(fd) as sink:
        for i in range(n):
            key = f"{shard_id:05d}{i:04d}"
            caption = f"a photo number {shard_id * 100 + i} of a street"
            sink.write(
                {
                    "__key__": key,
                    "jpg": _jpeg(shard_id * 100 + i),
                    "txt": caption,
                    "json": json.dumps(img2dataset_meta(key, caption, shard_id * 100 + i), indent=4),
                }
            )
            keys.append(key)
    return keys


def write_shapes_shard(pattern: Path, n: int, split: str = "val") -> ShapesWorld:
    from emf_lightning.data.shards import ShardSample, write_shards

    world = ShapesWorld(seed=3, resolution=RES, split=split, size=n)
    write_shards(
        (
            ShardSample(key=s.key, image=s.image, caption=s.caption, captions=s.captions, meta=s.spec)
            for s in (world[i] for i in range(n))
        ),
        str(pattern),
        maxcount=n,
    )
    return world


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)

    def messages(self, level: int = logging.DEBUG) -> list[str]:
        return [r.getMessage() for r in self.records if r.levelno >= level]


@pytest.fixture
def lines():
    """Records of the project's loggers and Lightning's rank-zero logger (which does not propagate)."""
    handler = _Lines()
    names = ("emf_lightning", "lightning.pytorch.utilities.rank_zero")
    saved = {}
    for name in names:
        logger = logging.getLogger(name)
        saved[name] = logger.level
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)
    yield handler
    for name in names:
        logging.getLogger(name).removeHandler(handler)
        logging.getLogger(name).setLevel(saved[name])


# --------------------------------------------------------------------------------- a .json is a spec only if it is one
def test_scene_spec_or_none_accepts_scene_specs_only():
    world = ShapesWorld(seed=0, resolution=RES, split="train", size=2)
    spec = world[0].spec
    assert scene_spec_or_none({**spec, "captions": ["x"]}) == spec  # the stored paraphrases are not part of it
    meta = img2dataset_meta("000000000", "a street", 0)
    assert scene_spec_or_none(meta) is None
    assert scene_spec_or_none({"source": "flickr", "license": "cc-by"}) is None  # `emf shards list` extra columns
    for broken in (
        {"objects": []},
        {"objects": [1], "category": "colors"},
        {"objects": "circle"},
        {**spec, "category": "nonsense"},
        {**spec, "relations": ["left"]},
        {},
        None,
    ):
        assert scene_spec_or_none(broken) is None, broken


def test_img2dataset_shards_give_metadata_and_no_spec(tmp_path):
    keys = write_img2dataset_shard(tmp_path / "00000.tar", 0, 3) + write_img2dataset_shard(tmp_path / "00001.tar", 1, 2)
    dm = ShardDataModule(val_shards=str(tmp_path / "{00000..00001}.tar"), batch_size=4, num_workers=0, image_size=RES)
    dm.setup("validate")
    batches = list(dm.val_dataloader())
    assert [k for b in batches for k in b["key"]] == keys
    assert all(scene_spec_or_none(m) is None for b in batches for m in b["meta"])
    metas = [m for b in batches for m in b["meta"]]
    assert metas[1]["url"] == "https://example.com/img/1.jpg" and metas[1]["status"] == "success"
    assert metas[4]["key"] == "000010001" and metas[4]["width"] == 24
    assert batches[0]["caption"][0] == "a photo number 0 of a street"
    assert batches[0]["image"].shape == (4, 3, RES, RES)


class BlackGenerator(StandInModule):
    """The generate() contract with black images (ShapesEval finds no object in them)."""

    def generate(self, captions, steps=1, cfg_scale=1.0, seed=0, use_ema=True):
        return -torch.ones(len(captions), 3, RES, RES)


def _validate(tmp_path: Path, val_shards, callback: EvaluationCallback) -> dict:
    dm = ShardDataModule(val_shards=val_shards, batch_size=4, num_workers=0, image_size=RES)
    trainer = Trainer(
        default_root_dir=tmp_path,
        max_steps=1,
        callbacks=[callback],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    return trainer.validate(BlackGenerator(), datamodule=dm, verbose=False)[0]


def test_validate_on_img2dataset_shards_skips_shapes_eval_in_one_line(tmp_path, lines):
    """Was: SceneError: spec['objects'] must be a non-empty list (ShapesEval on every img2dataset .json)."""
    write_img2dataset_shard(tmp_path / "00000.tar", 0, 6)
    cb = EvaluationCallback(
        num_samples=8,
        batch_size=4,
        steps=(1,),
        fid=False,
        clip_score=False,
        grid_prompts=0,
        output_dir=str(tmp_path / "eval"),
    )  # shapes_eval=True, the default of every config
    out = _validate(tmp_path, str(tmp_path / "00000.tar"), cb)
    assert not [k for k in out if "shapes" in k]
    said = [m for m in lines.messages(logging.INFO) if "ShapesEval" in m]
    assert said == ["ShapesEval judges 0 of 6 held-out samples (the others carry no shapes-world scene spec)"]
    assert "shapes" in cb.last_result.skipped


def test_shapes_eval_judges_only_the_samples_with_a_spec(tmp_path, lines):
    """A held-out set mixing shapes shards, img2dataset shards and `emf shards list` output with extra columns."""
    from emf_lightning.commands.shards import main as shards_main

    write_shapes_shard(tmp_path / "shapes-%06d.tar", 4)
    write_img2dataset_shard(tmp_path / "00000.tar", 0, 3)
    (tmp_path / "imgs").mkdir()
    rows = []
    for i in range(2):
        Image.open(io.BytesIO(_jpeg(50 + i))).save(tmp_path / "imgs" / f"p{i}.png")
        rows.append(
            {
                "image": f"imgs/p{i}.png",
                "caption": f"listed picture {i}",
                "url": f"https://x/{i}",
                "width": 24,
                "height": 20,
                "status": "success",
                "objects": "two",
            }
        )
    (tmp_path / "list.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert shards_main(["list", str(tmp_path / "list.jsonl"), "--out", str(tmp_path / "list-%06d.tar")]) == 0

    shards = [str(tmp_path / "shapes-000000.tar"), str(tmp_path / "00000.tar"), str(tmp_path / "list-000000.tar")]
    dm = ShardDataModule(val_shards=shards, batch_size=16, num_workers=0, image_size=RES)
    dm.setup("validate")
    (batch,) = list(dm.val_dataloader())
    assert [scene_spec_or_none(m) is not None for m in batch["meta"]] == [True] * 4 + [False] * 5
    assert batch["meta"][-1] == {"url": "https://x/1", "width": 24, "height": 20, "status": "success", "objects": "two"}

    cb = EvaluationCallback(
        num_samples=16,
        batch_size=4,
        steps=(1,),
        fid=False,
        clip_score=False,
        grid_prompts=0,
        output_dir=str(tmp_path / "eval"),
    )
    out = _validate(tmp_path, shards, cb)
    said = [m for m in lines.messages(logging.INFO) if "ShapesEval" in m]
    assert said == ["ShapesEval judges 4 of 9 held-out samples (the others carry no shapes-world scene spec)"]
    assert out["eval/shapes_overall@real"] == 1.0  # the real shapes images, judged against their own specs
    assert out["eval/shapes_overall@1step_cfg1.0"] == 0.0  # black images hold no object


# --------------------------------------------------------------------------------- an evaluation never costs a checkpoint
class FailingShapesEval:
    """Raises on every call; records whether the final checkpoint was already on disk at that moment."""

    def __init__(self, last: Path):
        self.last, self.seen_last_at = last, []

    def evaluate(self, images, specs):
        self.seen_last_at.append(
            torch.load(self.last, weights_only=False)["global_step"] if self.last.exists() else None
        )
        raise ValueError("spec['objects'] must be a non-empty list")


def test_fit_whose_evaluations_raise_still_writes_the_final_checkpoint(tmp_path, lines):
    from emf_lightning.callbacks.checkpoint import FinalModelCheckpoint
    from emf_lightning.training import EMFModule

    from helpers import tiny_module, write_shapes_shards

    urls = write_shapes_shards(tmp_path / "shards", n_train=8, n_val=4, resolution=16)
    dm = ShardDataModule(
        train_shards=urls["train"],
        val_shards=urls["val"],
        batch_size=4,
        image_size=16,
        num_workers=0,
        epoch_length=8,
        shuffle_buffer=0,
    )
    ckpt_dir = tmp_path / "ckpt"
    failing = FailingShapesEval(ckpt_dir / "last.ckpt")
    cb = EvaluationCallback(
        every_n_steps=2,
        on_train_end=True,
        num_samples=4,
        batch_size=4,
        steps=(1,),
        fid=False,
        clip_score=False,
        grid_prompts=0,
        shapes_evaluator=failing,
        output_dir=str(tmp_path / "eval"),
    )
    checkpoint = FinalModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=2, save_last=True, save_top_k=0)
    module = tiny_module()
    trainer = Trainer(
        default_root_dir=tmp_path,
        max_steps=3,
        callbacks=[cb, checkpoint],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        accelerator="cpu",
    )
    trainer.fit(module, datamodule=dm)  # was: ValueError from the evaluation at step 2, and no last.ckpt

    assert trainer.global_step == 3 and cb.failed_evaluations == 2
    assert trainer.callback_metrics["eval/failed_evaluations"].item() == 2
    errors = lines.messages(logging.ERROR)
    assert len(errors) == 2 and errors[1] == (
        "EvaluationCallback: evaluation at step 3 failed: ValueError: spec['objects'] must be a non-empty list. "
        "Training goes on and checkpoints are still written (traceback at DEBUG level, logger "
        "'emf_lightning.callbacks.evaluation')."
    )
    tracebacks = [r for r in lines.records if r.levelno == logging.DEBUG and r.exc_info and "failed" in r.getMessage()]
    assert len(tracebacks) == 2
    # step 2: the periodic evaluation runs before that step's checkpoint (Lightning runs checkpoint callbacks
    # last) and its failure is caught; step 3: the end-of-training evaluation runs after the final checkpoint
    assert failing.seen_last_at == [None, 3]
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["last.ckpt"]
    loaded = EMFModule.load_from_checkpoint(ckpt_dir / "last.ckpt", map_location="cpu")
    assert torch.load(ckpt_dir / "last.ckpt", weights_only=False)["global_step"] == 3
    for a, b in zip(loaded.generator.state_dict().values(), module.generator.state_dict().values()):
        assert torch.equal(a, b.cpu())

    # under validate, evaluation is the job: the same failure stops it
    val = EvaluationCallback(
        num_samples=4,
        batch_size=4,
        steps=(1,),
        fid=False,
        clip_score=False,
        grid_prompts=0,
        shapes_evaluator=FailingShapesEval(tmp_path / "none"),
        output_dir=str(tmp_path / "v"),
    )
    val_trainer = Trainer(
        default_root_dir=tmp_path,
        max_steps=3,
        callbacks=[val],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=1,
        accelerator="cpu",
    )
    with pytest.raises(ValueError, match="non-empty list"):
        val_trainer.validate(loaded, datamodule=dm, verbose=False)


# --------------------------------------------------------------------------------- undecodable captions
def _png(seed: int) -> bytes:
    out = io.BytesIO()
    Image.open(io.BytesIO(_jpeg(seed, (RES, RES)))).save(out, format="PNG")
    return out.getvalue()


def test_invalid_utf8_caption_is_skipped_and_counted(tmp_path, lines):
    """Was: trained as 'caf\\ufffd au lait'."""
    samples = [
        {"__key__": "a", "png": _png(0), "txt": b"a red circle"},
        {"__key__": "b", "png": _png(1), "txt": "café au lait".encode("latin-1")},
        {"__key__": "c", "png": _png(2), "txt": "naïve blue square".encode()},
    ]
    with wds.TarWriter(str(tmp_path / "t-0.tar"), encoder=False) as sink:
        for s in samples:
            sink.write(s)
    dm = ShardDataModule(val_shards=str(tmp_path / "t-0.tar"), batch_size=4, num_workers=0, image_size=RES)
    dm.setup("validate")
    loader = dm.val_dataloader()
    batches = list(loader)
    assert [c for b in batches for c in b["caption"]] == ["a red circle", "naïve blue square"]
    assert dict(loader.tally.counts) == {"undecodable_caption": 1}
    assert any(
        "skipping input (undecodable_caption)" in m and ":b.txt: not UTF-8" in m
        for m in lines.messages(logging.WARNING)
    )

    (tmp_path / "imgs").mkdir()
    for name, text in (("a", b"a red circle"), ("b", "caf\xe9".encode("latin-1"))):
        (tmp_path / "imgs" / f"{name}.png").write_bytes(_png(3))
        (tmp_path / "imgs" / f"{name}.txt").write_bytes(text)
    counter = SkipCounter("folder")
    assert [s.key for s in folder_samples(tmp_path / "imgs", counter)] == ["a"]  # `emf shards folder`
    assert counter.drain() == {"undecodable_caption": 1}


# --------------------------------------------------------------------------------- resuming the training stream
@pytest.fixture(scope="module")
def train_urls(tmp_path_factory) -> str:
    from helpers import write_shapes_shards

    return write_shapes_shards(tmp_path_factory.mktemp("resume"), n_train=12, n_val=4, resolution=8, per_shard=3)[
        "train"
    ]


def _train_dm(urls: str, num_workers: int) -> ShardDataModule:
    # 10 samples per epoch in batches of 3: 4 batches (3, 3, 3, 1), split over the workers
    return ShardDataModule(
        train_shards=urls,
        batch_size=3,
        num_workers=num_workers,
        image_size=8,
        epoch_length=10,
        shuffle_buffer=4,
        caption_sampling="random",  # a random draw per sample: the replay must repeat it
        seed=7,
    )


def _batches(loader, n: int | None = None) -> list[tuple[tuple[str, ...], tuple[str, ...]]]:
    out = []
    for batch in loader:
        out.append((tuple(batch["key"]), tuple(batch["caption"])))
        if n is not None and len(out) == n:
            break
    return out


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_state_resumes_mid_epoch_exactly(train_urls, num_workers):
    dm = _train_dm(train_urls, num_workers)
    dm.setup("fit")
    loader = dm.train_dataloader()
    whole = [_batches(loader) for _ in range(2)]
    assert [len(e) for e in whole] == [4, 4]

    first = _train_dm(train_urls, num_workers)
    first.setup("fit")
    interrupted = first.train_dataloader()
    _batches(interrupted)  # epoch 0
    assert _batches(interrupted, 2) == whole[1][:2]
    state = interrupted.state_dict()
    assert (state["epoch"], state["batches"]) == (1, 2)

    second = _train_dm(train_urls, num_workers)
    second.setup("fit")
    resumed = second.train_dataloader()
    resumed.load_state_dict(state)
    assert _batches(resumed) == whole[1][2:]  # the rest of epoch 1, keys and captions alike
    assert resumed.tally.samples == 10  # the replayed part counts towards the epoch's tally
    assert resumed.state_dict()["batches"] == 4

    done = _train_dm(train_urls, num_workers)
    done.setup("fit")
    after_epoch = done.train_dataloader()
    after_epoch.load_state_dict({**state, "batches": 4})  # a checkpoint at the end of epoch 1
    reference = _train_dm(train_urls, num_workers)
    reference.setup("fit")
    ref = reference.train_dataloader()
    ref.next_epoch = 2
    assert _batches(after_epoch) == _batches(ref)


def test_loader_warns_when_the_data_layout_changed(train_urls, lines):
    dm = _train_dm(train_urls, 0)
    dm.setup("fit")
    state = dm.train_dataloader().state_dict()
    state["layout"] = {**state["layout"], "num_workers": 4}
    dm.train_dataloader().load_state_dict(state)
    assert any(
        "the data layout changed since the checkpoint (num_workers)" in m for m in lines.messages(logging.WARNING)
    )


class KeyRecorder(LightningModule):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.steps: list[tuple[str, ...]] = []

    def training_step(self, batch, batch_idx):
        self.steps.append(tuple(batch["key"]))
        return (self.w - batch["image"].mean()).pow(2).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(root: Path, urls: str, max_steps: int, num_workers: int, ckpt_path: str | None = None) -> KeyRecorder:
    module = KeyRecorder()
    every = ModelCheckpoint(dirpath=root / "ckpt", filename="{step}", every_n_train_steps=1, save_top_k=-1)
    trainer = Trainer(
        default_root_dir=root,
        max_steps=max_steps,
        callbacks=[every],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(module, datamodule=_train_dm(urls, num_workers), ckpt_path=ckpt_path)
    assert trainer.global_step == max_steps
    return module


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resumed_fit_sees_the_batches_of_an_uninterrupted_fit(tmp_path, train_urls, num_workers):
    """Was: a fit resumed mid-epoch restarted the epoch's stream and trained on its first batches again."""
    whole = _fit(tmp_path, train_urls, 10, num_workers).steps  # 2.5 epochs of 4 batches
    assert len(whole) == 10 and len(set(whole[:4])) == 4
    for k in (2, 4, 5):  # mid-epoch 0, the end of epoch 0, mid-epoch 1
        resumed = _fit(
            tmp_path / f"r{k}", train_urls, 10, num_workers, ckpt_path=str(tmp_path / "ckpt" / f"step={k}.ckpt")
        ).steps
        assert resumed == whole[k:], k


def test_probe_on_img2dataset_shards_takes_relevance_from_images_not_specs(tmp_path):
    """Was: every img2dataset .json taken for an (empty) scene: every caption 'relevant' to every other."""
    from emf_lightning.probe.sets import shard_probe_set

    write_img2dataset_shard(tmp_path / "00000.tar", 0, 4)
    probe = shard_probe_set(str(tmp_path / "00000.tar"), n=4, image_encoder="pixels", resolution=16)
    assert probe.relevance_source == "image features (pixels) cosine, clamped to [0, 1]"
    assert probe.relevance.shape == (4, 4) and probe.relevance.min() < 1.0


def test_a_held_out_read_failure_on_rank_0_reaches_every_rank():
    """Rank 0 alone reads the held-out set; the others wait in its broadcast. They must get its error (and fail
    or, during fit, recover alike) instead of receiving nothing and evaluating on None."""
    from types import SimpleNamespace

    sent = []

    def broadcast(obj, src=0):
        sent.append(obj)
        return obj

    class NoData:
        def __iter__(self):
            raise OSError("val shard vanished")

    rank0 = SimpleNamespace(
        is_global_zero=True,
        world_size=2,
        strategy=SimpleNamespace(broadcast=broadcast),
        datamodule=SimpleNamespace(val_dataloader=NoData),
    )
    with pytest.raises(OSError, match="vanished"):
        EvaluationCallback()._held_out_set(rank0)
    assert sent == [(None, "OSError: val shard vanished")]
    rank1 = SimpleNamespace(
        is_global_zero=False, world_size=2, strategy=SimpleNamespace(broadcast=lambda obj, src=0: sent[0])
    )
    with pytest.raises(RuntimeError, match="rank 0 could not read the held-out set: OSError: val shard vanished"):
        EvaluationCallback()._held_out_set(rank1)


class RankKeys(Callback):
    """Every rank writes the keys of the batches it trained on (spawned processes share no memory)."""

    def __init__(self, out: Path):
        self.out, self.keys = out, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.keys.append(tuple(batch["key"]))

    def on_train_end(self, trainer, pl_module):
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.keys))


@pytest.mark.slow
def test_resumed_ddp_fit_sees_the_batches_of_an_uninterrupted_fit_on_every_rank(tmp_path, train_urls):
    """Two gloo ranks: rank 0's loader position in the checkpoint serves both ranks (same batches per epoch)."""

    def fit(out: Path, ckpt_path: str | None = None) -> list[list[list[str]]]:
        # 16 samples per epoch over 2 ranks in batches of 3: 3 batches (3, 3, 2) per rank and epoch
        dm = ShardDataModule(
            train_shards=train_urls,
            batch_size=3,
            num_workers=1,
            image_size=8,
            epoch_length=16,
            shuffle_buffer=4,
            seed=7,
        )
        every = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{step}", every_n_train_steps=1, save_top_k=-1)
        trainer = Trainer(
            default_root_dir=tmp_path,
            max_steps=7,
            accelerator="cpu",
            devices=2,
            strategy="ddp_spawn",
            callbacks=[every, RankKeys(out)],
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(KeyRecorder(), datamodule=dm, ckpt_path=ckpt_path)
        return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]

    whole = fit(tmp_path / "whole")
    assert [len(w) for w in whole] == [7, 7] and whole[0][:3] != whole[1][:3]
    resumed = fit(tmp_path / "resumed", ckpt_path=str(tmp_path / "ckpt" / "step=4.ckpt"))  # mid-epoch 1
    assert resumed == [w[4:] for w in whole]
