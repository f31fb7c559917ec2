"""Is colour binding in the text features, and can one cross-attention read get it out?

The probe's minimal pairs ask whether an encoder keeps "a red circle and a blue square" apart from its colour swap
by cosine. A generator does not read features by cosine: its cross-attention asks the tokens with a query. This
tool asks the question the generator faces. For each colour-attribution caption of the shapes world and each of
its two objects, a reader gets the object's shape and must name its colour; it is scored among the two colours the
caption names (so a reader that knows which colours are mentioned, but not which goes where, scores at the level
the colour-shape priors of the training scenes allow, not at 0). Two readers, trained on the captions of 80% of
the scenes (all paraphrases of a scene on one side) and scored on the rest:

    attend   one learned query per shape attends over the caption's tokens (standardised per channel), then a
             linear map names the colour: one head of a cross-attention, what the generator's blocks have
    pooled   a linear classifier per shape on the mean-pooled features: what a pooled condition offers

`bow` (no word order, so no binding) gives the floor and `oracle` (tools/scene_oracle.py, the scene's statement)
the ceiling. `--through CKPT` also reads the tokens as a trained generator's backbone receives them: its encoder's
features through its (EMA) text connector, so a connector that drops the binding shows.

    python tools/binding_probe.py --shards 'runs/compose/shapes/train-*.tar' --encoders oracle bow minilm llm \\
        --cache runs/compose/feature_cache --out runs/compose/diag/binding_probe.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from emf_lightning.encoders import build_encoder
from emf_lightning.encoders.base import TextFeatures
from emf_lightning.encoders.cache import FeatureCache
from emf_lightning.probe.evaluation import encode_captions
from emf_lightning.shapes import ALL_SHAPES, COLORS
from emf_lightning.utils.model_helpers import standardize_tokens

_spec = importlib.util.spec_from_file_location("scene_oracle", Path(__file__).with_name("scene_oracle.py"))
scene_oracle = importlib.util.module_from_spec(_spec)
sys.modules.setdefault(_spec.name, scene_oracle)
_spec.loader.exec_module(scene_oracle)

COLOR_NAMES = list(COLORS)
Read = tuple[str, int, int, int]  # caption, shape index, its colour index, the other object's colour index


def binding_reads(table: Mapping[str, Mapping[str, Any]]) -> list[Read]:
    """One read per object of every colour-attribution caption whose two objects differ in shape and colour."""
    reads = []
    for caption, spec in table.items():
        objects = spec["objects"]
        if spec.get("category") != "color_attr" or len(objects) != 2:
            continue
        a, b = objects
        if a["shape"] == b["shape"] or a["color"] == b["color"]:
            continue
        for obj, other in ((a, b), (b, a)):
            reads.append(
                (
                    caption,
                    ALL_SHAPES.index(obj["shape"]),
                    COLOR_NAMES.index(obj["color"]),
                    COLOR_NAMES.index(other["color"]),
                )
            )
    return reads


def split_by_scene(
    table: Mapping[str, Mapping[str, Any]], test_share: float = 0.2
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(fit, test) tables: the last ``test_share`` of the scenes in reading order, all paraphrases on one side.

    Paraphrases of one scene share one spec object (``scene_oracle.caption_table``)."""
    order = {sid: k for k, sid in enumerate(dict.fromkeys(id(spec) for spec in table.values()))}
    cut = round((1.0 - test_share) * len(order))
    fit = {c: s for c, s in table.items() if order[id(s)] < cut}
    test = {c: s for c, s in table.items() if order[id(s)] >= cut}
    return fit, test


def standardised_tokens(encode: Callable[[list[str]], TextFeatures], captions: Sequence[str], batch: int = 512):
    """(tokens [N, L, D] z-scored per channel over real tokens, padding zero; mask [N, L]) for unique ``captions``,
    in their order."""
    encoded = encode_captions(encode, captions, batch_size=batch)
    real = encoded.tokens[encoded.mask]
    return standardize_tokens(encoded.tokens, real.mean(0), real.std(0).clamp_min(1e-4)), encoded.mask


class AttentionReader(nn.Module):
    """One head of cross-attention: a learned query per shape reads the tokens; a linear map names the colour."""

    def __init__(self, dim: int, width: int = 64):
        super().__init__()
        self.query = nn.Embedding(len(ALL_SHAPES), width)
        self.key = nn.Linear(dim, width)
        self.value = nn.Linear(dim, width)
        self.out = nn.Linear(width, len(COLOR_NAMES))

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
        scores = torch.einsum("bld,bd->bl", self.key(tokens), self.query(shape)) / self.query.embedding_dim**0.5
        weights = scores.masked_fill(~mask, float("-inf")).softmax(-1)
        return self.out(torch.einsum("bl,bld->bd", weights, self.value(tokens)))


