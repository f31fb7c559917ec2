"""The shapes world: determinism, splits, geometry of scenes, rendering, captions and minimal pairs."""

from __future__ import annotations

import json
import math
import pickle
import re

import numpy as np
import pytest

from emf_lightning.shapes import (
    ALL_SHAPES,
    CATEGORIES,
    COLORS,
    HELDOUT_PAIRS,
    SHAPES,
    SceneError,
    ShapesWorld,
    describe,
    paraphrases,
    perturb,
    reduced_captions,
    render,
)
from emf_lightning.shapes.captions import with_article
from emf_lightning.shapes.render import coverage
from emf_lightning.shapes.scene import COUNT_RANGE, INVERSE_RELATION, SHAPE_EXTENT, SIZE_FRACTION


def obj(shape: str, color: str, size: str, x: float, y: float) -> dict:
    return {"shape": shape, "color": color, "size": size, "x": x, "y": y}


POSITION_SPEC = {
    "objects": [obj("circle", "red", "large", 0.27, 0.5), obj("square", "blue", "small", 0.75, 0.55)],
    "relations": [{"a": 0, "rel": "left of", "b": 1}],
    "category": "position",
    "split": "train",
}


@pytest.fixture(scope="module")
def specs() -> list[dict]:
    world = ShapesWorld(seed=7, size=400)
    return [world.spec(i) for i in range(len(world))]


# ------------------------------------------------------------------ determinism and API


def test_sample_is_a_pure_function_of_seed_split_and_index():
    a, b = ShapesWorld(seed=3, size=50), ShapesWorld(seed=3, size=50)
    order_a = [a[i] for i in (5, 17, 2)]
    order_b = [b[i] for i in (2, 17, 5)][::-1]  # other access order, fresh object
    for x, y in zip(order_a, order_b):
        assert np.array_equal(x.image, y.image)
        assert (x.caption, x.captions, x.spec, x.key) == (y.caption, y.captions, y.spec, y.key)
    assert a[5].spec != ShapesWorld(seed=4, size=50)[5].spec
    assert a[5].spec != ShapesWorld(seed=3, size=50, split="val")[5].spec


def test_sample_fields_and_indexing():
    world = ShapesWorld(seed=1, resolution=32, size=10)
    s = world[-1]
    assert s.key == "train-1-00000009"
    assert s.image.dtype == np.uint8 and s.image.shape == (32, 32, 3)
    assert s.caption == s.captions[0] and len(set(s.captions)) == len(s.captions) <= 4
    assert len(world) == 10
    with pytest.raises(IndexError, match="index 10 out of range"):
        world[10]
    canonical = ShapesWorld(seed=1, size=10, caption_mode="canonical")[3]
    assert canonical.caption == describe(canonical.spec)


def test_world_pickles_for_dataloader_workers():
    world = ShapesWorld(seed=5, size=8, mix={"position": 1})
    clone = pickle.loads(pickle.dumps(world))
    assert clone[3].spec == world[3].spec and np.array_equal(clone[3].image, world[3].image)


def test_spec_json_round_trip_renders_the_same_image():
    sample = ShapesWorld(seed=2, size=20)[11]
    again = json.loads(json.dumps(sample.spec))
    assert again == sample.spec
    assert np.array_equal(render(again, 32), sample.image)


def test_invalid_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        ShapesWorld(split="dev")
    with pytest.raises(SceneError, match=r"unknown categories in mix: \['faces'\]"):
        ShapesWorld(mix={"faces": 1.0})
    with pytest.raises(SceneError, match="not all zero"):
        ShapesWorld(mix={"colors": 0.0})
    with pytest.raises(ValueError, match="held-out pair \\('red', 'diamond'\\)"):
        ShapesWorld(heldout=[("red", "diamond")])  # diamonds are not in the default world


# ------------------------------------------------------------------ scene structure


def test_categories_have_their_structure(specs):
    seen = {s["category"] for s in specs}
    assert seen == set(CATEGORIES)
    for s in specs:
        objects, category = s["objects"], s["category"]
        ids = [(o["color"], o["shape"]) for o in objects]
        if category in ("single_object", "colors"):
            assert len(objects) == 1
        elif category == "counting":
            assert COUNT_RANGE[0] <= len(objects) <= COUNT_RANGE[1]
            assert len({(o["color"], o["shape"], o["size"]) for o in objects}) == 1
        else:
            assert len(objects) == 2 and ids[0] != ids[1]
            if category in ("two_objects", "color_attr"):
                assert objects[0]["shape"] != objects[1]["shape"]
            if category == "color_attr":
                assert objects[0]["color"] != objects[1]["color"]
        assert bool(s["relations"]) == (category == "position")
        assert all(o["shape"] in SHAPES for o in objects)


