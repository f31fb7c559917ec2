"""Training: the LightningModule, its optimiser settings, EMA, init_from, strategies and FSDP2 sharding."""

from emf_lightning.training.module import EMFModule, NonFiniteLossError
from emf_lightning.training.optim import OptimConfig
from emf_lightning.training.strategies import UnsupportedStrategyError, check_strategy

__all__ = ["EMFModule", "NonFiniteLossError", "OptimConfig", "UnsupportedStrategyError", "check_strategy"]
