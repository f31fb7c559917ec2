"""DiscriminabilityProbe: the probe's metrics during training, for frozen features and the trained connector.

The frozen encoder's features never change, so they are probed once, at fit start. The connector
(``pl_module.generator.connector``, and the EMA copy's when the module has one) is trained, so its output
is probed at fit start and every ``every_n_steps`` optimiser steps: is training making the text
representation the backbone reads more or less discriminative than what the encoder gave it?
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from emf_lightning.probe.evaluation import EncodedCaptions, encode_captions, evaluate_encoded
from emf_lightning.probe.sets import ProbeSet, shapes_probe_set
from emf_lightning.training.sharding import unsharded


class DiscriminabilityProbe(pl.Callback):
    """Log discriminability metrics of the text representation at fit start and every N steps.

    Args:
        every_n_steps: probe the connector every this many optimiser steps (0 = only at fit start).
        n: retrieval captions in the probe set (shapes world, ``group`` paraphrases per scene).
        k: neighbours per query for retrieval.
        group: paraphrases per scene in the retrieval pool.
        n_pairs: scenes used for minimal pairs and reductions (each gives up to five pairs).
        seed: seed of the probe set (the shapes world and the paraphrase draws).
        batch_size: captions per encoder / connector call.
        probe_set: a ready ``ProbeSet``; when given, ``n``, ``group``, ``n_pairs`` and ``seed`` are unused.
        prefix: metric name prefix, e.g. ``probe/connector/retrieval/relevance_at_k``.

    Metrics go to every logger of the trainer (rank zero only) and to ``self.history`` as
    ``(global_step, {name: value})``.
    """

    def __init__(
        self,
        every_n_steps: int = 1000,
        n: int = 256,
        k: int = 2,
        group: int = 2,
        n_pairs: int = 64,
        seed: int = 0,
        batch_size: int = 64,
        probe_set: ProbeSet | None = None,
        prefix: str = "probe",
    ):
        super().__init__()
        if every_n_steps < 0:
            raise ValueError(f"every_n_steps must be >= 0, got {every_n_steps}")
        self.every_n_steps, self.n, self.k, self.group = every_n_steps, n, k, group
        self.n_pairs, self.seed, self.batch_size, self.prefix = n_pairs, seed, batch_size, prefix
        self.probe_set = probe_set
        self.history: list[tuple[int, dict[str, float]]] = []
        self._frozen: EncodedCaptions | None = None
        self._last_step = -1

    # ------------------------------------------------------------------ helpers
    def _probe(self) -> ProbeSet:
        if self.probe_set is None:
            self.probe_set = shapes_probe_set(
                n=self.n, group=self.group, seed=self.seed, n_pairs=self.n_pairs, n_reduce=self.n_pairs
            )
        return self.probe_set

    @staticmethod
    def _encode_fn(pl_module: pl.LightningModule):
        # Prefer the module's own path (feature cache, device placement); fall back to the bare encoder.
        if hasattr(pl_module, "encode_text"):
            return lambda captions: pl_module.encode_text(captions)
        return lambda captions: pl_module.encoder.encode(captions)

    @torch.no_grad()
    def _through(self, connector: nn.Module, frozen: EncodedCaptions, device: torch.device) -> EncodedCaptions:
        """The frozen token features mapped by ``connector`` (``connector(tokens, mask)``: the caption's tokens as
        the backbone reads them; slot tokens, which stand for no word, are not probed), padding zeroed again, on
        CPU in float32."""
        outs: list[Tensor] = []
        dtype = next(connector.parameters()).dtype
        for start in range(0, frozen.tokens.shape[0], self.batch_size):
            tok = frozen.tokens[start : start + self.batch_size].to(device=device, dtype=dtype)
            mask = frozen.mask[start : start + self.batch_size]
            out = connector(tok, mask.to(device)).float().cpu()
            outs.append(out * mask.unsqueeze(-1))
        return EncodedCaptions(frozen.captions, torch.cat(outs), frozen.mask)

    def _connectors(self, pl_module: pl.LightningModule) -> dict[str, nn.Module]:
        found = {}
        for label, attr in (("connector", "generator"), ("connector_ema", "ema_generator")):
            gen = getattr(pl_module, attr, None)
            conn = getattr(gen, "connector", None) if gen is not None else None
            if isinstance(conn, nn.Module):
                found[label] = conn
        if "connector" not in found:
            raise AttributeError("DiscriminabilityProbe needs pl_module.generator.connector (an nn.Module)")
        return found

    def _emit(self, trainer: pl.Trainer, metrics: dict[str, float]) -> None:
        step = trainer.global_step
        self.history.append((step, metrics))
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    def _run(self, trainer: pl.Trainer, pl_module: pl.LightningModule, include_frozen: bool) -> None:
        # Under FSDP2 the connector's weights are shards: every rank joins gathering them, rank 0 probes.
        with ExitStack() as stack:
            for attr in ("generator", "ema_generator"):
                if getattr(pl_module, attr, None) is not None:
                    stack.enter_context(unsharded(getattr(pl_module, attr)))
            if trainer.is_global_zero:
                self._probe_on_rank_zero(trainer, pl_module, include_frozen)

    def _probe_on_rank_zero(self, trainer: pl.Trainer, pl_module: pl.LightningModule, include_frozen: bool) -> None:
        probe = self._probe()
        out: dict[str, float] = {}
        if self._frozen is None:
            self._frozen = encode_captions(self._encode_fn(pl_module), probe.all_captions(), self.batch_size)
        if include_frozen:
            res = evaluate_encoded(probe, self._frozen, k=self.k, seed=self.seed)
            out.update({f"{self.prefix}/frozen/{name}": v for name, v in res.metrics.items()})
        was_training = pl_module.training
        for label, connector in self._connectors(pl_module).items():
            res = evaluate_encoded(
                probe, self._through(connector, self._frozen, pl_module.device), k=self.k, seed=self.seed
            )
            out.update({f"{self.prefix}/{label}/{name}": v for name, v in res.metrics.items()})
        pl_module.train(was_training)
        self._last_step = trainer.global_step
        self._emit(trainer, out)

    # ------------------------------------------------------------------ hooks
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Probe the frozen features and the (untrained or resumed) connector."""
        self._run(trainer, pl_module, include_frozen=True)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Probe the connector when the optimiser step count reaches a multiple of ``every_n_steps``."""
        step = trainer.global_step
        # global_step counts optimiser steps, so with gradient accumulation several batches share one
        # value; _last_step makes sure each multiple is probed once.
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self._run(trainer, pl_module, include_frozen=False)