def test_objects_never_touch_and_stay_inside(specs):
    # independent of the box bookkeeping: rasterise each object alone and look for shared pixels
    res = 64
    for s in specs[:150]:
        owner = np.zeros((res, res), dtype=int)
        for o in s["objects"]:
            cov, y0, x0 = coverage(o, res)
            h, w = cov.shape
            assert y0 > 0 and x0 > 0 and y0 + h < res and x0 + w < res  # a background border remains
            hit = np.zeros((res, res), dtype=bool)
            hit[y0 : y0 + h, x0 : x0 + w] = cov > 0
            assert not np.any(owner[hit]), f"objects overlap in {s}"
            owner[hit] = 1


def test_stated_relations_hold_geometrically(specs):
    for s in (s for s in specs if s["category"] == "position"):
        rel = s["relations"][0]
        a, b = s["objects"][rel["a"]], s["objects"][rel["b"]]
        dx, dy = a["x"] - b["x"], a["y"] - b["y"]
        along = {"left of": -dx, "right of": dx, "above": -dy, "below": dy}[rel["rel"]]
        across = dy if rel["rel"] in ("left of", "right of") else dx
        assert along > 0 and abs(across) < along  # within 45 degrees of the axis


def test_heldout_pairs_never_in_train_and_always_in_heldout():
    held = set(HELDOUT_PAIRS)
    for split in ("train", "val", "test"):
        world = ShapesWorld(seed=0, split=split, size=300)
        for i in range(len(world)):
            assert not any((o["color"], o["shape"]) in held for o in world.spec(i)["objects"])
    world = ShapesWorld(seed=0, split="heldout", size=300)
    found = set()
    for i in range(len(world)):
        spec = world.spec(i)
        assert spec["split"] == "heldout"
        pairs = {(o["color"], o["shape"]) for o in spec["objects"]} & held
        assert pairs
        found |= pairs
    assert found == held


def test_mix_controls_category_frequencies():
    world = ShapesWorld(seed=0, mix={"colors": 3, "two_objects": 1}, size=2000)
    cats = [world.spec(i)["category"] for i in range(len(world))]
    assert set(cats) == {"colors", "two_objects"}
    share = cats.count("colors") / len(cats)
    assert abs(share - 0.75) < 4 * math.sqrt(0.75 * 0.25 / len(cats))  # 4 standard errors


# ------------------------------------------------------------------ rendering


@pytest.mark.parametrize("resolution", [32, 64, 128, 256])
def test_render_areas_colours_and_centres_match_geometry(resolution):
    for shape, area_in_box in (("circle", math.pi / 4), ("square", 1.0), ("triangle", 0.5)):
        c = 0.5 + 0.37 / resolution  # off the pixel grid so that every edge is partly covered
        spec = {"objects": [obj(shape, "orange", "large", c, c)], "relations": [], "category": "colors"}
        img = render(spec, resolution).astype(np.float64)
        side = SIZE_FRACTION["large"] * SHAPE_EXTENT[shape] * resolution
        alpha = img[..., 0] / 255.0  # orange = (255, 106, 0): red channel is the coverage
        # squares are exact (up to uint8 rounding); 4x4 point sampling errs by at most half a sample
        # spacing along the outline
        perimeter = {"circle": math.pi * side, "square": 0.0, "triangle": (1 + math.sqrt(5)) * side}[shape]
        tolerance = perimeter / 8 + alpha.size / 510
        assert alpha.sum() == pytest.approx(area_in_box * side**2, abs=tolerance)
        ys, xs = np.mgrid[0:resolution, 0:resolution] + 0.5
        centroid_y = (alpha * ys).sum() / alpha.sum()
        expected_y = c * resolution + (side / 6 if shape == "triangle" else 0.0)  # triangle apex is up
        assert (alpha * xs).sum() / alpha.sum() == pytest.approx(c * resolution, abs=0.05)
        assert centroid_y == pytest.approx(expected_y, abs=0.05)
        interior = alpha > 0.999
        assert interior.sum() > 0 and np.all(img[interior] == COLORS["orange"])
        edge = (alpha > 0.05) & (alpha < 0.95)
        assert edge.sum() > 0  # antialiased edges
        assert np.allclose(img[..., 1][edge] / 106, alpha[edge], atol=0.01)  # edges keep the hue


