"""Why a generated image failed ShapesEval: one failure mode per image, for any category.

ShapesEval says pass or fail; a user improving a model needs to know *how* it fails. ``failure_mode`` reads the
judge's detections against the scene spec and names the first thing that is wrong, in the order a person would
check a picture: is anything there, are there too many things, is every asked-for object there (by shape), are the
colours bound to the right shapes, is the relation right, is the count right. The modes:

- ``passed``: the judge passed the image.
- ``nothing drawn``: no object detected.
- ``extra objects``: more objects than the scene has (for counting: every one of the asked identity, too many of
  them, is ``wrong count`` instead).
- ``missing object``: fewer objects than asked for, and one of the asked shapes is absent.
- ``wrong shape``: as many objects as asked for, but one asked shape is absent (drawn as another or unreadable).
- ``swapped colours``: every asked shape is there, but two objects wear each other's colours (the binding error
  of "a red circle and a blue square" drawn as a blue circle and a red square).
- ``wrong colour``: every asked shape is there, one wears a colour the prompt did not give it.
- ``wrong relation``: both objects are right, but they do not stand in the stated relation.
- ``wrong count``: objects of the asked identity, but not as many as asked.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

FAILURE_MODES: tuple[str, ...] = (
    "passed",
    "nothing drawn",
    "extra objects",
    "missing object",
    "wrong shape",
    "swapped colours",
    "wrong colour",
    "wrong relation",
    "wrong count",
)


def _field(detection: Any, name: str) -> Any:
    """Detections come as :class:`~emf_lightning.shapes.judge.Detection` or as their dicts."""
    return detection[name] if isinstance(detection, Mapping) else getattr(detection, name)


def failure_mode(spec: Mapping[str, Any], detections: Sequence[Any], passed: bool) -> str:
    """The first thing wrong with an image whose judged outcome is ``passed`` (see the module docstring)."""
    if passed:
        return "passed"
    if not detections:
        return "nothing drawn"
    objects, category = spec["objects"], spec["category"]
    shapes = [_field(d, "shape") for d in detections]
    colours = [_field(d, "color") for d in detections]
    if category == "counting":
        wanted = (objects[0]["color"], objects[0]["shape"])
        if all((c, s) == wanted for c, s in zip(colours, shapes)):
            return "wrong count"
        if len(detections) > len(objects):
            return "extra objects"
        return "wrong shape" if objects[0]["shape"] not in shapes else "wrong colour"
    if len(detections) > len(objects):
        return "extra objects"
    # Is each asked-for shape there, one detection per object (a multiset: two squares need two)?
    found = Counter(shapes)
    if any(found[s] < n for s, n in Counter(o["shape"] for o in objects).items()):
        return "missing object" if len(detections) < len(objects) else "wrong shape"
    if category in ("single_object", "two_objects"):  # shapes were all the category asked for
        return "wrong shape"
    # Colours: each object's shape is present; are the colours right, swapped between objects, or foreign?
    worn = {s: {c for c, s2 in zip(colours, shapes) if s2 == s} for s in found}
    if category == "position" and all(o["color"] in worn[o["shape"]] for o in objects):
        return "wrong relation"
    asked = {o["color"] for o in objects}
    drawn = {c for o in objects for c in worn[o["shape"]]}
    if len(objects) > 1 and drawn == asked:
        return "swapped colours"
    return "wrong colour"


def failure_table(
    specs: Sequence[Mapping[str, Any]], details: Sequence[Mapping[str, Any]]
) -> dict[str, dict[str, int]]:
    """{category: {mode: count}} over ShapesEval's ``evaluate_detailed`` output; samples without a spec skipped."""
    table: dict[str, Counter] = {}
    for spec, d in zip(specs, details):
        if spec is None or d.get("passed") is None:
            continue
        mode = failure_mode(spec, d["detections"], bool(d["passed"]))
        table.setdefault(spec["category"], Counter())[mode] += 1
    return {cat: {m: counts[m] for m in FAILURE_MODES if counts[m]} for cat, counts in table.items()}
