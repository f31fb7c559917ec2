"""DDP gradient sync through a MeanFlow step (issue 7, section 4).

The risk: MeanFlow's u comes out of ``torch.func.jvp``; if the JVP path bypassed DDP's autograd hooks,
each rank would step on its own local gradient and the replicas would drift apart silently. The test runs
ONE real ``EMFModule.training_step`` under Lightning's DDP strategy with 2 gloo processes on the CPU
(selective JVP, rows with r != t, condition dropout), records on every rank the exact draws the loss
used (noise, (r, t), dropout mask) and the gradients Lightning hands to the optimiser, and checks that

* the gradients are bit-identical on both ranks, although the ranks saw different data and draws;
* they equal the gradients of a single-process step on the concatenated batch with the same draws.

A second, lighter test wraps the generator itself in ``torch.nn.parallel.DistributedDataParallel`` and
passes the wrapper to the production ``MeanFlowLoss`` (graph-free JVP, then a plain forward) and to the
naive reference (``torch.func.jvp`` through DDP's forward); the same two properties must hold.

The equality with the concatenated batch holds because the adaptive weight is per sample and both ranks have the same batch
size: the mean over the concatenated batch is the mean of the per-rank means, which is what DDP's
gradient averaging computes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from lightning.pytorch.callbacks import Callback

from emf_lightning.meanflow import MeanFlowLoss, TimeSampler, concat_conditions, null_condition
from emf_lightning.meanflow.naive import ReferenceMeanFlowLoss
from emf_lightning.models.generator import build_generator

from helpers import FixedBatches, shapes_batch, tiny_module

PER_RANK = 4


# Half the rows with r != t and a high dropout share, so both JVP rows and dropped conditions occur on
# 8 rows (asserted below: the draws are a fixed function of the module seed, step and rank).
def module_kwargs() -> dict[str, Any]:
    return dict(loss=MeanFlowLoss(TimeSampler(neq_ratio=0.5), cond_drop_prob=0.3), seed=0)


class RecordFirstStep(Callback):
    """Per rank: the initial generator weights, the loss inputs and draws of step 0, and its gradients.

    The loss's ``compute`` is wrapped so the record holds exactly what the loss saw (after the module
    encoded the captions and the loss drew noise, times and dropout from the module's per-rank stream).
    Gradients are taken in ``on_before_optimizer_step``: after backward and DDP's all-reduce, before
    clipping and the optimiser.
    """

    def __init__(self, out_dir: str):
        self.out_dir = out_dir

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.record: dict[str, Any] = {
            "init": {k: v.detach().clone() for k, v in pl_module.generator.state_dict().items()},
            "ddp_wrapped": type(trainer.strategy.model).__name__,
        }
        loss_fn = pl_module.loss_fn
        compute = loss_fn.compute

        def recording_compute(net, x, e, r, t, cond, null_cond=None, drop=None):
            loss, stats = compute(net, x, e, r, t, cond, null_cond, drop)
            self.record.update(
                net_is_generator=net is pl_module.generator,
                x=x.detach().clone(),
                e=e.detach().clone(),
                r=r.detach().clone(),
                t=t.detach().clone(),
                drop=None if drop is None else drop.clone(),
                loss=loss.detach().clone(),
            )
            return loss, stats

        loss_fn.compute = recording_compute  # instance attribute: MeanFlowLoss.__call__ finds it first

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.record["caption"] = list(batch["caption"])

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.record["grads"] = {
            name: None if p.grad is None else p.grad.detach().clone()
            for name, p in pl_module.generator.named_parameters()
        }
        torch.save(self.record, Path(self.out_dir) / f"rank{trainer.global_rank}.pt")


def reference_gradients(init: dict[str, torch.Tensor], records: list[dict[str, Any]]) -> tuple[dict, torch.Tensor]:
    """Gradients and loss of one single-process step on the concatenated batch with the recorded draws.

    The captions are encoded afresh as one batch (padded to the longest caption of both ranks), so the
    reference shares no tensor with the DDP run except the data and the draws.
    """
    module = tiny_module(**module_kwargs())
    module.generator.load_state_dict(init)
    cat = {k: torch.cat([rec[k] for rec in records]) for k in ("x", "e", "r", "t", "drop")}
    captions = [c for rec in records for c in rec["caption"]]
    feats = module.encode_text(captions)
    null = null_condition(1, module.encoder.dim)
    loss, _ = module.loss_fn.compute(
        module.generator, cat["x"], cat["e"], cat["r"], cat["t"], (feats.tokens, feats.mask), null, cat["drop"]
    )
    loss.backward()
    return {name: p.grad for name, p in module.generator.named_parameters()}, loss.detach()


@pytest.mark.slow
def test_meanflow_step_gradients_under_lightning_ddp_match_the_concatenated_batch(tmp_path: Path):
    torch.manual_seed(0)
    module = tiny_module(**module_kwargs())
    batches = [shapes_batch(PER_RANK, 16, seed=s) for s in range(2)]
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[RecordFirstStep(str(tmp_path))],
    )
    # Lightning's DistributedSampler gives rank k the batch at index k.
    trainer.fit(module, torch.utils.data.DataLoader(FixedBatches(batches), batch_size=None))
    records = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]

    # The step ran the real path: Lightning's DDP wrapper around the module, the loss on the generator.
    assert all(rec["ddp_wrapped"] == "DistributedDataParallel" and rec["net_is_generator"] for rec in records)
    # Both ranks started from the same weights but saw different images, captions and draws.
    for name, value in records[0]["init"].items():
        assert torch.equal(value, records[1]["init"][name]), name
    assert not torch.equal(records[0]["x"], records[1]["x"])
    assert records[0]["caption"] != records[1]["caption"]
    assert not torch.equal(records[0]["e"], records[1]["e"])
    # The step exercised selective JVP and condition dropout: mixed r != t and dropped rows.
    neq = torch.cat([rec["r"] != rec["t"] for rec in records])
    drop = torch.cat([rec["drop"] for rec in records])
    assert 0 < int(neq.sum()) < neq.numel(), neq
    assert 0 < int(drop.sum()) < drop.numel(), drop

    grads = [rec["grads"] for rec in records]
    assert all(g is not None for g in grads[0].values()), "a generator parameter got no gradient"
    for name in grads[0]:
        assert torch.equal(grads[0][name], grads[1][name]), f"{name}: gradients differ between ranks"

    ref_grads, ref_loss = reference_gradients(records[0]["init"], records)
    torch.testing.assert_close(ref_loss, (records[0]["loss"] + records[1]["loss"]) / 2, rtol=1e-5, atol=0)
    for name, g in grads[0].items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")
    # The check is sensitive: either rank's local (un-synced) gradient is far from the synced one.
    local_grads, _ = reference_gradients(records[0]["init"], records[:1])
    total = sum(float((local_grads[n] - grads[0][n]).norm() ** 2) for n in grads[0]) ** 0.5
    scale = sum(float(grads[0][n].norm() ** 2) for n in grads[0]) ** 0.5
    assert total > 0.05 * scale


# ---------------------------------------------------------------------------------------------- DDP around the generator


# The project's DiT, and a diffusers SANA transformer behind the adapter (its interval embedder random, so
# that every parameter gets a gradient); (channels, size) of what each models.
BACKBONES = {"dit": (3, 16), "sana": (4, 8)}


def _generator(backbone: str = "dit") -> torch.nn.Module:
    torch.manual_seed(0)
    if backbone == "sana":
        from emf_lightning.models import Generator, SanaMeanFlowBackbone

        return Generator.for_backbone(SanaMeanFlowBackbone.from_config("tiny", interval_init="random"), 16)
    return build_generator("tiny", text_dim=16, input_size=16, patch_size=4, hidden_size=32, depth=1, num_heads=2)


def _rank_inputs(rank: int, loss_fn: MeanFlowLoss, backbone: str = "dit") -> dict[str, Any]:
    """Rank-specific data, text of a rank-specific length, and the loss's own draws from a per-rank seed."""
    gen = torch.Generator().manual_seed(10 + rank)
    channels, size = BACKBONES[backbone]
    x = torch.rand(PER_RANK, channels, size, size, generator=gen) * 2 - 1
    length = 5 + 2 * rank  # the reference must pad the two ranks' conditions to one length
    tokens = torch.randn(PER_RANK, length, 16, generator=gen)
    mask = torch.arange(length)[None] < torch.randint(1, length + 1, (PER_RANK, 1), generator=gen)
    e, r, t, drop = loss_fn.draw(x, 0.0, gen)
    return {"x": x, "cond": (tokens * mask[..., None], mask), "e": e, "r": r, "t": t, "drop": drop}