def test_render_rejects_bad_specs():
    bad = {"objects": [obj("star", "red", "small", 0.5, 0.5)], "relations": [], "category": "colors"}
    with pytest.raises(SceneError, match="unknown shape 'star'"):
        render(bad, 32)
    bad = {"objects": [obj("circle", "mauve", "small", 0.5, 0.5)], "relations": [], "category": "colors"}
    with pytest.raises(SceneError, match="unknown color 'mauve'"):
        render(bad, 32)
    with pytest.raises(ValueError, match="resolution must be at least 8"):
        render(POSITION_SPEC, 4)


# ------------------------------------------------------------------ captions


def test_canonical_and_reduced_captions_are_exact():
    assert describe(POSITION_SPEC) == "a large red circle to the left of a small blue square"
    assert reduced_captions(POSITION_SPEC) == [
        "a red circle to the left of a blue square",
        "a large red circle and a small blue square",
        "a large red circle",
        "a small blue square",
        "a large circle to the left of a small square",
    ]
    counting = {
        "objects": [obj("triangle", "orange", "small", x, 0.5) for x in (0.2, 0.5, 0.8)],
        "relations": [],
        "category": "counting",
    }
    assert describe(counting) == "three small orange triangles"
    assert reduced_captions(counting) == ["three orange triangles", "small orange triangles", "three small triangles"]
    assert with_article("orange disk") == "an orange disk" and with_article("red disk") == "a red disk"


def _relation_statement(caption: str, spec: dict) -> tuple[str, str, str]:
    """Independent reading of a relation caption: (first colour, relation, second colour) as stated."""
    colours = [c for c in COLORS if re.search(rf"\b{c}\b", caption)]
    order = sorted(colours, key=caption.index)
    rel_word = next(
        r
        for r, pat in (
            ("left of", "left of"),
            ("right of", "right of"),
            ("above", "above|over"),
            ("below", "below|under|beneath"),
        )
        if re.search(rf"\b({pat})\b", caption)
    )
    first, second = order
    if caption.endswith(" it"):  # "B with A <rel> it" states A rel B
        first, second = second, first
    return first, rel_word, second


def test_every_paraphrase_states_the_same_bound_facts():
    rng = np.random.default_rng(0)
    caps = paraphrases(POSITION_SPEC, 40, rng)
    assert len(caps) == len(set(caps)) == 40
    for caption in caps:
        first, rel, second = _relation_statement(caption, POSITION_SPEC)
        # read as "first rel second"; must equal "red left of blue" or its inverse
        assert (first, rel, second) in {("red", "left of", "blue"), ("blue", INVERSE_RELATION["left of"], "red")}
        # colour words bind to the right shapes: red to the circle synonyms, blue to the square synonyms
        assert re.search(r"\b(red (circle|disk|round dot)|(circle|disk|round dot) in red)\b", caption)
        assert re.search(r"\b(blue (square|box)|(square|box) in blue)\b", caption)
        assert re.search(r"\b(large|big)\b", caption) and re.search(r"\b(small|little)\b", caption)


def test_paraphrases_are_deterministic_and_exhaust_a_small_space():
    single = {"objects": [obj("triangle", "green", "small", 0.5, 0.5)], "relations": [], "category": "colors"}
    a = paraphrases(single, 5, np.random.default_rng(1))
    assert a == paraphrases(single, 5, np.random.default_rng(1))
    everything = paraphrases(single, 1000, np.random.default_rng(1))
    # 5 templates x (2 noun-phrase forms x 2 size words x 1 triangle word)
    assert len(everything) == len(set(everything)) == 20
    assert "a small green triangle" in everything and "there is a little triangle in green" in everything
    drawn = {describe(single, np.random.default_rng(seed)) for seed in range(30)}  # describe(rng): one paraphrase
    assert drawn <= set(everything) and len(drawn) > 5
    assert describe(single, np.random.default_rng(3)) == describe(single, np.random.default_rng(3))


