"""The LightningCLI behind ``emf fit|validate|test|predict`` (kept apart so ``emf --help`` stays light)."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.cli import LightningCLI

from emf_lightning.data.datamodule import ShardDataModule
from emf_lightning.training import EMFModule


class EMFLightningCLI(LightningCLI):
    """LightningCLI over EMFModule and ShardDataModule.

    The model is fixed (``model:`` holds EMFModule's arguments); its ``encoder`` argument is a class type,
    so jsonargparse takes any TextEncoder subclass by ``class_path``/``init_args``. Lightning stores the
    parsed config as the checkpoint's hyper-parameters (``load_from_checkpoint_support``), which is how
    ``EMFModule.load_from_checkpoint`` rebuilds the encoder without saving its weights.
    """

    def __init__(self, args: Any = None, **kwargs: Any) -> None:
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("seed_everything_default", 0)
        super().__init__(EMFModule, ShardDataModule, args=args, **kwargs)
