"""The shapes world's vocabulary and scene sampling: pure functions from a numpy Generator to a spec dict.

A *spec* is the JSON-serialisable ground truth of one scene::

    {"objects": [{"shape": "circle", "color": "red", "size": "large", "x": 0.31, "y": 0.52}, ...],
     "relations": [{"a": 0, "rel": "left of", "b": 1}],   # only the relations the caption states
     "category": "position",                                # the question the scene tests (GenEval-like)
     "split": "train"}

``x`` and ``y`` are the centre of the object's bounding box as a fraction of width and height (y grows
downwards). Positions are resolution-free, so one spec renders at 32, 64, ... pixels. Every object sits in
a square box of side ``SIZE_FRACTION[size] * MAX_EXTENT`` (the box of its widest possible shape); boxes
never overlap (``BOX_GAP`` apart) and stay ``BORDER`` away from the edges, so swapping an object's shape or
colour never makes a scene invalid.

Categories (what the caption asks, what ShapesEval checks):

- ``single_object``: one object; the prompted shape must be present.
- ``colors``: one object; the prompted shape must be present *in the prompted colour*.
- ``two_objects``: two objects of different shapes; both shapes must be present.
- ``color_attr``: two objects with different shapes and different colours; both colour-shape bindings.
- ``position``: two distinguishable objects and one relation (left of, right of, above, below).
- ``counting``: 2-4 identical objects (same shape, colour, size; groups of 3-4 are small so they fit);
  the exact count must be produced.

Held-out split: ``HELDOUT_PAIRS`` lists (colour, shape) combinations that never occur in the ``train``,
``val`` or ``test`` splits; every ``heldout`` scene contains at least one of them. Each pair uses a
different colour and every shape keeps other colours in training, so the held-out split measures
compositional generalisation (known colour + known shape, unseen combination).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

# Saturated colours far apart in direction from the black background: the seven corners of the RGB cube
# plus orange, placed on the bisector between red and yellow (22.5 degrees from each). Antialiasing
# against black only scales a colour, so its direction survives at the edges of objects.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "cyan": (0, 255, 255),
    "magenta": (255, 0, 255),
    "white": (255, 255, 255),
    "orange": (255, 106, 0),
}
BACKGROUND: tuple[int, int, int] = (0, 0, 0)

# Every shape the renderer, captions and ShapesEval know. The default world uses SHAPES: a small diamond
# (9 px across at 32x32) blurs into a disk under a Gaussian blur of 0.8 px, so it is opt-in (shapes=ALL_SHAPES)
# for 64 px and above, where it stays distinct.
ALL_SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIZES: tuple[str, ...] = ("small", "large")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
INVERSE_RELATION: dict[str, str] = {
    "left of": "right of",
    "right of": "left of",
    "above": "below",
    "below": "above",
}
CATEGORIES: tuple[str, ...] = ("single_object", "two_objects", "counting", "colors", "position", "color_attr")
SPLITS: dict[str, int] = {"train": 0, "val": 1, "test": 2, "heldout": 3}

# Nominal object width as a fraction of the image side: 9 px and 13.4 px at 32x32 (18 / 27 at 64).
# Large is as large as lets two large objects still stand side by side (4 half-boxes + 2 borders + gap
# leave 0.05 of slack).
SIZE_FRACTION: dict[str, float] = {"small": 0.28, "large": 0.42}
# Width (= height) of each shape relative to the nominal width; the square is a little smaller so that
# its area (0.81 w^2) matches the circle's (0.785 w^2).
SHAPE_EXTENT: dict[str, float] = {"circle": 1.0, "square": 0.9, "triangle": 1.0, "diamond": 1.0}
MAX_EXTENT: float = max(SHAPE_EXTENT.values())
BORDER: float = 0.03  # gap between an object box and the image edge (1 px at 32x32)
BOX_GAP: float = 0.05  # gap between two object boxes (1.6 px at 32x32): components never touch
COUNT_RANGE: tuple[int, int] = (2, 4)
# A relation scene keeps the perpendicular offset at most this fraction of the offset along the axis
# (about 27 degrees), so the stated relation is the only one a viewer (or ShapesEval) could read.
MAX_PERPENDICULAR_RATIO: float = 0.5

HELDOUT_PAIRS: tuple[tuple[str, str], ...] = (
    ("red", "triangle"),
    ("green", "circle"),
    ("blue", "square"),
    ("white", "triangle"),
)

_PLACEMENT_TRIES = 200
_DECIMALS = 4  # positions are rounded before checks so a JSON round trip renders the same image


class SceneError(ValueError):
    """A spec is malformed, or a requested scene or perturbation cannot exist."""


def box_half(size: str) -> float:
    """Half side of the square box that holds an object of this size, whatever its shape."""
    return 0.5 * SIZE_FRACTION[size] * MAX_EXTENT


def validate_spec(spec: Mapping[str, Any]) -> None:
    """Raise SceneError with a precise message if ``spec`` is not a renderable scene spec."""
    if not isinstance(spec, Mapping):
        raise SceneError(f"spec must be a dict, got {type(spec).__name__}")
    objects = spec.get("objects")
    if not isinstance(objects, Sequence) or len(objects) == 0:
        raise SceneError("spec['objects'] must be a non-empty list")
    for i, obj in enumerate(objects):
        for field in ("shape", "color", "size", "x", "y"):
            if field not in obj:
                raise SceneError(f"object {i} has no '{field}'")
        if obj["shape"] not in ALL_SHAPES:
            raise SceneError(f"object {i}: unknown shape '{obj['shape']}' (known: {', '.join(ALL_SHAPES)})")
        if obj["color"] not in COLORS:
            raise SceneError(f"object {i}: unknown color '{obj['color']}' (known: {', '.join(COLORS)})")
        if obj["size"] not in SIZES:
            raise SceneError(f"object {i}: unknown size '{obj['size']}' (known: {', '.join(SIZES)})")
        for axis in ("x", "y"):
            if not 0.0 <= float(obj[axis]) <= 1.0:
                raise SceneError(f"object {i}: {axis}={obj[axis]} is outside [0, 1]")
    category = spec.get("category")
    if category not in CATEGORIES:
        raise SceneError(f"unknown category '{category}' (known: {', '.join(CATEGORIES)})")
    for rel in spec.get("relations", []):
        if rel.get("rel") not in RELATIONS:
            raise SceneError(f"unknown relation '{rel.get('rel')}' (known: {', '.join(RELATIONS)})")
        for end in ("a", "b"):
            if not 0 <= int(rel.get(end, -1)) < len(objects):
                raise SceneError(f"relation end '{end}'={rel.get(end)} is not an object index")
    if category == "position" and len(spec.get("relations", [])) != 1:
        raise SceneError("a 'position' spec needs exactly one relation")


def scene_spec_or_none(meta: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The shapes-world scene spec in a sample's metadata (its .json), or None when it is not one.

    Other datasets' .json files (img2dataset's url/width/height/status, a list file's extra columns) are
    metadata, not scene specs: the one test is that ``validate_spec`` accepts it. The ``captions`` list that
    shards store beside the spec is not part of it.
    """
    if not meta or not isinstance(meta, Mapping):
        return None
    spec = {k: v for k, v in meta.items() if k != "captions"}
    try:
        validate_spec(spec)
    except (ValueError, TypeError, AttributeError, KeyError):  # SceneError is a ValueError
        return None
    return spec


