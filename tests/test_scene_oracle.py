"""tools/scene_oracle.py: every wording of a scene gets the same features, every minimal edit of it different ones,
and the cache it writes is read back by PrecomputedEncoder."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from emf_lightning.data.shards import write_shards
from emf_lightning.encoders import PrecomputedEncoder
from emf_lightning.shapes import CATEGORIES, SceneError, paraphrases, perturb
from emf_lightning.shapes.scene import sample_scene
from emf_lightning.shapes.world import ShapesWorld, shapes_samples

from helpers import load_tool

oracle = load_tool("scene_oracle")


def test_every_wording_of_a_scene_gets_the_same_tokens_and_every_edit_different_ones():
    rng = np.random.default_rng(0)
    checked = {kind: 0 for kind in ("color", "shape", "swap_binding", "relation", "count")}
    for i in range(60):
        spec = sample_scene(rng, CATEGORIES[i % len(CATEGORIES)])
        table = {caption: spec for caption in paraphrases(spec, 6, rng)}
        features = oracle.SceneOracleEncoder(table).encode(list(table))
        assert torch.equal(features.tokens, features.tokens[:1].expand_as(features.tokens))
        for kind in checked:
            try:
                edited = perturb(spec, kind, rng)
            except SceneError:  # the edit does not apply to this scene (e.g. a relation without one)
                continue
            assert oracle.statement(edited) != oracle.statement(spec)
            a, b = oracle.oracle_tokens(spec), oracle.oracle_tokens(edited)
            assert a.shape != b.shape or not torch.equal(a, b), kind
            checked[kind] += 1
    assert min(checked.values()) > 0, checked


def test_a_relation_stated_from_the_other_object_is_the_same_statement():
    objects = [
        {"shape": "circle", "color": "red", "size": "small", "x": 0.25, "y": 0.5},
        {"shape": "square", "color": "blue", "size": "large", "x": 0.7, "y": 0.5},
    ]
    left = {"objects": objects, "relations": [{"a": 0, "rel": "left of", "b": 1}], "category": "position"}
    right = {"objects": objects[::-1], "relations": [{"a": 0, "rel": "right of", "b": 1}], "category": "position"}
    mirrored = {"objects": objects, "relations": [{"a": 0, "rel": "right of", "b": 1}], "category": "position"}
    assert torch.equal(oracle.oracle_tokens(left), oracle.oracle_tokens(right))
    assert not torch.equal(oracle.oracle_tokens(left), oracle.oracle_tokens(mirrored))
    # hand-built: the red circle, the blue square, then the relation token naming slots 0 and 1 and "left of"
    tokens = oracle.oracle_tokens(left)
    assert tokens.shape == (3, oracle.DIM)
    relation = tokens[2]
    assert relation[oracle.OFFSET["slot"] : oracle.OFFSET["slot"] + 2].tolist() == [1.0, 1.0]
    assert relation[oracle.OFFSET["relation"]] == 1.0 and relation.sum() == 4.0


def test_the_cache_written_from_shards_is_read_back_by_precomputed_encoder(tmp_path, capsys):
    world = ShapesWorld(seed=3, split="val", mix={"position": 1, "counting": 1}, size=12, n_captions=3)
    write_shards(shapes_samples(world), str(tmp_path / "val-%06d.tar"), maxcount=5)
    assert oracle.main(["--shards", str(tmp_path / "val-*.tar"), "--out", str(tmp_path / "cache")]) == 0
    folder = capsys.readouterr().out.strip().rsplit("-> ", 1)[1]
    reader = PrecomputedEncoder(folder)
    captions = [c for i in range(len(world)) for c in world[i].captions]
    table = {c: world[i].spec for i in range(len(world)) for c in world[i].captions}
    assert len(reader) == len(table)
    expected = oracle.SceneOracleEncoder(table).encode(captions)
    got = reader.encode(captions)
    torch.testing.assert_close(got.tokens, expected.tokens)
    torch.testing.assert_close(got.pooled, expected.pooled)
    with pytest.raises(KeyError, match="not in the precomputed feature cache"):
        reader.encode(["a purple hexagon"])
    with pytest.raises(SystemExit, match="matches no files"):
        oracle.main(["--shards", str(tmp_path / "none-*.tar"), "--out", str(tmp_path)])