LOSSES = {"production": MeanFlowLoss, "reference": ReferenceMeanFlowLoss}


def _loss_fn(kind: str) -> MeanFlowLoss:
    return LOSSES[kind](TimeSampler(neq_ratio=0.5), cond_drop_prob=0.3)


def _direct_ddp_worker(rank: int, init_file: str, out_dir: str, kind: str, backbone: str) -> None:
    torch.set_num_threads(1)  # forked from pytest, which may have started intra-op threads
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        net = _generator(backbone)
        # forward_sync_buffers=False: DDP's per-forward buffer broadcast is an in-place copy, which
        # torch.func.jvp refuses inside its transform (a loud RuntimeError, not a silent skip). The buffers
        # (sin-cos tables) are constant, so there is nothing to sync. Lightning's DDP wraps the whole
        # LightningModule and broadcasts before the JVP, so it needs no such option.
        ddp = torch.nn.parallel.DistributedDataParallel(net, forward_sync_buffers=False)
        loss_fn = _loss_fn(kind)
        inputs = _rank_inputs(rank, loss_fn, backbone)
        loss, _ = loss_fn.compute(
            ddp,
            inputs["x"],
            inputs["e"],
            inputs["r"],
            inputs["t"],
            inputs["cond"],
            null_condition(1, 16),
            inputs["drop"],
        )
        loss.backward()
        grads = {name: None if p.grad is None else p.grad.clone() for name, p in net.named_parameters()}
        torch.save({"grads": grads, "inputs": inputs}, os.path.join(out_dir, f"direct{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(
    "kind, backbone",
    [("production", "dit"), ("reference", "dit"), pytest.param("production", "sana", marks=pytest.mark.slow)],
)
def test_jvp_through_a_ddp_wrapped_generator_syncs_gradients(kind, backbone, tmp_path: Path):
    if backbone == "sana":
        pytest.importorskip("diffusers")
    # fork: the two ranks need no fresh imports (seconds each on a busy machine)
    mp.start_processes(
        _direct_ddp_worker,
        args=(str(tmp_path / "init"), str(tmp_path), kind, backbone),
        nprocs=2,
        join=True,
        start_method="fork",
    )
    records = [torch.load(tmp_path / f"direct{r}.pt", weights_only=False) for r in range(2)]
    grads = [rec["grads"] for rec in records]
    assert all(g is not None for g in grads[0].values())
    for name in grads[0]:
        assert torch.equal(grads[0][name], grads[1][name]), f"{name}: gradients differ between ranks"

    ins = [rec["inputs"] for rec in records]
    neq = torch.cat([i["r"] != i["t"] for i in ins])
    drop = torch.cat([i["drop"] for i in ins])
    assert 0 < int(neq.sum()) < neq.numel() and 0 < int(drop.sum()) < drop.numel()

    net = _generator(backbone)
    cat = {k: torch.cat([i[k] for i in ins]) for k in ("x", "e", "r", "t", "drop")}
    loss, _ = _loss_fn(kind).compute(
        net,
        cat["x"],
        cat["e"],
        cat["r"],
        cat["t"],
        concat_conditions(ins[0]["cond"], ins[1]["cond"]),
        null_condition(1, 16),
        cat["drop"],
    )
    loss.backward()
    for name, p in net.named_parameters():
        torch.testing.assert_close(grads[0][name], p.grad, rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")