def _boxes_clear(objects: Sequence[Mapping[str, Any]]) -> bool:
    """True when every box is inside the image (with BORDER) and no two boxes come closer than BOX_GAP."""
    for obj in objects:
        h = box_half(obj["size"])
        if not (BORDER + h <= obj["x"] <= 1 - BORDER - h and BORDER + h <= obj["y"] <= 1 - BORDER - h):
            return False
    for i in range(len(objects)):
        for j in range(i + 1, len(objects)):
            a, b = objects[i], objects[j]
            reach = box_half(a["size"]) + box_half(b["size"]) + BOX_GAP
            if abs(a["x"] - b["x"]) < reach and abs(a["y"] - b["y"]) < reach:
                return False
    return True


def relation_is_clear(a: Mapping[str, Any], b: Mapping[str, Any], rel: str) -> bool:
    """True when object ``a`` stands ``rel`` object ``b`` with separated boxes and a small perpendicular offset."""
    dx, dy = a["x"] - b["x"], a["y"] - b["y"]
    along, across = {"left of": (-dx, dy), "right of": (dx, dy), "above": (-dy, dx), "below": (dy, dx)}[rel]
    reach = box_half(a["size"]) + box_half(b["size"]) + BOX_GAP
    return along >= reach and abs(across) <= MAX_PERPENDICULAR_RATIO * along


