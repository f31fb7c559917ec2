"""DiscriminabilityProbe inside a real Lightning Trainer, on a small stand-in module."""

import csv
import zlib
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from emf_lightning.callbacks.probe import DiscriminabilityProbe
from emf_lightning.probe.evaluation import EncodedCaptions, encode_captions, evaluate_encoded, evaluate_probe
from emf_lightning.probe.sets import shapes_probe_set

DIM = 12


class WordEncoder:
    """Frozen stand-in: a fixed random vector per word."""

    dim = DIM

    def encode(self, captions):
        rows = [
            [torch.randn(DIM, generator=torch.Generator().manual_seed(zlib.crc32(w.encode()))) for w in c.split()]
            for c in captions
        ]
        length = max(map(len, rows))
        tokens = torch.zeros(len(rows), length, DIM)
        mask = torch.zeros(len(rows), length, dtype=torch.bool)
        for i, r in enumerate(rows):
            tokens[i, : len(r)] = torch.stack(r)
            mask[i, : len(r)] = True
        return SimpleNamespace(tokens=tokens, mask=mask, pooled=tokens.mean(1))


class LinearConnector(nn.Linear):
    """A per-token linear map called as the generator calls its connector: ``connector(tokens, mask)``."""

    def forward(self, tokens, mask=None):
        return super().forward(tokens)


class StandIn(pl.LightningModule):
    """Trains only a connector (identity at init) to push every caption towards one direction."""

    def __init__(self):
        super().__init__()
        self.encoder = WordEncoder()
        linear = LinearConnector(DIM, DIM)
        with torch.no_grad():
            linear.weight.copy_(torch.eye(DIM))
            linear.bias.zero_()
        self.generator = nn.Module()
        self.generator.connector = linear

    def training_step(self, batch, batch_idx):
        feats = self.encoder.encode(["a red circle", "two blue squares"])
        out = self.generator.connector(feats.tokens)
        return -out[..., 0].mean()  # collapses features onto axis 0: anisotropy must rise

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.zeros(8, 1), batch_size=1)


@pytest.fixture(scope="module")
def probe():
    return shapes_probe_set(n=16, group=2, seed=4, n_pairs=3, n_reduce=3)


def test_probe_callback_logs_frozen_once_and_connector_every_n_steps(tmp_path, probe):
    cb = DiscriminabilityProbe(every_n_steps=2, k=2, probe_set=probe)
    trainer = pl.Trainer(
        max_steps=4,
        callbacks=[cb],
        logger=CSVLogger(tmp_path),
        accelerator="cpu",
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(StandIn())
    assert [step for step, _ in cb.history] == [0, 2, 4]
    first = cb.history[0][1]
    # Frozen features are probed once; they match a direct evaluation of the encoder.
    direct = evaluate_probe(probe, WordEncoder().encode, k=2).metrics
    for name, value in direct.items():
        assert first[f"probe/frozen/{name}"] == pytest.approx(value)
    assert not any(k.startswith("probe/frozen/") for k in cb.history[1][1])
    # An identity connector leaves every metric unchanged at fit start.
    for name, value in direct.items():
        assert first[f"probe/connector/{name}"] == pytest.approx(value)
    # Training collapses the connector's output onto one axis: the probe sees it.
    aniso = [m["probe/connector/anisotropy/pooled"] for _, m in cb.history]
    assert aniso[2] > aniso[0] + 0.1
    # The metrics reach the logger.
    rows = list(csv.DictReader(open(tmp_path / "lightning_logs" / "version_0" / "metrics.csv")))
    logged = [r for r in rows if r.get("probe/connector/anisotropy/pooled")]
    assert [int(r["step"]) for r in logged] == [0, 2, 4]


def test_probe_callback_needs_a_connector(probe):
    class NoConnector(StandIn):
        def __init__(self):
            super().__init__()
            self.generator = nn.Module()
            self.weight = nn.Parameter(torch.zeros(1))

        def training_step(self, batch, batch_idx):
            return self.weight.sum()

    cb = DiscriminabilityProbe(every_n_steps=0, probe_set=probe)
    trainer = pl.Trainer(
        max_steps=1,
        callbacks=[cb],
        logger=False,
        accelerator="cpu",
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with pytest.raises(AttributeError, match=r"needs pl_module.generator.connector"):
        trainer.fit(NoConnector())


@pytest.mark.slow
def test_probe_callback_with_the_real_emf_module(probe):
    from helpers import shapes_batch, tiny_module

    module = tiny_module()
    batch = shapes_batch(n=2, resolution=16)
    loader = torch.utils.data.DataLoader([batch] * 4, batch_size=None)
    cb = DiscriminabilityProbe(every_n_steps=1, k=2, probe_set=probe)
    trainer = pl.Trainer(
        max_steps=2,
        callbacks=[cb],
        logger=False,
        accelerator="cpu",
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, train_dataloaders=loader)
    assert [step for step, _ in cb.history] == [0, 1, 2]
    start, end = cb.history[0][1], cb.history[-1][1]
    direct = evaluate_probe(probe, module.encoder.encode, k=2).metrics
    assert start["probe/frozen/same_scene_auc"] == pytest.approx(direct["same_scene_auc"])
    # The EMA copy starts equal to the connector.
    assert start["probe/connector_ema/anisotropy/pooled"] == pytest.approx(start["probe/connector/anisotropy/pooled"])
    # The last entry is the trained connector's output, recomputed here independently.
    frozen = encode_captions(module.encoder.encode, probe.all_captions())
    with torch.no_grad():
        mapped = module.generator.connector(frozen.tokens) * frozen.mask.unsqueeze(-1)
    expected = evaluate_encoded(probe, EncodedCaptions(frozen.captions, mapped, frozen.mask), k=2).metrics
    for name, value in expected.items():
        assert end[f"probe/connector/{name}"] == pytest.approx(value, rel=1e-5, abs=1e-6), name
