"""Oracle text features for the shapes world: the scene's own statement, as tokens, for every caption of it.

What limits one-step composition, the text representation or the generator? The probe says every offline encoder
keeps "a red circle left of a blue square" closer to its mirror image than to a paraphrase (relation and binding
minimal pairs near 0). This tool removes the encoder from the question: each caption is encoded by the scene it
describes, read from the shard's ``.json``, so paraphrases get identical features and any change of colour, shape,
size, binding, relation or count gets different ones (perfectly discriminative by construction). A generator
trained on these features shows what the backbone can learn when the text is not the limit.

Tokens, one per object, then one per stated relation (float one-hot blocks). The statement is canonical: objects
are sorted ("a red circle and a blue square" states what "a blue square and a red circle" does), and a relation
is stated as "left of" or "above" with its subject first ("B right of A" is "A left of B"):
    object:   colour | shape | size | slot (its index) | 0 relation | kind = object
    relation: 0 colour | 0 shape | 0 size | slot of a + slot of b (two ones) | relation | kind = relation

    python tools/scene_oracle.py --shards 'runs/compose/shapes/*.tar' --out runs/compose/oracle_features
    # then train with the encoder `emf_lightning.encoders.PrecomputedEncoder` (init_args.cache_dir = the printed
    # folder), e.g. tools/side_by_side.py NAME --config <a config naming that encoder> ...
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Mapping
from typing import Any

import torch

from emf_lightning.data.health import SkipCounter
from emf_lightning.data.pipeline import caption_text, expand_shard_urls, iter_shards
from emf_lightning.encoders.base import TextEncoder, TextFeatures
from emf_lightning.encoders.cache import FeatureCache
from emf_lightning.errors import UserInputError
from emf_lightning.shapes import ALL_SHAPES, COLORS, RELATIONS, SIZES, scene_spec_or_none
from emf_lightning.shapes.scene import INVERSE_RELATION

MAX_OBJECTS = 4  # counting scenes hold up to 4
BLOCKS = {"color": len(COLORS), "shape": len(ALL_SHAPES), "size": len(SIZES), "slot": MAX_OBJECTS}
BLOCKS |= {"relation": len(RELATIONS), "kind": 2}
DIM = sum(BLOCKS.values())
OFFSET = {name: sum(list(BLOCKS.values())[:i]) for i, name in enumerate(BLOCKS)}


def canonical(spec: Mapping[str, Any]) -> tuple[list[dict[str, str]], list[dict[str, Any]]]:
    """(objects, relations) as the scene states them, positions left out, in one canonical form."""
    objects = [{k: o[k] for k in ("color", "shape", "size")} for o in spec["objects"]]
    relations = [dict(r) for r in spec.get("relations", [])]
    if not relations:
        return sorted(objects, key=lambda o: (o["color"], o["shape"], o["size"])), []
    if len(relations) != 1 or len(objects) != 2:
        raise ValueError(f"the oracle states one relation between two objects, got {spec}")
    rel = relations[0]
    if rel["rel"] in ("right of", "below"):  # B right of A = A left of B
        rel = {"a": rel["b"], "rel": INVERSE_RELATION[rel["rel"]], "b": rel["a"]}
    return [objects[rel["a"]], objects[rel["b"]]], [{"a": 0, "rel": rel["rel"], "b": 1}]


def statement(spec: Mapping[str, Any]) -> str:
    """What a caption states about its scene (everything but the positions), as a comparable string."""
    objects, relations = canonical(spec)
    return json.dumps({"objects": objects, "relations": relations}, sort_keys=True)


def oracle_tokens(spec: Mapping[str, Any]) -> torch.Tensor:
    """[objects + relations, DIM] one-hot tokens of a scene spec (positions are not part of the statement)."""
    objects, relations = canonical(spec)
    rows = []
    for i, obj in enumerate(objects):
        row = torch.zeros(DIM)
        row[OFFSET["color"] + list(COLORS).index(obj["color"])] = 1
        row[OFFSET["shape"] + ALL_SHAPES.index(obj["shape"])] = 1
        row[OFFSET["size"] + SIZES.index(obj["size"])] = 1
        row[OFFSET["slot"] + i] = 1
        row[OFFSET["kind"]] = 1
        rows.append(row)
    for rel in relations:
        row = torch.zeros(DIM)
        row[OFFSET["slot"] + rel["a"]] = 1
        row[OFFSET["slot"] + rel["b"]] = 1
        row[OFFSET["relation"] + RELATIONS.index(rel["rel"])] = 1
        row[OFFSET["kind"] + 1] = 1
        rows.append(row)
    return torch.stack(rows)


class SceneOracleEncoder(TextEncoder):
    """Captions -> the oracle tokens of the scene each describes (``table``: caption -> spec)."""

    name = "scene_oracle"

    def __init__(self, table: Mapping[str, Mapping[str, Any]], batch_size: int = 4096):
        super().__init__(batch_size=batch_size)
        self.table = dict(table)
        self._finish_init()

    @property
    def dim(self) -> int:
        return DIM

    def _key_parts(self) -> list[str]:
        return ["v1"]

    def _encode_batch(self, captions: list[str]) -> tuple[TextFeatures, int]:
        missing = [c for c in captions if c not in self.table]
        if missing:
            raise KeyError(f"{len(missing)} captions have no scene in the shards read, e.g. {missing[0]!r}")
        rows = [oracle_tokens(self.table[c]) for c in captions]
        length = max(len(r) for r in rows)
        tokens = torch.zeros(len(rows), length, DIM)
        mask = torch.zeros(len(rows), length, dtype=torch.bool)
        for i, r in enumerate(rows):
            tokens[i, : len(r)], mask[i, : len(r)] = r, True
        pooled = tokens.sum(1) / mask.sum(1, keepdim=True)
        return TextFeatures(tokens, mask, pooled), 0


def caption_table(shards: str) -> tuple[dict[str, dict[str, Any]], int]:
    """caption -> scene spec over every sample's caption and paraphrases, read as training reads them (the data
    module's one shard reader and caption rule; damage is counted and logged, samples without a scene skipped); also
    how many captions two scenes stated differently (kept with the first; a grammar caption states its scene
    fully, so expect 0)."""
    table: dict[str, dict[str, Any]] = {}
    stated: dict[str, str] = {}
    conflicts = 0
    counter = SkipCounter("scene_oracle")
    for sample in iter_shards(shards, counter):
        meta = json.loads(sample["json"]) if "json" in sample else None
        spec = scene_spec_or_none(meta)
        if spec is None:
            counter.skip("no shapes scene in the .json", sample["__key__"])
            continue
        said = statement(spec)
        for caption in filter(None, [caption_text(sample), *meta.get("captions", [])]):
            table.setdefault(caption, spec)
            conflicts += stated.setdefault(caption, said) != said
    for reason, n in counter.drain().items():
        print(f"skipped {n}: {reason}")
    return table, conflicts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", required=True, help="glob of the shards whose captions to encode (all splits)")
    p.add_argument("--out", required=True, help="feature-cache root")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        n_shards = len(expand_shard_urls(a.shards))
    except UserInputError as err:
        raise SystemExit(f"scene_oracle: {err}") from None
    table, conflicts = caption_table(a.shards)
    cache = FeatureCache(SceneOracleEncoder(table), root=a.out)
    cache.precompute(table, batch_size=8192)
    folder = cache.save() or cache.dir
    print(f"{len(table)} captions from {n_shards} shards ({conflicts} stated differently by two scenes) -> {folder}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