def _random_position(rng: np.random.Generator, size: str) -> tuple[float, float]:
    lo = BORDER + box_half(size)
    x, y = rng.uniform(lo, 1 - lo, size=2)
    return round(float(x), _DECIMALS), round(float(y), _DECIMALS)


def place_objects(
    rng: np.random.Generator, attrs: list[dict[str, Any]], relation: tuple[int, str, int] | None = None
) -> list[dict[str, Any]]:
    """Give each attribute dict an (x, y) with boxes inside the image and apart; shrink large objects
    when they cannot fit.

    Two objects are laid out directly (no rejection loop): pick the axis that separates them and spread
    the free space at random. Other counts use sequential rejection sampling. ``relation`` = (a, rel, b)
    fixes the axis and order and keeps the perpendicular offset small (``relation_is_clear``).
    """
    attrs = [dict(a) for a in attrs]
    uniform_size = len(attrs) > 1 and len({(a["color"], a["shape"]) for a in attrs}) == 1
    while True:
        if len(attrs) == 2:
            objs = _place_two(rng, attrs, relation)
        else:
            for _ in range(_PLACEMENT_TRIES):
                objs = _place_sequentially(rng, attrs)
                if objs is not None:
                    break
        if objs is not None:
            return objs
        large = [i for i, a in enumerate(attrs) if a["size"] == "large"]
        if not large:
            raise SceneError(f"cannot place {len(attrs)} small objects without overlap")
        # A group of identical objects (counting) shrinks together: its caption states one size.
        for i in large if uniform_size else [int(rng.choice(large))]:
            attrs[i]["size"] = "small"


