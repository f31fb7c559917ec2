"""The LightningCLI behind ``emf fit|validate|test|predict`` (kept apart so ``emf --help`` stays light)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_only

from emf_lightning.checkpoint_config import (
    JUDGING_CONFIG_KEY,
    check_overrides,
    check_weights_fit,
    judging_config,
    read_checkpoint,
)
from emf_lightning.data.datamodule import ShardDataModule
from emf_lightning.training import EMFModule


class EMFLightningCLI(LightningCLI):
    """LightningCLI over EMFModule and ShardDataModule.

    The model is fixed (``model:`` holds EMFModule's arguments); its ``encoder`` argument is a class type,
    so jsonargparse takes any TextEncoder subclass by ``class_path``/``init_args``. Lightning stores the
    parsed config as the checkpoint's hyper-parameters (``load_from_checkpoint_support``), which is how
    ``EMFModule.load_from_checkpoint`` rebuilds the encoder without saving its weights.
    """

    def __init__(self, args: Any = None, dry_run: bool = False, **kwargs: Any) -> None:
        self.dry_run = dry_run  # emf fit --dry-run: describe what would be built, build nothing (dry_run.py)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("seed_everything_default", 0)
        self._checkpoint: dict[str, Any] | None = None
        super().__init__(EMFModule, ShardDataModule, args=args, **kwargs)

    def _parse_ckpt_path(self) -> None:
        """Report and check the command line against the checkpoint, instead of overwriting it.

        Lightning's own version re-applies the checkpoint's model hyper-parameters *after* the command line, so
        ``--model.cfg_scale=3`` under ``--ckpt`` was silently dropped. ``cli.run_lightning`` already passes the
        checkpoint's config as the first config file, under the user's; here we only print each saved value the
        command line overrides and refuse changes to the architecture (``checkpoint_config``).
        """
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        ckpt_path = self.config[subcommand].get("ckpt_path")
        if not ckpt_path or not Path(ckpt_path).is_file():  # "last", "hpc", ...: Lightning resolves those later
            return
        self._checkpoint = read_checkpoint(ckpt_path)
        section = self.config[subcommand]
        _report_overrides(check_overrides(self._checkpoint, section.get("model"), section.get("data"), ckpt_path))

    def before_instantiate_classes(self) -> None:
        """Refuse an accelerator this machine lacks before anything is built (Lightning's own error is a
        traceback deep in the trainer)."""
        if self.dry_run:
            from emf_lightning.dry_run import DryRunFinished, dry_run

            print("\n".join(dry_run(self.config[self.subcommand]).lines))
            raise DryRunFinished
        trainer = self.config[self.subcommand].get("trainer") or {}
        check_accelerator(trainer.get("accelerator"))
        if trainer:
            trainer["precision"] = cpu_precision(trainer.get("precision"), trainer.get("accelerator"))

    def after_instantiate_classes(self) -> None:
        """With a checkpoint: the built model must have its parameter shapes (e.g. the encoder's width).
        Under fit: checkpoints also record how the run logs and judges, for ``emf validate --ckpt`` alone."""
        if self.subcommand == "fit":
            self.trainer.callbacks.append(RecordJudgingConfig(judging_config(self.config["fit"].get("trainer"))))
        if self._checkpoint is not None:
            check_weights_fit(self.model, self._checkpoint, self.config[self.subcommand].get("ckpt_path"))
            self._checkpoint = None  # memory-mapped: let the file go


def check_accelerator(accelerator: Any) -> None:
    """``trainer.accelerator: gpu`` (or cuda) on a machine without CUDA is a ConfigError naming the key."""
    import torch

    from emf_lightning.errors import ConfigError

    if isinstance(accelerator, str) and accelerator.lower() in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"trainer.accelerator is {accelerator!r} but this machine has no CUDA GPU "
            "(torch.cuda.is_available() is False): set --trainer.accelerator=cpu (or auto)"
        )


def cpu_precision(precision: Any, accelerator: Any, bf16_native: bool | None = None) -> Any:
    """``precision``, except bf16 autocast on a CPU without native bf16 arithmetic (no AVX512-BF16 or AMX: oneDNN
    emulates it), which becomes "32-true" with a warning: there a bf16 convolution runs about 4x slower than an fp32
    one and saves no memory worth having at CPU sizes. ``bf16_native``: whether the CPU has it (None: ask oneDNN)."""
    import torch

    if str(precision) not in ("bf16-mixed", "bf16") or torch.cuda.is_available() and accelerator != "cpu":
        return precision
    if bf16_native is None:
        try:
            bf16_native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):  # a build without oneDNN: leave the choice alone
            return precision
    if bf16_native:
        return precision
    capability = torch.backends.cpu.get_cpu_capability()
    print(
        f"trainer.precision {precision} -> 32-true: this CPU ({capability}) has no native bf16, where bf16 autocast "
        "is several times slower than float32",
        file=sys.stderr,
    )
    return "32-true"


@rank_zero_only
def _report_overrides(lines: list[str]) -> None:
    for line in lines:
        print(f"overriding the checkpoint's {line}", file=sys.stderr)


class RecordJudgingConfig(Callback):
    """Writes the run's logger and evaluation callbacks into every checkpoint (``checkpoint_config.judging_config``),
    so that ``emf validate --ckpt`` judges as the run did without its config files."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        checkpoint[JUDGING_CONFIG_KEY] = self.config