class PooledReader(nn.Module):
    """A linear colour classifier per shape on the mean of the caption's tokens."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, len(ALL_SHAPES) * len(COLOR_NAMES))

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
        pooled = tokens.sum(1) / mask.sum(1, keepdim=True)
        logits = self.linear(pooled).view(-1, len(ALL_SHAPES), len(COLOR_NAMES))
        return logits[torch.arange(len(shape)), shape]


READERS = {"attend": AttentionReader, "pooled": PooledReader}


def binding_accuracy(
    reader: str,
    tokens: torch.Tensor,
    mask: torch.Tensor,
    row_of: Mapping[str, int],
    fit: Sequence[Read],
    test: Sequence[Read],
    epochs: int = 30,
    seed: int = 0,
) -> float:
    """Train ``reader`` on ``fit`` reads (Adam, cross-entropy over all colours); the share of ``test`` reads where it
    ranks the object's colour above the other object's."""
    torch.manual_seed(seed)
    net = READERS[reader](tokens.shape[-1])
    opt = torch.optim.Adam(net.parameters(), lr=3e-3, weight_decay=1e-4)

    def columns(reads):
        return (torch.tensor([row_of[r[0]] for r in reads]), *(torch.tensor([r[k] for r in reads]) for k in (1, 2, 3)))

    rows, shape, colour, _ = columns(fit)
    for _ in range(epochs):
        for idx in torch.randperm(len(rows)).split(256):
            loss = F.cross_entropy(net(tokens[rows[idx]], mask[rows[idx]], shape[idx]), colour[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    rows, shape, colour, other = columns(test)
    with torch.no_grad():
        logits = net(tokens[rows], mask[rows], shape)
    right = logits.gather(1, colour[:, None]) > logits.gather(1, other[:, None])
    return right.float().mean().item()


def probe_encoder(
    encode: Callable[[list[str]], TextFeatures], fit: Sequence[Read], test: Sequence[Read], epochs: int = 30
) -> dict[str, float]:
    """Both readers' binding accuracy for one encoder."""
    captions = list(dict.fromkeys(r[0] for r in [*fit, *test]))
    tokens, mask = standardised_tokens(encode, captions)
    row_of = {c: i for i, c in enumerate(captions)}
    return {name: binding_accuracy(name, tokens, mask, row_of, fit, test, epochs) for name in READERS}


def encoder_for(name: str, table: Mapping[str, Any], cache: str | None) -> Callable[[list[str]], TextFeatures]:
    """``oracle`` (the scene's statement) or a registry encoder (through the feature cache under ``cache``)."""
    if name == "oracle":
        return scene_oracle.SceneOracleEncoder(table).encode
    options = {"max_length": 64} if name in ("minilm", "llm", "qwen3", "t5", "clip") else {}
    encoder = build_encoder(name, **options)
    return FeatureCache(encoder, root=cache).encode if cache else encoder.encode


def through_connector(checkpoint: str, cache: str | None) -> Callable[[list[str]], TextFeatures]:
    """Captions -> what the checkpoint's EMA generator's backbone reads: the encoder features through its
    connector, slot tokens included (``TextConnector.context``; padding zero)."""
    from emf_lightning.training import EMFModule

    overrides = {"feature_cache_dir": cache} if cache else {}
    module = EMFModule.load_from_checkpoint(checkpoint, map_location="cpu", **overrides)
    connector = module.ema_generator.connector.eval()

    def encode(captions: list[str]) -> TextFeatures:
        feats = module.encode_text(captions)
        with torch.no_grad():
            tokens, mask = connector.context(feats.tokens.float(), feats.mask)
            tokens = tokens * mask[..., None]
        return TextFeatures(tokens, mask, tokens.sum(1) / mask.sum(1, keepdim=True))

    return encode


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", required=True, help="shapes-world shards with colour-attribution scenes")
    p.add_argument("--encoders", nargs="+", default=["oracle", "bow", "minilm", "llm"])
    p.add_argument("--cache", default=None, help="feature-cache root of the registry encoders (optional)")
    p.add_argument("--max-reads", type=int, default=8000, help="fitting reads at most (test: a quarter of it)")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument(
        "--through", nargs="*", default=[], metavar="CKPT", help="also read through these generators' connectors"
    )
    p.add_argument("--out", default=None, help="write the scores here as JSON")
    a = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    table, _ = scene_oracle.caption_table(a.shards)
    fit_table, test_table = split_by_scene(table)
    fit, test = binding_reads(fit_table)[: a.max_reads], binding_reads(test_table)[: a.max_reads // 4 + 1]
    if not fit or not test:
        raise SystemExit(f"binding_probe: no colour-attribution captions with two shapes in {a.shards}")
    print(f"{len(fit)} fitting reads, {len(test)} test reads (scenes split 80/20)")
    scores = {}
    sources = [(name, lambda name=name: encoder_for(name, table, a.cache)) for name in a.encoders]
    sources += [(f"through {ckpt}", lambda ckpt=ckpt: through_connector(ckpt, a.cache)) for ckpt in a.through]
    for name, make_encode in sources:
        scores[name] = probe_encoder(make_encode(), fit, test, a.epochs)
        print(f"{name:10s} attend {scores[name]['attend']:.3f}  pooled {scores[name]['pooled']:.3f}", flush=True)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps({"fit_reads": len(fit), "test_reads": len(test), "scores": scores}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