def _place_sequentially(rng: np.random.Generator, attrs: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    """One attempt: each object in turn gets a position clear of those already placed (None if stuck)."""
    objs: list[dict[str, Any]] = []
    for a in attrs:
        for _ in range(_PLACEMENT_TRIES // 4):
            x, y = _random_position(rng, a["size"])
            trial = objs + [{**a, "x": x, "y": y}]
            if _boxes_clear(trial):
                objs = trial
                break
        else:
            return None
    return objs


def _place_two(
    rng: np.random.Generator, attrs: list[dict[str, Any]], relation: tuple[int, str, int] | None
) -> list[dict[str, Any]] | None:
    """Two boxes separated along one axis; None when they cannot fit side by side."""
    ha, hb = box_half(attrs[0]["size"]), box_half(attrs[1]["size"])
    # rounding positions to _DECIMALS must not eat the last bit of a gap
    slack = 1 - 2 * BORDER - 2 * (ha + hb) - BOX_GAP - 1e-3
    if slack < 0:
        return None
    if relation is not None:
        rel = relation[1]
        axis = 0 if rel in ("left of", "right of") else 1
        a_first = (relation[0] == 0) == (rel in ("left of", "above"))
    else:
        axis, a_first = int(rng.integers(2)), bool(rng.integers(2))
    (h1, h2) = (ha, hb) if a_first else (hb, ha)
    s1, s2 = np.sort(rng.uniform(0, slack, size=2))
    first = BORDER + 1e-4 + h1 + s1
    second = first + h1 + h2 + BOX_GAP + 2e-4 + (s2 - s1)  # 2e-4: both positions get rounded
    along = (first, second) if a_first else (second, first)
    lo_a, lo_b = BORDER + ha, BORDER + hb
    perp_a = rng.uniform(lo_a, 1 - lo_a)
    if relation is None:
        perp_b = rng.uniform(lo_b, 1 - lo_b)
    else:
        # the perpendicular offset stays within MAX_PERPENDICULAR_RATIO of the distance along the axis
        reach = MAX_PERPENDICULAR_RATIO * abs(along[0] - along[1]) - 1e-3
        perp_b = rng.uniform(max(lo_b, perp_a - reach), min(1 - lo_b, perp_a + reach))
    objs = []
    for a, u, v in zip(attrs, along, (perp_a, perp_b)):
        x, y = (u, v) if axis == 0 else (v, u)
        objs.append({**a, "x": round(float(x), _DECIMALS), "y": round(float(y), _DECIMALS)})
    if not _boxes_clear(objs):  # cannot happen by construction; kept as a guard for edited constants
        raise SceneError(f"internal error: two-object layout overlaps: {objs}")
    if relation is not None and not relation_is_clear(objs[relation[0]], objs[relation[2]], relation[1]):
        raise SceneError(f"internal error: relation '{relation[1]}' does not hold: {objs}")
    return objs


def allowed_pairs(
    split: str, heldout: Sequence[tuple[str, str]] = HELDOUT_PAIRS, shapes: Sequence[str] = SHAPES
) -> list[tuple[str, str]]:
    """(colour, shape) pairs an object of a scene in ``split`` may freely use."""
    if split not in SPLITS:
        raise SceneError(f"unknown split '{split}' (known: {', '.join(SPLITS)})")
    held = set(map(tuple, heldout))
    pairs = [(c, s) for s in shapes for c in COLORS]
    return pairs if split == "heldout" else [p for p in pairs if p not in held]


def _draw_pairs(
    rng: np.random.Generator,
    n: int,
    split: str,
    heldout: Sequence[tuple[str, str]],
    distinct_shapes: bool,
    distinct_colors: bool,
    shapes: Sequence[str],
) -> list[tuple[str, str]]:
    """Draw n (colour, shape) pairs satisfying the split and the category's distinctness constraints."""
    pool = allowed_pairs(split, heldout, shapes)
    for _ in range(1000):
        pairs = [pool[k] for k in rng.integers(len(pool), size=n)]
        if split == "heldout":
            # at least one held-out combination, at a random slot so it is not always the first object
            pairs[int(rng.integers(n))] = tuple(heldout[int(rng.integers(len(heldout)))])  # type: ignore[assignment]
        if distinct_shapes and len({s for _, s in pairs}) < n:
            continue
        if distinct_colors and len({c for c, _ in pairs}) < n:
            continue
        if len(set(pairs)) < n:  # two identical objects would make the caption ambiguous
            continue
        return pairs
    raise SceneError("could not draw attribute pairs for this split")  # unreachable with the default vocabulary


def sample_scene(
    rng: np.random.Generator,
    category: str,
    split: str = "train",
    heldout: Sequence[tuple[str, str]] = HELDOUT_PAIRS,
    shapes: Sequence[str] = SHAPES,
) -> dict[str, Any]:
    """Draw one scene spec of ``category`` for ``split`` using only ``rng``."""
    if category not in CATEGORIES:
        raise SceneError(f"unknown category '{category}' (known: {', '.join(CATEGORIES)})")
    relations: list[dict[str, Any]] = []
    relation = None
    if category in ("single_object", "colors"):
        pairs = _draw_pairs(rng, 1, split, heldout, False, False, shapes)
        sizes = [SIZES[int(rng.integers(2))]]
    elif category == "counting":
        n = int(rng.integers(COUNT_RANGE[0], COUNT_RANGE[1] + 1))
        pairs = _draw_pairs(rng, 1, split, heldout, False, False, shapes) * n
        # three or four large boxes only fit in a rigid 2x2 grid; such groups are always small
        sizes = [SIZES[int(rng.integers(2))] if n == 2 else "small"] * n
    else:
        pairs = _draw_pairs(
            rng,
            2,
            split,
            heldout,
            distinct_shapes=category in ("two_objects", "color_attr"),
            distinct_colors=category == "color_attr",
            shapes=shapes,
        )
        sizes = [SIZES[int(k)] for k in rng.integers(2, size=2)]
        if category == "position":
            relation = (0, RELATIONS[int(rng.integers(len(RELATIONS)))], 1)
    attrs = [{"shape": s, "color": c, "size": z} for (c, s), z in zip(pairs, sizes)]
    objects = place_objects(rng, attrs, relation)
    if relation is not None:
        relations = [{"a": relation[0], "rel": relation[1], "b": relation[2]}]
    return {"objects": objects, "relations": relations, "category": category, "split": split}


def normalise_mix(mix: Mapping[str, float] | None) -> tuple[tuple[str, ...], np.ndarray]:
    """Category weights -> (categories, probabilities). ``None`` means uniform over all categories."""
    if mix is None:
        return CATEGORIES, np.full(len(CATEGORIES), 1.0 / len(CATEGORIES))
    unknown = [k for k in mix if k not in CATEGORIES]
    if unknown:
        raise SceneError(f"unknown categories in mix: {unknown} (known: {', '.join(CATEGORIES)})")
    names = tuple(k for k in CATEGORIES if k in mix)
    weights = np.array([float(mix[k]) for k in names])
    if np.any(weights < 0) or not np.isfinite(weights).all() or weights.sum() <= 0:
        raise SceneError(f"mix weights must be finite, non-negative and not all zero, got {dict(mix)}")
    return names, weights / weights.sum()


# --------------------------------------------------------------------------------------------------
# Minimal pairs
# --------------------------------------------------------------------------------------------------

PERTURBATIONS: tuple[str, ...] = ("color", "shape", "swap_binding", "relation", "count")


def _split_ok(objects: Sequence[Mapping[str, Any]], split: str, heldout: Sequence[tuple[str, str]]) -> bool:
    held = set(map(tuple, heldout))
    has_held = any((o["color"], o["shape"]) in held for o in objects)
    return has_held if split == "heldout" else not has_held


def _identities_ok(spec: Mapping[str, Any], objects: Sequence[Mapping[str, Any]]) -> bool:
    """The category's distinctness rules still hold (counting groups stay identical)."""
    category = spec["category"]
    ids = [(o["color"], o["shape"]) for o in objects]
    if category == "counting":
        return len(set(ids)) == 1
    if len(set(ids)) < len(ids):
        return False
    if category in ("two_objects", "color_attr") and len({o["shape"] for o in objects}) < len(objects):
        return False
    if category == "color_attr" and len({o["color"] for o in objects}) < len(objects):
        return False
    return True


def perturb(
    spec: Mapping[str, Any],
    kind: str,
    rng: np.random.Generator,
    heldout: Sequence[tuple[str, str]] = HELDOUT_PAIRS,
    shapes: Sequence[str] = SHAPES,
) -> dict[str, Any]:
    """A minimal pair: a copy of ``spec`` that differs in exactly one respect.

    - ``color`` / ``shape``: one object (in counting scenes, the whole identical group) changes colour /
      shape; positions and sizes stay.
    - ``swap_binding``: two objects exchange colours ("a red circle and a blue square" -> "a blue circle
      and a red square"); needs two objects of different colours.
    - ``relation``: the relation is reversed by mirroring both objects across the image centre line.
    - ``count``: a counting scene gains or loses one object (staying within COUNT_RANGE).

    The result keeps the category and split (a train scene never gains a held-out pair); new shapes
    come from ``shapes``. Raises
    SceneError when the perturbation does not apply to the scene.
    """
    validate_spec(spec)
    if kind not in PERTURBATIONS:
        raise SceneError(f"unknown perturbation '{kind}' (known: {', '.join(PERTURBATIONS)})")
    out = copy.deepcopy(dict(spec))
    objects = out["objects"]
    category, split = out["category"], out.get("split", "train")

    if kind in ("color", "shape"):
        field, values = ("color", tuple(COLORS)) if kind == "color" else ("shape", tuple(shapes))
        # counting scenes change the whole identical group; others one object, tried in random order
        if category == "counting":
            groups = [list(range(len(objects)))]
        else:
            groups = [[int(i)] for i in rng.permutation(len(objects))]
        for group in groups:
            options = []
            for value in values:
                if value == objects[group[0]][field]:
                    continue
                trial = [dict(o) for o in objects]
                for i in group:
                    trial[i][field] = value
                if _split_ok(trial, split, heldout) and _identities_ok(out, trial):
                    options.append(trial)
            if options:
                out["objects"] = options[int(rng.integers(len(options)))]
                return out
        raise SceneError(
            f"no '{kind}' change keeps this a valid '{split}' {category} scene "
            "(held-out pairs stay out of other splits; objects stay distinguishable)"
        )

    if kind == "swap_binding":
        if category == "counting" or len(objects) < 2:
            raise SceneError("swap_binding needs a scene with two objects of different colours")
        pairs = [
            (i, j)
            for i in range(len(objects))
            for j in range(i + 1, len(objects))
            if objects[i]["color"] != objects[j]["color"]
        ]
        if not pairs:
            raise SceneError("swap_binding needs a scene with two objects of different colours")
        options = []
        for i, j in pairs:
            trial = [dict(o) for o in objects]
            trial[i]["color"], trial[j]["color"] = objects[j]["color"], objects[i]["color"]
            if _split_ok(trial, split, heldout) and _identities_ok(out, trial):
                options.append(trial)
        if not options:
            raise SceneError(
                f"no 'swap_binding' change keeps this a valid '{split}' {category} scene "
                "(held-out pairs stay out of other splits; objects stay distinguishable)"
            )
        out["objects"] = options[int(rng.integers(len(options)))]
        return out

    if kind == "relation":
        if not out.get("relations"):
            raise SceneError("relation perturbation needs a scene with a stated relation (category 'position')")
        rel = out["relations"][0]
        axis = "x" if rel["rel"] in ("left of", "right of") else "y"
        for o in objects:  # mirroring keeps every box inside the image and every gap intact
            o[axis] = round(1.0 - o[axis], _DECIMALS)
        out["relations"] = [{**r, "rel": INVERSE_RELATION[r["rel"]]} for r in out["relations"]]
        return out

    # kind == "count"
    if category != "counting":
        raise SceneError("count perturbation needs a 'counting' scene")
    n = len(objects)
    lo, hi = COUNT_RANGE
    choices = [m for m in (n - 1, n + 1) if lo <= m <= hi]
    target = choices[int(rng.integers(len(choices)))]
    if target < n:
        out["objects"] = objects[:target]
        return out
    template = {k: objects[0][k] for k in ("shape", "color", "size")}
    for _ in range(_PLACEMENT_TRIES):
        x, y = _random_position(rng, template["size"])
        trial = objects + [{**template, "x": x, "y": y}]
        if _boxes_clear(trial):
            out["objects"] = trial
            return out
    if n - 1 >= lo:  # the image is too full for one more: remove one instead
        out["objects"] = objects[: n - 1]
        return out
    raise SceneError("cannot add an object to this counting scene")