def test_swapped_binding_gives_a_different_caption():
    swapped = perturb(POSITION_SPEC, "swap_binding", np.random.default_rng(0))
    assert describe(swapped) == "a large blue circle to the left of a small red square"
    assert describe(swapped) != describe(POSITION_SPEC)


# ------------------------------------------------------------------ minimal pairs


def _diff(a: dict, b: dict) -> list[tuple[int, str]]:
    return [(i, k) for i, (x, y) in enumerate(zip(a["objects"], b["objects"])) for k in x if x[k] != y[k]]


def test_color_and_shape_perturbations_change_exactly_one_attribute(specs):
    rng = np.random.default_rng(0)
    held = set(HELDOUT_PAIRS)
    refused = 0
    for s in specs[:120]:
        for kind, field in (("color", "color"), ("shape", "shape")):
            try:
                p = perturb(s, kind, rng)
            except SceneError as err:
                # e.g. white square + white circle: a triangle would be white (held out), the rest duplicates
                assert str(err).startswith(f"no '{kind}' change keeps this a valid 'train' {s['category']} scene")
                refused += 1
                continue
            diffs = _diff(s, p)
            fields = {k for _, k in diffs}
            assert fields == {field}
            if s["category"] == "counting":
                assert len(diffs) == len(s["objects"])  # the whole identical group changes
            else:
                assert len(diffs) == 1
            assert not any((o["color"], o["shape"]) in held for o in p["objects"])  # train stays train
            assert p["category"] == s["category"] and p["relations"] == s["relations"]
    assert refused < 0.1 * 240


def test_structural_perturbations(specs):
    rng = np.random.default_rng(0)
    for s in specs:
        if s["category"] == "position":
            p = perturb(s, "relation", rng)
            assert p["relations"][0]["rel"] == INVERSE_RELATION[s["relations"][0]["rel"]]
            assert describe(p) != describe(s)
            a, b = (p["objects"][p["relations"][0][k]] for k in ("a", "b"))
            dx, dy = a["x"] - b["x"], a["y"] - b["y"]
            along = {"left of": -dx, "right of": dx, "above": -dy, "below": dy}[p["relations"][0]["rel"]]
            assert along > 0
        if s["category"] == "color_attr":
            try:
                p = perturb(s, "swap_binding", rng)
            except SceneError as err:
                # blue circle + cyan square would become a blue square, a held-out pair
                held = set(HELDOUT_PAIRS)
                a, b = s["objects"]
                assert {(b["color"], a["shape"]), (a["color"], b["shape"])} & held
                assert str(err).startswith("no 'swap_binding' change keeps this a valid 'train' color_attr")
                continue
            assert [o["color"] for o in p["objects"]] == [o["color"] for o in s["objects"]][::-1]
            assert [o["shape"] for o in p["objects"]] == [o["shape"] for o in s["objects"]]
        if s["category"] == "counting":
            try:
                p = perturb(s, "count", rng)
            except SceneError as err:  # two large objects leave no room for a third
                assert str(err) == "cannot add an object to this counting scene"
                continue
            assert abs(len(p["objects"]) - len(s["objects"])) == 1
            assert len({(o["color"], o["shape"], o["size"]) for o in p["objects"]}) == 1


def test_perturbations_that_do_not_apply_raise():
    single = {"objects": [obj("circle", "red", "small", 0.5, 0.5)], "relations": [], "category": "colors"}
    rng = np.random.default_rng(0)
    with pytest.raises(SceneError, match="swap_binding needs a scene with two objects"):
        perturb(single, "swap_binding", rng)
    with pytest.raises(SceneError, match="relation perturbation needs a scene with a stated relation"):
        perturb(single, "relation", rng)
    with pytest.raises(SceneError, match="count perturbation needs a 'counting' scene"):
        perturb(single, "count", rng)
    with pytest.raises(SceneError, match="unknown perturbation 'size'"):
        perturb(single, "size", rng)


def test_diamond_world_is_opt_in():
    world = ShapesWorld(seed=0, size=200, shapes=ALL_SHAPES)
    shapes = {o["shape"] for i in range(len(world)) for o in world.spec(i)["objects"]}
    assert shapes == set(ALL_SHAPES)
