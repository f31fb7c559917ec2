"""ShapesEval: the parser on hand-drawn images, and the judge's accuracy on renders, noise and minimal pairs."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from scipy import ndimage

from emf_lightning.shapes import CATEGORIES, COLORS, SceneError, ShapesWorld, perturb, render
from emf_lightning.shapes.judge import Detection, ShapesEval
from emf_lightning.utils.images import from_uint8


def blank(res: int = 32) -> np.ndarray:
    return np.zeros((res, res, 3), dtype=np.uint8)


def spec_of(category: str, *objects: dict, relations: list | None = None) -> dict:
    return {"objects": list(objects), "relations": relations or [], "category": category, "split": "train"}


def o(shape: str, color: str, size: str = "small", x: float = 0.5, y: float = 0.5) -> dict:
    return {"shape": shape, "color": color, "size": size, "x": x, "y": y}


def supersampled_disk(res: int, cx: float, cy: float, r: float, s: int = 8) -> np.ndarray:
    """Coverage of a disk drawn independently of the renderer (pixel units, s x s samples per pixel)."""
    g = (np.arange(res * s) + 0.5) / s
    inside = (g[None, :] - cx) ** 2 + (g[:, None] - cy) ** 2 <= r * r
    return inside.reshape(res, s, res, s).mean(axis=(1, 3))


def paint(img: np.ndarray, alpha: np.ndarray, color: str) -> np.ndarray:
    out = img.astype(np.float64) + alpha[..., None] * (np.asarray(COLORS[color]) - img)
    return np.rint(out).astype(np.uint8)


@pytest.fixture(scope="module")
def judge() -> ShapesEval:
    return ShapesEval()


# ------------------------------------------------------------------ the parser on hand-built images


def test_hand_drawn_square_is_detected_exactly(judge):
    img = blank(32)
    img[8:16, 4:12] = COLORS["green"]  # an 8x8 green square, rows 8-15, columns 4-11
    (det,) = judge.parse(img)
    assert (det.shape, det.color, det.size) == ("square", "green", "small")
    assert det.x == pytest.approx(8 / 32) and det.y == pytest.approx(12 / 32)
    assert det.area == pytest.approx(64 / 1024)
    assert det.width == pytest.approx(8 / 32)
    assert det.k == pytest.approx(1.0, abs=1e-9) and det.skew == pytest.approx(0.0, abs=1e-9)


def test_hand_drawn_disk_and_triangle(judge):
    res = 64
    img = paint(blank(res), supersampled_disk(res, 20.3, 40.7, 12.0), "orange")
    # upward triangle with apex (45, 10), base y = 30 from x = 35 to 55, drawn with 8x8 samples
    s = 8
    g = (np.arange(res * s) + 0.5) / s
    X, Y = g[None, :], g[:, None]
    tri = (Y <= 30) & (np.abs(X - 45) <= (Y - 10) / 2)
    img = paint(img, tri.reshape(res, s, res, s).mean(axis=(1, 3)), "cyan")
    dets = sorted(judge.parse(img), key=lambda d: d.x)
    assert [(d.shape, d.color) for d in dets] == [("circle", "orange"), ("triangle", "cyan")]
    disk, triangle = dets
    assert disk.x * res == pytest.approx(20.3, abs=0.05) and disk.y * res == pytest.approx(40.7, abs=0.05)
    assert disk.area * res * res == pytest.approx(np.pi * 144, rel=0.01)
    assert disk.size == "large"  # 24 px across at 64 px: 0.375 of the side > 0.343 boundary
    assert triangle.x * res == pytest.approx(45, abs=0.05)
    assert triangle.y * res == pytest.approx(20, abs=0.1)  # centre of its box, not its centroid (23.3)
    assert triangle.width * res == pytest.approx(20, abs=0.2)


def test_parser_separates_colours_and_ignores_specks(judge):
    img = blank(32)
    img[4:12, 4:12] = COLORS["red"]
    img[4:12, 20:28] = COLORS["red"]  # a second red square
    img[20:28, 4:12] = COLORS["orange"]  # orange is 22.5 degrees from red and must not merge with it
    img[20:28, 12:20] = COLORS["yellow"]  # touching the orange one: different colour, separate object
    img[30, 30] = COLORS["white"]  # a one-pixel speck is below min_area
    dets = judge.parse(img)
    assert sorted((d.color, d.shape) for d in dets) == [
        ("orange", "square"),
        ("red", "square"),
        ("red", "square"),
        ("yellow", "square"),
    ]


def test_parser_reads_dimmed_antialiased_colours(judge):
    # a colour at 60% intensity on black is still that colour (its direction is unchanged)
    img = blank(32)
    img[10:20, 10:20] = (np.asarray(COLORS["magenta"]) * 0.6).astype(np.uint8)
    (det,) = judge.parse(img)
    assert det.color == "magenta"
    img[10:20, 10:20] = (np.asarray(COLORS["magenta"]) * 0.4).astype(np.uint8)  # below alpha_min
    assert judge.parse(img) == []


# ------------------------------------------------------------------ scoring rules


def test_relation_holds_reads_directions():
    judge = ShapesEval()
    a = Detection("circle", "red", "small", 0.2, 0.5, 0.28, 0.06, 0.667, 0.0)
    b = Detection("square", "blue", "small", 0.8, 0.55, 0.28, 0.06, 1.0, 0.0)
    assert judge.relation_holds(a, b, "left of") and judge.relation_holds(b, a, "right of")
    assert not judge.relation_holds(a, b, "right of") and not judge.relation_holds(a, b, "above")
    close = Detection("square", "blue", "small", 0.25, 0.5, 0.28, 0.06, 1.0, 0.0)
    assert not judge.relation_holds(a, close, "left of")  # 0.05 apart is within the slack


def test_counting_and_strictness_reasons():
    img = blank(32)
    for x0 in (2, 12, 22):
        img[12:20, x0 : x0 + 8] = COLORS["blue"]
    spec = spec_of("counting", o("square", "blue", x=0.2), o("square", "blue", x=0.6))
    strict, lenient = ShapesEval(), ShapesEval(strict=False)
    assert strict.score(strict.parse(img), spec) == (False, "3 objects detected, the scene has 2")
    assert lenient.score(lenient.parse(img), spec) == (False, "found 3 blue squares, expected 2")
    # single_object asks for the shape only (colour is the 'colors' question); GenEval allows extras
    single = spec_of("single_object", o("square", "white"))
    assert lenient.evaluate(img[None], [single]) == {"single_object": 1.0, "overall": 1.0}
    assert strict.evaluate(img[None], [single]) == {"single_object": 0.0, "overall": 0.0}
    assert lenient.evaluate(img[None], [spec_of("single_object", o("circle", "blue"))])["single_object"] == 0.0


def test_category_semantics_on_one_image(judge):
    img = blank(32)
    img[12:20, 2:10] = COLORS["red"]  # red square on the left
    img = paint(img, supersampled_disk(32, 25.0, 16.0, 4.5), "blue")  # blue disk on the right
    red_square, blue_circle = o("square", "red", x=0.19, y=0.5), o("circle", "blue", x=0.78, y=0.5)
    left_of, right_of = {"a": 0, "rel": "left of", "b": 1}, {"a": 0, "rel": "right of", "b": 1}
    cases = {
        ("two_objects", True): spec_of("two_objects", o("square", "green"), o("circle", "white")),
        ("two_objects", False): spec_of("two_objects", o("square", "red"), o("triangle", "blue")),
        ("color_attr", True): spec_of("color_attr", red_square, blue_circle),
        ("color_attr", False): spec_of("color_attr", o("square", "blue"), o("circle", "red")),
        ("position", True): spec_of("position", red_square, blue_circle, relations=[left_of]),
        ("position", False): spec_of("position", red_square, blue_circle, relations=[right_of]),
    }
    lenient = ShapesEval(strict=False)
    for (category, expected), spec in cases.items():
        assert judge.score(judge.parse(img), spec)[0] is expected, (category, spec)
    # the 8 px square and the 9 px disk are both small at 32 px; a large one is a size error
    sizes = judge.evaluate_detailed(img, [cases[("color_attr", True)]])[0]["sizes_ok"]
    assert sizes is True
    large = spec_of("color_attr", {**red_square, "size": "large"}, blue_circle)
    assert judge.evaluate_detailed(img, [large])[0]["sizes_ok"] is False
    # single_object checks the shape only, colors shape and colour (the other object is an allowed extra)
    assert lenient.score(lenient.parse(img), spec_of("single_object", o("circle", "green")))[0]
    assert not lenient.score(lenient.parse(img), spec_of("colors", o("circle", "green")))[0]
    assert lenient.score(lenient.parse(img), spec_of("colors", o("circle", "blue")))[0]


# ------------------------------------------------------------------ accuracy on the world


def world_batch(n: int, resolution: int, seed: int) -> tuple[np.ndarray, list[dict]]:
    world = ShapesWorld(seed=seed, resolution=resolution, size=n)
    specs = [world.spec(i) for i in range(n)]
    return np.stack([render(s, resolution) for s in specs]), specs


@pytest.mark.parametrize("resolution", [32, 64])
def test_ground_truth_renders_score_at_least_098_per_category(judge, resolution):
    images, specs = world_batch(360, resolution, seed=11)
    scores = judge.evaluate(images, specs)
    assert set(scores) == set(CATEGORIES) | {"overall"}
    assert min(scores.values()) >= 0.98, scores
    sizes = [r["sizes_ok"] for r in judge.evaluate_detailed(images[:120], specs[:120])]
    assert np.mean(sizes) >= 0.98


def test_ground_truth_at_256_and_heldout_split(judge):
    world = ShapesWorld(seed=2, resolution=256, split="heldout", size=24)
    specs = [world.spec(i) for i in range(len(world))]
    scores = judge.evaluate(np.stack([render(s, 256) for s in specs]), specs)
    assert scores["overall"] >= 0.98, scores


def test_mildly_blurred_and_noisy_renders_still_pass(judge):
    images, specs = world_batch(240, 32, seed=12)
    blurred = ndimage.gaussian_filter(images.astype(np.float64), sigma=(0, 0.8, 0.8, 0))
    noisy = blurred + np.random.default_rng(0).normal(0, 12, images.shape)
    degraded = np.clip(np.rint(noisy), 0, 255).astype(np.uint8)
    assert judge.evaluate(degraded, specs)["overall"] >= 0.95


def test_noise_scores_near_zero(judge):
    _, specs = world_batch(300, 32, seed=13)
    uniform = np.random.default_rng(0).integers(0, 256, (300, 32, 32, 3), dtype=np.uint8)
    gaussian = torch.randn(300, 3, 32, 32, generator=torch.Generator().manual_seed(0))  # float [-1, 1] path
    smooth = ndimage.gaussian_filter(np.random.default_rng(1).normal(size=(300, 32, 32, 3)), (0, 2, 2, 0))
    blobs = np.clip(128 + smooth / smooth.std() * 100, 0, 255).astype(np.uint8)
    for images in (uniform, gaussian, blobs):
        scores = judge.evaluate(images, specs)
        assert max(scores.values()) <= 0.05, scores


def _perturbed(specs: list[dict], kind: str) -> tuple[list[dict], list[dict]]:
    rng = np.random.default_rng(0)
    originals, changed = [], []
    for s in specs:
        try:
            changed.append(perturb(s, kind, rng))
        except SceneError:
            continue
        originals.append(s)
    return originals, changed


@pytest.mark.parametrize(
    "kind, failing",
    [
        ("swap_binding", ("color_attr", "position")),
        ("color", ("colors", "color_attr", "position", "counting")),
        ("shape", CATEGORIES),
        ("relation", ("position",)),
        ("count", ("counting",)),
    ],
)
def test_minimal_pairs_fail(judge, kind, failing):
    _, specs = world_batch(360, 32, seed=14)
    originals, changed = _perturbed(specs, kind)
    images = np.stack([render(s, 32) for s in changed])
    scores = judge.evaluate(images, originals)  # the perturbed scene judged against the original prompt
    for category in failing:
        if category in scores:
            assert scores[category] <= 0.02, (category, scores)
    # what the perturbation leaves intact still passes: colour changes keep every shape in place
    if kind in ("color", "swap_binding"):
        assert scores.get("single_object", 1.0) == 1.0 and scores.get("two_objects", 1.0) == 1.0


# ------------------------------------------------------------------ inputs and errors


def test_tensor_and_uint8_inputs_agree(judge):
    images, specs = world_batch(12, 32, seed=15)
    as_uint8 = judge.evaluate_detailed(images, specs)
    as_tensor = judge.evaluate_detailed(from_uint8(images), specs)
    assert as_uint8 == as_tensor
    assert judge.evaluate_detailed(torch.from_numpy(images), specs) == as_uint8  # uint8 tensor, channels last
    assert judge.evaluate_detailed(images, [json.dumps(s) for s in specs]) == as_uint8  # spec as stored in shards
    one = judge.evaluate(images[0], specs[:1])
    assert one == {specs[0]["category"]: 1.0, "overall": 1.0}


def test_bad_inputs(judge, caplog):
    images, specs = world_batch(4, 32, seed=16)
    with pytest.raises(ValueError, match="got 4 images but 3 specs"):
        judge.evaluate(images, specs[:3])
    with pytest.raises(ValueError, match="images must be uint8 \\[N, H, W, 3\\]"):
        judge.evaluate(images[..., :2], specs)
    with pytest.raises(ValueError, match="numpy images must be uint8, got float64"):
        judge.evaluate(images.astype(np.float64), specs)
    with pytest.raises(SceneError, match="unknown category 'faces'"):
        judge.evaluate(images[:1], [{**specs[0], "category": "faces"}])
    with caplog.at_level(logging.WARNING):
        scores = judge.evaluate(images, [specs[0], None, specs[2], None])
    assert "skipped 2 of 4 samples without a scene spec" in caplog.text
    detailed = judge.evaluate_detailed(images, [specs[0], None, specs[2], None])
    assert [d["passed"] for d in detailed] == [True, None, True, None]
    assert [d["sizes_ok"] for d in detailed] == [True, None, True, None]
    assert sum(scores[c] for c in scores if c != "overall") == len({specs[0]["category"], specs[2]["category"]})
