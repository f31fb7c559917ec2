"""Failure modes of multi-object images: real renders of a wrong scene, parsed by ShapesEval, named by diagnosis."""

from __future__ import annotations

import numpy as np
import pytest

from emf_lightning.shapes import ShapesEval, perturb, render
from emf_lightning.shapes.diagnosis import FAILURE_MODES, failure_mode, failure_table


def scene(category: str, *objects: dict, relations: list | None = None) -> dict:
    return {"objects": list(objects), "relations": relations or [], "category": category, "split": "train"}


def o(shape: str, color: str, x: float, y: float, size: str = "small") -> dict:
    return {"shape": shape, "color": color, "size": size, "x": x, "y": y}


RED_CIRCLE_LEFT = o("circle", "red", 0.25, 0.5)
BLUE_SQUARE_RIGHT = o("square", "blue", 0.75, 0.5)
PAIR = scene("color_attr", RED_CIRCLE_LEFT, BLUE_SQUARE_RIGHT)
LEFT_OF = scene("position", RED_CIRCLE_LEFT, BLUE_SQUARE_RIGHT, relations=[{"a": 0, "rel": "left of", "b": 1}])


def judged(asked: dict, drawn: dict | None) -> str:
    """Render ``drawn`` (None: an empty image), judge it against ``asked``, name the failure."""
    judge = ShapesEval()
    image = render(drawn, 64) if drawn is not None else np.zeros((64, 64, 3), np.uint8)
    detail = judge.evaluate_detailed(image[None], [asked])[0]
    return failure_mode(asked, detail["detections"], detail["passed"])


@pytest.mark.parametrize(
    ("asked", "drawn", "mode"),
    [
        (PAIR, PAIR, "passed"),
        (PAIR, None, "nothing drawn"),
        (PAIR, scene("colors", RED_CIRCLE_LEFT), "missing object"),
        (PAIR, scene("color_attr", RED_CIRCLE_LEFT, o("triangle", "blue", 0.75, 0.5)), "wrong shape"),
        (PAIR, scene("color_attr", o("circle", "blue", 0.25, 0.5), o("square", "red", 0.75, 0.5)), "swapped colours"),
        (PAIR, scene("color_attr", RED_CIRCLE_LEFT, o("square", "green", 0.75, 0.5)), "wrong colour"),
        (PAIR, scene("counting", RED_CIRCLE_LEFT, BLUE_SQUARE_RIGHT, o("circle", "red", 0.5, 0.15)), "extra objects"),
        (LEFT_OF, LEFT_OF, "passed"),
        (
            LEFT_OF,
            scene("two_objects", o("circle", "red", 0.75, 0.5), o("square", "blue", 0.25, 0.5)),
            "wrong relation",
        ),
        (
            scene("counting", o("circle", "red", 0.25, 0.5), o("circle", "red", 0.75, 0.5)),
            scene("counting", o("circle", "red", 0.2, 0.5), o("circle", "red", 0.5, 0.5), o("circle", "red", 0.8, 0.5)),
            "wrong count",
        ),
        (
            scene("colors", o("triangle", "red", 0.5, 0.5)),
            scene("colors", o("triangle", "blue", 0.5, 0.5)),
            "wrong colour",
        ),
        (scene("colors", o("triangle", "red", 0.5, 0.5)), scene("colors", o("square", "red", 0.5, 0.5)), "wrong shape"),
    ],
)
def test_each_failure_mode_is_named_from_a_real_render(asked, drawn, mode):
    assert judged(asked, drawn) == mode


def test_minimal_pairs_fail_for_the_reason_they_were_made():
    """A perturbed scene judged against the original fails in the mode of its perturbation."""
    rng = np.random.default_rng(0)
    expected = {"swap_binding": "swapped colours", "relation": "wrong relation", "color": "wrong colour"}
    for kind, mode in expected.items():
        asked = LEFT_OF if kind == "relation" else PAIR
        assert judged(asked, perturb(asked, kind, rng)) == mode, kind


def test_failure_table_counts_per_category_in_mode_order():
    details = [
        {"passed": True, "detections": []},
        {"passed": False, "detections": []},
        {"passed": None, "detections": []},  # a sample the judge skipped (no spec)
    ]
    table = failure_table([PAIR, PAIR, None], details)
    assert table == {"color_attr": {"passed": 1, "nothing drawn": 1}}
    assert list(table["color_attr"]) == [m for m in FAILURE_MODES if m in table["color_attr"]]
