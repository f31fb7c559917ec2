"""Which Lightning strategies EMFModule runs, and the clear error for the others.

Replicated strategies (single device, every DDP variant) and FSDP2 (``ModelParallelStrategy``, data-parallel
only; tests/test_fsdp.py runs it) are supported; FSDP1 and DeepSpeed are refused before any step. See
docs/scaling.md.
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy, StrategyRegistry

from emf_lightning.data.datamodule import ShardDataModule
from emf_lightning.training import UnsupportedStrategyError, check_strategy

from helpers import shapes_batch, tiny_module, write_shapes_shards

REPLICATED = [
    "single_device",
    "ddp",
    "ddp_spawn",
    "ddp_fork",
    "ddp_notebook",
    "ddp_find_unused_parameters_false",
    "ddp_spawn_find_unused_parameters_true",
]


@pytest.mark.parametrize("name", REPLICATED)
def test_replicated_strategies_are_accepted(name):
    check_strategy(StrategyRegistry.get(name))


@pytest.mark.parametrize(
    "strategy",
    [StrategyRegistry.get("fsdp"), StrategyRegistry.get("fsdp_cpu_offload")],
    ids=["fsdp", "fsdp_cpu_offload"],
)
def test_fsdp1_is_refused_with_the_supported_list(strategy):
    with pytest.raises(UnsupportedStrategyError) as info:
        check_strategy(strategy)
    msg = str(info.value)
    assert f"({type(strategy).__name__})" in msg
    assert "EMA copy must be sharded exactly like the generator" in msg
    for name in (
        "single device",
        "ddp",
        "ddp_spawn",
        "_find_unused_parameters_false",
        "ModelParallelStrategy",
        "tensor_parallel_size=1",
    ):
        assert name in msg


def test_fsdp2_is_accepted_data_parallel_only():
    check_strategy(ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1))
    check_strategy(ModelParallelStrategy())  # "auto" sizes: resolved before the module's setup hook runs
    with pytest.raises(UnsupportedStrategyError, match="tensor_parallel_size=2: EMFModule shards data-parallel only"):
        check_strategy(ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=2))


class CPUFSDPStrategy(FSDPStrategy):
    """FSDP as Lightning runs it, minus its GPU-only check (which tests `type(strategy) is FSDPStrategy`),
    so the CPU test reaches the module's own check exactly where a GPU run would."""


def test_fit_under_fsdp_fails_before_any_step():
    module = tiny_module()
    before = {k: v.clone() for k, v in module.generator.state_dict().items()}
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        strategy=CPUFSDPStrategy(),
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    loader = torch.utils.data.DataLoader([shapes_batch(2, 16)], batch_size=None)
    try:
        with pytest.raises(UnsupportedStrategyError, match=r"strategy 'fsdp' \(CPUFSDPStrategy\)"):
            trainer.fit(module, loader)
    finally:  # FSDP set up a one-process group before the module's setup hook refused it
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    assert trainer.global_step == 0
    assert type(module.generator).__name__ == "Generator"  # never wrapped
    assert all(torch.equal(v, module.generator.state_dict()[k]) for k, v in before.items())


# ---------------------------------------------------------------------------------------------- eval data under DDP


@pytest.mark.parametrize("stage", ["validate", "test", "predict"])
def test_eval_shards_fewer_than_ranks_are_refused(stage, tmp_path, monkeypatch):
    # One validation shard: under 2 DDP ranks, one rank would get no batch and the other would wait for it
    # at the metric sync forever. A single process reads it fine.
    urls = write_shapes_shards(tmp_path, n_train=2, n_val=2, resolution=8, per_shard=2)
    single = ShardDataModule(val_shards=urls["val"], num_workers=0, image_size=8)
    single.setup(stage)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"1 shard\(s\) for 2 ranks; every rank needs at least one shard"):
        ShardDataModule(val_shards=urls["val"], num_workers=0, image_size=8).setup(stage)
