"""Prompts as users write them: the rewording families and the Evaluator's reworded category."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from emf_lightning.evaluation import Evaluator, HeldOutSet
from emf_lightning.shapes import COLORS, SHAPES, ShapesWorld
from emf_lightning.shapes.captions import _phrase_space, _unravel
from emf_lightning.shapes.wordings import DEV_FAMILIES, FAMILIES, FINAL_FAMILIES, families, reword, reword_all
from emf_lightning.utils.images import from_uint8, to_uint8

from helpers import LookupGenerator

SCENES = [
    {
        "objects": [{"shape": s, "color": c, "size": z, "x": 0.5, "y": 0.5}],
        "relations": [],
        "category": "colors",
        "split": "val",
    }
    for s, c, z in itertools.product(SHAPES, COLORS, ("small", "large"))
]


def _grammar(spec) -> set[str]:
    """Every caption the training grammar can write for the scene."""
    radices, decode = _phrase_space(spec)
    return {decode(_unravel(i, radices)) for i in range(int(np.prod(radices)))}


def test_dev_and_final_families_are_disjoint_and_cover_every_family():
    assert set(DEV_FAMILIES).isdisjoint(FINAL_FAMILIES)
    assert set(DEV_FAMILIES) | set(FINAL_FAMILIES) == {f.name for f in FAMILIES}
    assert len(FINAL_FAMILIES) >= 5 and families("all") == DEV_FAMILIES + FINAL_FAMILIES
    with pytest.raises(ValueError, match="split must be"):
        families("test")


@pytest.mark.parametrize("family", [f.name for f in FAMILIES])
def test_every_rewording_keeps_the_colour_is_unseen_and_is_deterministic(family):
    rng = np.random.default_rng(0)
    for spec in SCENES:
        caption = reword(spec, family, rng)
        obj = spec["objects"][0]
        assert obj["color"] in caption.lower()  # the judge checks the colour: it must be named
        assert caption not in _grammar(spec), caption  # never a caption the grammar writes
        other = [c for c in COLORS if c != obj["color"]]
        assert not any(f" {c} " in f" {caption.lower()} " for c in other)
    rng_a, rng_b = np.random.default_rng(5), np.random.default_rng(5)
    assert [reword(s, family, rng_a) for s in SCENES] == [reword(s, family, rng_b) for s in SCENES]


def test_only_single_object_scenes_are_reworded():
    two = {
        "objects": [SCENES[0]["objects"][0], dict(SCENES[1]["objects"][0], x=0.2)],
        "relations": [],
        "category": "two_objects",
        "split": "val",
    }
    assert reword(two, "bare", np.random.default_rng(0)) is None
    with pytest.raises(ValueError, match="unknown wording family 'shout'"):
        reword(SCENES[0], "shout", np.random.default_rng(0))


def _held(n: int = 14) -> tuple[HeldOutSet, list[dict]]:
    world = ShapesWorld(seed=0, resolution=32, split="heldout", size=n, mix={"colors": 1})
    samples = [world[i] for i in range(n)]
    items = [{"image": from_uint8(s.image), "caption": s.caption, "spec": s.spec, "key": s.key} for s in samples]
    held = HeldOutSet(
        to_uint8(torch.stack([x["image"] for x in items])),
        [x["caption"] for x in items],
        [x["spec"] for x in items],
        [x["key"] for x in items],
    )
    return held, items


@pytest.mark.parametrize("split", ["final", "dev"])
def test_the_reworded_category_judges_unseen_wordings(split):
    held, items = _held()
    reworded = reword_all(held.specs, split, seed=0)
    # A model that understands any wording (it draws the scene of a reworded prompt too) scores 1 ...
    understands = LookupGenerator(items + [dict(x, caption=c) for x, c in zip(items, reworded)])
    result = Evaluator(steps=(1,), batch_size=8, fid=False, clip_score=False, wordings=split).evaluate(
        understands, held
    )
    row = result.rows["1 step, cfg 1.0"]
    assert row["shapes_colors"] == 1.0 and row["shapes_reworded"] == 1.0
    assert {f"shapes_reworded_{f}" for f in families(split)} <= set(row)
    # ... one that follows only the training grammar (black images otherwise) scores 0 on the reworded prompts.
    black = torch.full_like(items[0]["image"], -1.0)
    grammar_only = LookupGenerator(items + [dict(x, caption=c, image=black) for x, c in zip(items, reworded)])
    row = (
        Evaluator(steps=(1,), batch_size=8, fid=False, clip_score=False, wordings=split)
        .evaluate(grammar_only, held)
        .rows["1 step, cfg 1.0"]
    )
    assert row["shapes_colors"] == 1.0 and row["shapes_reworded"] == 0.0
    with pytest.raises(ValueError, match="split must be"):
        Evaluator(wordings="unseen")


def test_shapes_world_adds_dev_rewordings_to_the_captions_and_never_final_ones():
    plain = ShapesWorld(seed=0, split="train", size=20, mix={"colors": 1}, n_captions=2)
    augmented = ShapesWorld(seed=0, split="train", size=20, mix={"colors": 1}, n_captions=2, reworded_captions=3)
    final_forms = set()
    for i in range(20):
        a, b = plain[i], augmented[i]
        assert a.spec == b.spec and a.caption == b.caption and b.captions[:2] == a.captions
        extra = b.captions[2:]
        assert 1 <= len(extra) <= 3 and all(c not in a.captions for c in extra)
        rngs = [np.random.default_rng(k) for k in range(20)]
        final_forms |= {reword(a.spec, f, r) for f in FINAL_FAMILIES for r in rngs}
    assert not final_forms & {c for i in range(20) for c in augmented[i].captions}


def test_all_wordings_report_dev_and_final_apart():
    held, items = _held(28)
    reworded = reword_all(held.specs, "all", seed=0)
    final = set(families("final"))
    names = families("all")
    # draws the scene for dev wordings only: dev 1.0, final 0.0
    black = torch.full_like(items[0]["image"], -1.0)
    model = LookupGenerator(
        items
        + [
            dict(x, caption=c, image=black if names[i % len(names)] in final else x["image"])
            for i, (x, c) in enumerate(zip(items, reworded))
        ]
    )
    row = (
        Evaluator(steps=(1,), batch_size=8, fid=False, clip_score=False, wordings="all")
        .evaluate(model, held)
        .rows["1 step, cfg 1.0"]
    )
    assert row["shapes_reworded_dev"] == 1.0 and row["shapes_reworded_final"] == 0.0
    assert 0 < row["shapes_reworded"] < 1
