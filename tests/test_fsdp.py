"""FSDP2 (Lightning's ModelParallelStrategy) through real MeanFlow steps: 2 gloo processes on the CPU.

Each rank runs ``Trainer.fit`` for two optimiser steps under ``ModelParallelStrategy(data_parallel_size=2,
tensor_parallel_size=1)`` with the EvaluationCallback at train end, then saves a full checkpoint. Every rank
records the exact draws its loss used and the full (gathered) gradients, weights and EMA weights. The parent
checks that

* the generator and its EMA copy really were sharded (DTensor parameters, half the elements per rank);
* the first step's gradient equals a single-process step on the concatenated batch with the same draws;
* after each step the EMA is the warm-up lerp of the previous EMA and the new weights, element by element,
  although each rank only updated its own shards;
* the checkpoint loads into an ordinary single-process module with exactly those weights;
* the discriminability probe read the sharded connector on rank 0 at fit start and after each step;
* the evaluation finished with an odd number of generation batches (one rank pads with a dummy batch; a rank
  calling the sharded generator fewer times would hang the all-gathers) and both ranks got the same result.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.multiprocessing as mp
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import ModelParallelStrategy

from emf_lightning.callbacks.evaluation import EvaluationCallback
from emf_lightning.callbacks.probe import DiscriminabilityProbe
from emf_lightning.meanflow import MeanFlowLoss, TimeSampler, null_condition
from emf_lightning.models import DiT, UNet
from emf_lightning.training.ema import ema_decay_at
from emf_lightning.training.sharding import grad_norm

from helpers import FixedBatches, shapes_batch, tiny_module

pytestmark = pytest.mark.slow

PER_RANK = 4
BACKBONES: dict[str, Any] = {
    # two DiT blocks: two block units plus the root unit
    "dit": lambda: DiT(preset="tiny", input_size=16, patch_size=4, hidden_size=32, depth=2, num_heads=2),
    # channels-last conv weights (made contiguous for FSDP2), GroupNorm, skips
    "unet": lambda: UNet(
        preset="tiny",
        input_size=16,
        base_channels=16,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(2,),
        head_dim=16,
        context_dim=32,
    ),
}


def module_kwargs(backbone: str) -> dict[str, Any]:
    return dict(
        loss=MeanFlowLoss(TimeSampler(neq_ratio=0.5), cond_drop_prob=0.3),
        seed=0,
        optim={"ema_decay": 0.99, "lr": 1e-3},
        backbone=BACKBONES[backbone](),
    )


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


class Record(Callback):
    """Per rank: draws and loss of step 0, full gradients of step 0, full weights and EMA after each step."""

    def __init__(self) -> None:
        self.rec: dict[str, Any] = {"after": []}

    def on_train_start(self, trainer, pl_module) -> None:
        from torch.distributed.tensor import DTensor

        p = next(pl_module.generator.parameters())
        self.rec.update(
            sharded=isinstance(p, DTensor)
            and all(isinstance(q, DTensor) for q in pl_module.ema_generator.parameters()),
            local_share=sum(q.to_local().numel() for q in pl_module.generator.parameters())
            / sum(q.numel() for q in pl_module.generator.parameters()),
            init={k: _full(v) for k, v in pl_module.generator.state_dict().items()},
            init_ema={k: _full(v) for k, v in pl_module.ema_generator.state_dict().items()},
        )
        compute = pl_module.loss_fn.compute

        def recording(net, x, e, r, t, cond, null_cond=None, drop=None):
            loss, stats = compute(net, x, e, r, t, cond, null_cond, drop)
            if "x" not in self.rec:
                self.rec.update(
                    x=x.clone(), e=e.clone(), r=r.clone(), t=t.clone(), drop=drop.clone(), loss=loss.detach().clone()
                )
            return loss, stats

        pl_module.loss_fn.compute = recording

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.rec.setdefault("caption", list(batch["caption"]))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        grads = {n: _full(p.grad) for n, p in pl_module.generator.named_parameters()}  # collective
        self.rec.setdefault("grads", grads)
        self.rec.setdefault("grad_norm", grad_norm(pl_module.generator.parameters()))  # collective

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.rec["after"].append(
            (
                {k: _full(v) for k, v in pl_module.generator.state_dict().items()},
                {k: _full(v) for k, v in pl_module.ema_generator.state_dict().items()},
            )
        )


def _worker(rank: int, port: int, out_dir: str, backbone: str) -> None:
    # What torchrun sets: Lightning then joins these processes instead of launching its own.
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE="2",
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        NODE_RANK="0",
        GROUP_RANK="0",
        LOCAL_WORLD_SIZE="2",
    )
    torch.set_num_threads(1)
    torch.manual_seed(0)
    module = tiny_module(**module_kwargs(backbone))
    # Train: two steps, rank k takes batches k and 2 + k (Lightning's DistributedSampler, no shuffling).
    train = FixedBatches([shapes_batch(PER_RANK, 16, seed=s) for s in range(4)])
    # Held-out: 5 captions in batches of 2 -> batches 0, 2 on rank 0 and batch 1 on rank 1 (unequal).
    val = FixedBatches([shapes_batch(5, 16, seed=9)])
    evaluation = EvaluationCallback(
        every_n_steps=0,
        num_samples=5,
        batch_size=2,
        steps=(1,),
        fid=False,
        clip_score=False,
        shapes_eval=True,
        grid_prompts=0,
        on_train_end=True,
    )
    record = Record()
    # The probe reads the connector, a child of the sharded root unit, on rank 0 only.
    probe = DiscriminabilityProbe(every_n_steps=1, n=16, k=2, n_pairs=4, batch_size=8)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1, save_distributed_checkpoint=False),
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=1,
        gradient_clip_val=1.0,
        callbacks=[record, evaluation, probe],
        default_root_dir=out_dir,
    )
    loader = torch.utils.data.DataLoader(train, batch_size=None, shuffle=False)
    trainer.fit(module, loader, torch.utils.data.DataLoader(val, batch_size=None))
    trainer.save_checkpoint(os.path.join(out_dir, "fsdp.ckpt"))  # collective: full state gathered on rank 0
    record.rec["eval"] = {k: dict(v) for k, v in evaluation.last_result.rows.items()}
    record.rec["probe"] = probe.history
    torch.save(record.rec, os.path.join(out_dir, f"rank{rank}.pt"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_fsdp2_meanflow_steps_match_a_single_process_and_round_trip(backbone: str, tmp_path: Path):
    mp.start_processes(_worker, args=(_free_port(), str(tmp_path), backbone), nprocs=2, join=True, start_method="spawn")
    recs = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]

    # Really sharded, both copies, about half of the elements on each rank.
    for rec in recs:
        assert rec["sharded"], "generator or EMA parameters are not DTensors"
        assert 0.4 < rec["local_share"] < 0.6, rec["local_share"]
    # The ranks saw different data and draws; the step mixed r != t rows and dropped conditions.
    assert recs[0]["caption"] != recs[1]["caption"] and not torch.equal(recs[0]["e"], recs[1]["e"])
    neq = torch.cat([rec["r"] != rec["t"] for rec in recs])
    drop = torch.cat([rec["drop"] for rec in recs])
    assert 0 < int(neq.sum()) < neq.numel() and 0 < int(drop.sum()) < drop.numel()

    # Step 0's gradient == one process on the concatenated batch with the same draws.
    ref = tiny_module(**module_kwargs(backbone))
    ref.generator.load_state_dict(recs[0]["init"])
    cat = {k: torch.cat([rec[k] for rec in recs]) for k in ("x", "e", "r", "t", "drop")}
    feats = ref.encode_text([c for rec in recs for c in rec["caption"]])
    loss, _ = ref.loss_fn.compute(
        ref.generator,
        cat["x"],
        cat["e"],
        cat["r"],
        cat["t"],
        (feats.tokens, feats.mask),
        null_condition(1, ref.encoder.dim),
        cat["drop"],
    )
    loss.backward()
    torch.testing.assert_close(loss.detach(), (recs[0]["loss"] + recs[1]["loss"]) / 2, rtol=1e-5, atol=0)
    scale = max(float(p.grad.abs().max()) for p in ref.generator.parameters())
    for name, p in ref.generator.named_parameters():
        for rec in recs:
            torch.testing.assert_close(
                rec["grads"][name], p.grad, rtol=1e-4, atol=1e-6 * scale, msg=lambda m: f"{name}: {m}"
            )
    # grad_norm on the DTensor shards (reduced over both ranks) == the norm of the full gradient.
    full_norm = torch.cat([p.grad.flatten() for p in ref.generator.parameters()]).norm()
    for rec in recs:
        assert not hasattr(rec["grad_norm"], "to_local")  # a plain tensor, the same global value on every rank
        torch.testing.assert_close(rec["grad_norm"], full_norm, rtol=1e-4, atol=0)

    # The EMA, updated shard by shard, is the warm-up lerp of the full tensors after every step.
    ema_prev = recs[0]["init_ema"]
    for step, (weights, ema) in enumerate(recs[0]["after"]):
        d = ema_decay_at(step, 0.99)
        for name, value in ema.items():
            torch.testing.assert_close(
                value,
                d * ema_prev[name] + (1 - d) * weights[name],
                rtol=1e-5,
                atol=1e-7,
                msg=lambda m: f"step {step} {name}: {m}",
            )
        assert any(not torch.equal(weights[n], recs[0]["init"][n]) for n in weights)  # the step moved weights
        ema_prev = ema
    for a, b in zip(recs[0]["after"], recs[1]["after"], strict=True):  # one model, seen from both ranks
        assert all(torch.equal(a[0][n], b[0][n]) for n in a[0]) and all(torch.equal(a[1][n], b[1][n]) for n in a[1])

    # The full checkpoint loads into a plain single-process module with exactly the trained weights.
    from emf_lightning.training import EMFModule

    plain = EMFModule.load_from_checkpoint(tmp_path / "fsdp.ckpt", map_location="cpu")
    weights, ema = recs[0]["after"][-1]
    for name, value in plain.generator.state_dict().items():
        assert torch.equal(value, weights[name]), name
    for name, value in plain.ema_generator.state_dict().items():
        assert torch.equal(value, ema[name]), name

    # The evaluation ran to the end on both ranks and agrees.
    assert recs[0]["eval"] and recs[0]["eval"] == recs[1]["eval"]
    # The probe ran on rank 0 at fit start and after both steps, through the gathered connector weights.
    steps = [step for step, metrics in recs[0]["probe"] if any("/connector/" in k for k in metrics)]
    assert steps == [0, 1, 2] and recs[1]["probe"] == []
