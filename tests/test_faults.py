"""Fault suite: bad input and faults a new user hits, each answered by a clear error, a counted skip, or a file
that is never written.

Section "CLI and checkpoints": checkpoint overrides, structural contradictions, one-line errors (exit 2, no
traceback; ``--debug`` keeps it), non-finite numbers, exploded weights, atomic checkpoint files.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from emf_lightning import cli
from emf_lightning.callbacks.checkpoint import FinalModelCheckpoint
from emf_lightning.checkpoint_io import AtomicCheckpointIO
from emf_lightning.errors import CheckpointError, ConfigError, InputNotFoundError
from emf_lightning.meanflow import MeanFlowLoss, TimeSampler
from emf_lightning.training import EMFModule, NonFiniteLossError, OptimConfig
from emf_lightning.training.sharding import max_abs

from helpers import FixedBatches, shapes_batch, tiny_module
from test_cli import BOW, CONFIGS, small_run_args

# ================================================================================================================
# CLI and checkpoints
# ================================================================================================================


@pytest.fixture(scope="module")
def trained(shards, tmp_path_factory) -> Path:
    """`emf fit` of the offline config, shrunk (bag-of-words encoder, tiny DiT, 16 px), with the configs' own
    FinalModelCheckpoint; returns its last.ckpt (saved cfg_scale 1.0, val_batch_size 2)."""
    root = tmp_path_factory.mktemp("run")
    args = [
        "fit",
        "--config",
        str(CONFIGS / "smollm_shapes.yaml"),
        *small_run_args(shards, root),
        f"--model.encoder={BOW}",
        "--trainer.max_steps=2",
        "--trainer.val_check_interval=2",
        "--trainer.limit_val_batches=1",
        "--trainer.callbacks=[]",
        "--trainer.callbacks+=emf_lightning.callbacks.checkpoint.FinalModelCheckpoint",
        "--trainer.callbacks.save_last=true",
    ]
    assert cli.main(args) == 0
    (last,) = root.rglob("last.ckpt")
    return last


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
