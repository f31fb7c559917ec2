"""Which Lightning strategies EMFModule runs under, checked before Lightning wraps the model."""

from __future__ import annotations

from typing import Any

from emf_lightning.errors import ConfigError


class UnsupportedStrategyError(ConfigError):
    """The Trainer's strategy (or its settings) is one EMFModule does not support."""


SUPPORTED_STRATEGIES = (
    "single device (strategy auto/single_device), ddp, ddp_spawn, ddp_fork, ddp_notebook, and their "
    "_find_unused_parameters_false/_true variants (replicated weights); FSDP2 as "
    "lightning.pytorch.strategies.ModelParallelStrategy with tensor_parallel_size=1 (sharded weights)"
)


def check_strategy(strategy: Any) -> None:
    """Fail fast on strategies the module cannot run correctly.

    Replicated strategies (single device, every DDP variant) keep full weights on every rank. FSDP2 runs through
    Lightning's ``ModelParallelStrategy`` (``configure_model`` shards the generator and its EMA copy alike, see
    ``sharding.py``), data-parallel only: tensor parallelism would need a plan for every layer. Refused:
    ``FSDPStrategy`` (FSDP1: its flat parameters give the generator and its EMA copy different shard
    boundaries, so the EMA could not be a local update; FSDP2 does the same job) and DeepSpeed (partitions
    optimiser state and, at stage 3, weights behind the module's back).
    """
    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, ModelParallelStrategy, SingleDeviceStrategy

    name = getattr(strategy, "strategy_name", None) or type(strategy).__name__
    if isinstance(strategy, ModelParallelStrategy):
        tp = getattr(strategy, "_tensor_parallel_size", 1)
        if tp not in (1, "auto"):
            raise UnsupportedStrategyError(
                f"ModelParallelStrategy with tensor_parallel_size={tp}: EMFModule shards data-parallel only "
                "(FSDP2); set tensor_parallel_size=1 and data_parallel_size to the number of processes."
            )
        return
    # DeepSpeedStrategy subclasses DDPStrategy but partitions optimiser state and (stage 3) weights.
    if isinstance(strategy, DeepSpeedStrategy) or not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)):
        raise UnsupportedStrategyError(
            f"EMFModule does not support the strategy {name!r} ({type(strategy).__name__}): its EMA copy must "
            f"be sharded exactly like the generator. Supported: {SUPPORTED_STRATEGIES}. "
            "Use --trainer.strategy=ddp, or ModelParallelStrategy for sharded weights (see docs/scaling.md)."
        )
