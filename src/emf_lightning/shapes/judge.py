"""ShapesEval: an exact, model-free judge of generated shapes-world images against their scene specs.

Parsing an image (any resolution, all thresholds are fractions of the image):

1. **Colour segmentation.** Against a known background b, an antialiased pixel of colour c is
   ``b + alpha * (c - b)``. For every named colour we project ``pixel - b`` on ``c - b`` (alpha) and take the
   distance to that line (residual). A pixel belongs to the colour with the smallest residual if its alpha
   is at least ``alpha_min`` and its residual at most ``max_residual``; otherwise it is background.
2. **Connected components** per colour (``scipy.ndimage.label``, 8-connected); components smaller than
   ``min_area`` (fraction of the image) are noise.
3. **Shape from moments.** Each component's alpha-weighted central moments, including its antialiased
   fringe, corrected for the pixel box blur (Sheppard's correction), give two scale-invariant numbers:
   ``k = mu22 / (mu20 * mu02)`` (diamond 0.4, circle 2/3, triangle 0.8, square 1.0) and the vertical
   skewness ``mu03 / mu02^1.5`` (0 for the symmetric shapes, -0.566 for an upward triangle). The nearest
   prototype wins; a component farther than ``max_shape_distance`` from every prototype, or more spread
   out than a solid shape can be (``max_spread``), is ``unknown``.
4. **Position** is the centre of the shape's box (centroid, shifted for triangles), **size** compares the
   width implied by the area and shape with the small/large boundary.

Scoring follows GenEval's categories; what each checks (identity = colour and shape):

- ``single_object``: an object of the prompted shape is present.
- ``colors``: an object of the prompted shape and colour is present.
- ``two_objects``: both prompted shapes are present (two distinct detections).
- ``color_attr``: both prompted colour-shape bindings are present (two distinct detections).
- ``counting``: exactly N objects of the prompted identity.
- ``position``: objects of both identities are present and some such pair stands in the stated relation.

With ``strict=True`` (default) an image also fails when it holds more objects than its spec; GenEval's
semantics are ``strict=False``. Relations are read as in GenEval: the centre offset, shrunk by
``position_slack`` times the two objects' widths, must point within 60 degrees of the relation's direction.
``overall`` is the mean of the per-category accuracies over the categories present.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from emf_lightning.shapes.scene import (
    BACKGROUND,
    CATEGORIES,
    COLORS,
    SHAPE_EXTENT,
    SHAPES,
    SIZE_FRACTION,
    validate_spec,
)
from emf_lightning.utils.images import to_uint8

log = logging.getLogger(__name__)

# (k, vertical skewness) of the ideal shapes; see the module docstring.
SHAPE_PROTOTYPES: dict[str, tuple[float, float]] = {
    "diamond": (0.4, 0.0),
    "circle": (2.0 / 3.0, 0.0),
    "triangle": (0.8, -0.4 * math.sqrt(2.0)),
    "square": (1.0, 0.0),
}
# Area of each shape as a fraction of its own box (box side = SHAPE_EXTENT * nominal width).
_AREA_IN_BOX: dict[str, float] = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5, "diamond": 0.5}
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def _dilate(mask: np.ndarray) -> np.ndarray:
    """3x3 binary dilation (cheaper than scipy's for the tiny masks of one object)."""
    h, w = mask.shape
    padded = np.zeros((h + 2, w + 2), dtype=bool)
    padded[1:-1, 1:-1] = mask
    out = np.zeros_like(mask)
    for dy in range(3):
        for dx in range(3):
            out |= padded[dy : dy + h, dx : dx + w]
    return out


@dataclass
class Detection:
    """One object found in an image. Positions and sizes are fractions of the image side (y down)."""

    shape: str  # a name from SHAPES, or "unknown"
    color: str
    size: str  # "small" or "large"
    x: float
    y: float
    width: float  # width of the shape's box implied by its area and shape
    area: float  # alpha-weighted area as a fraction of the image
    k: float  # mu22 / (mu20 mu02)
    skew: float  # vertical skewness

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        return {f: (round(v, 4) if isinstance(v, float) else v) for f, v in vars(self).items()}


class ShapesEval:
    """Parse generated images into objects and score them against scene specs.

    Every threshold is resolution-agnostic (fractions of the image side or area, or 0-255 colour units),
    so one instance judges 32x32 and 256x256 images alike.

    Args:
        alpha_min: minimum coverage along a colour's line for a pixel to be foreground.
        max_residual: maximum distance (0-255 RGB units) of a pixel from its colour's line.
        min_area: minimum component area as a fraction of the image (the smallest object covers ~3.9%).
        max_shape_distance: largest scaled distance to a shape prototype before the shape is ``unknown``.
        max_spread: largest (mu20 + mu02) / area^2 of an object; raggeder blobs are ``unknown``.
        position_slack: fraction of the two widths subtracted from a centre offset before reading a relation.
        background: background RGB of the world.
        colors: named colours (default: the world's ``COLORS``).
        shapes: the shapes the world uses (default ``SHAPES``; pass ``ALL_SHAPES`` for diamond worlds).
        strict: also fail an image that holds more objects than its spec (extra objects, unknown blobs).
            GenEval ignores extras; in a world with a plain background they mean the image is wrong, and
            without this rule an image full of colourful blobs would pass ``single_object``.
    """

    def __init__(
        self,
        alpha_min: float = 0.5,
        max_residual: float = 80.0,
        min_area: float = 0.012,
        max_shape_distance: float = 3.0,
        max_spread: float = 0.3,
        position_slack: float = 0.1,
        background: Sequence[int] = BACKGROUND,
        colors: Mapping[str, Sequence[int]] | None = None,
        shapes: Sequence[str] = SHAPES,
        strict: bool = True,
    ):
        if not 0.0 < alpha_min <= 1.0:
            raise ValueError(f"alpha_min must be in (0, 1], got {alpha_min}")
        if max_residual <= 0 or min_area <= 0 or max_shape_distance <= 0 or position_slack < 0:
            raise ValueError("max_residual, min_area and max_shape_distance must be > 0, position_slack >= 0")
        self.alpha_min, self.max_residual, self.min_area = alpha_min, max_residual, min_area
        self.max_shape_distance, self.position_slack = max_shape_distance, position_slack
        self.max_spread, self.strict = max_spread, strict
        self.background = np.asarray(background, dtype=np.float32)
        palette = dict(COLORS if colors is None else colors)
        self.color_names = list(palette)
        self.directions = np.asarray([palette[c] for c in self.color_names], dtype=np.float32) - self.background
        norms = (self.directions**2).sum(1)
        if np.any(norms == 0):
            raise ValueError("a named colour equals the background colour")
        self._norm2 = norms
        unknown = [s for s in shapes if s not in SHAPE_PROTOTYPES]
        if unknown or not shapes:
            raise ValueError(f"shapes must be a non-empty subset of {list(SHAPE_PROTOTYPES)}, got {list(shapes)}")
        self._proto_names = list(shapes)
        self._proto_array = np.asarray([SHAPE_PROTOTYPES[n] for n in self._proto_names])
        # scale of each feature in the prototype distance: prototypes differ by >= 0.13 in k or 0.57 in skew
        self.k_scale, self.skew_scale = 0.05, 0.12

    # ------------------------------------------------------------------ parsing

    def classify_pixels(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per pixel of a uint8 [..., H, W, 3] array: index of the nearest colour line, projections on
        every colour (alpha, [..., H, W, K]) and the foreground mask."""
        p = image.astype(np.float32) - self.background  # [..., H, W, 3]
        proj = p @ self.directions.T / self._norm2  # [..., H, W, K] unclipped alpha
        alpha = np.clip(proj, 0.0, 1.0)
        # |p - alpha e|^2 = |p|^2 - 2 alpha (p . e) + alpha^2 |e|^2, with p . e = proj |e|^2
        resid2 = (p * p).sum(-1, keepdims=True) + (alpha * alpha - 2 * alpha * proj) * self._norm2
        best = resid2.argmin(-1)
        best_alpha = np.take_along_axis(alpha, best[..., None], -1)[..., 0]
        best_resid2 = np.take_along_axis(resid2, best[..., None], -1)[..., 0]
        fg = (best_alpha >= self.alpha_min) & (best_resid2 <= self.max_residual**2)
        return best, alpha, fg

    def parse(self, image: np.ndarray) -> list[Detection]:
        """All objects in one uint8 [H, W, 3] image (per colour, in raster order of their first pixel)."""
        if image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"expected one uint8 image [H, W, 3], got shape {tuple(image.shape)}")
        return self._parse_classified(*self.classify_pixels(image))

    def parse_batch(self, images: np.ndarray, chunk_pixels: int = 1 << 20) -> list[list[Detection]]:
        """``parse`` for uint8 [N, H, W, 3], classifying pixels of many images per numpy call."""
        per_chunk = max(1, chunk_pixels // max(1, images.shape[1] * images.shape[2]))
        out = []
        for start in range(0, len(images), per_chunk):
            best, alpha, fg = self.classify_pixels(images[start : start + per_chunk])
            out.extend(self._parse_classified(b, a, f) for b, a, f in zip(best, alpha, fg))
        return out

    def _parse_classified(self, best: np.ndarray, alpha: np.ndarray, fg: np.ndarray) -> list[Detection]:
        height, width = best.shape
        min_pixels = self.min_area * height * width
        detections = []
        for k in np.unique(best[fg]):
            labels, count = ndimage.label(fg & (best == k), structure=_EIGHT_CONNECTED)
            sizes = np.bincount(labels.ravel(), minlength=count + 1)
            boxes = ndimage.find_objects(labels)
            # noise makes hundreds of specks per image: select the large components before any Python loop
            for index in np.flatnonzero(sizes[1:] >= min_pixels) + 1:
                box = boxes[index - 1]
                det = self._describe(labels, int(index), box, best, alpha[..., k], int(k), height, width)
                if det is not None:
                    detections.append(det)
        return detections

    def _describe(
        self,
        labels: np.ndarray,
        index: int,
        box: tuple[slice, slice],
        best: np.ndarray,
        alpha: np.ndarray,
        k: int,
        height: int,
        width: int,
    ) -> Detection | None:
        # Grow the box by one pixel so the antialiased fringe (alpha < alpha_min) counts towards the moments.
        y0, y1 = max(0, box[0].start - 1), min(height, box[0].stop + 1)
        x0, x1 = max(0, box[1].start - 1), min(width, box[1].stop + 1)
        core = labels[y0:y1, x0:x1] == index
        region = _dilate(core)
        # fringe pixels count only where this colour is their nearest line and no other object claims them
        region &= (best[y0:y1, x0:x1] == k) & ((labels[y0:y1, x0:x1] == 0) | core)
        w = np.where(region, alpha[y0:y1, x0:x1], 0.0).astype(np.float64)
        mass = w.sum()
        if mass <= 0:
            return None
        ys = np.arange(y0, y1, dtype=np.float64)[:, None] + 0.5
        xs = np.arange(x0, x1, dtype=np.float64)[None, :] + 0.5
        cx, cy = (w * xs).sum() / mass, (w * ys).sum() / mass
        dx, dy = xs - cx, ys - cy
        # Sheppard's correction: the antialiased image is the shape blurred by a 1-pixel box.
        m20 = (w * dx * dx).sum() / mass - 1 / 12
        m02 = (w * dy * dy).sum() / mass - 1 / 12
        m22 = (w * dx * dx * dy * dy).sum() / mass - (m20 + m02) / 12 - 1 / 144
        m03 = (w * dy**3).sum() / mass
        if m20 <= 0 or m02 <= 0:
            return None
        ratio = m22 / (m20 * m02)
        skew = m03 / m02**1.5
        # (mu20 + mu02) / mu00^2 is 0.159 for a disk, 0.167 for a square, 0.194 for our triangle and grows
        # for ragged or elongated blobs (a 12x1 line: 1.0): the test that tells noise from objects.
        spread = (m20 + m02) / mass
        shape = self._nearest_shape(ratio, skew) if spread <= self.max_spread else "unknown"
        side = math.sqrt(height * width)
        area = mass / (height * width)
        if shape == "unknown":
            box_width, centre_y = math.sqrt(mass) / side, cy
        else:
            box_width = math.sqrt(mass / _AREA_IN_BOX[shape]) / side
            # an upward triangle's centroid sits a sixth of its height below the centre of its box
            centre_y = cy - (box_width * side / 6 if shape == "triangle" else 0.0)
        nominal = box_width / SHAPE_EXTENT.get(shape, 1.0)
        size = "large" if nominal >= math.sqrt(SIZE_FRACTION["small"] * SIZE_FRACTION["large"]) else "small"
        return Detection(
            shape=shape,
            color=self.color_names[k],
            size=size,
            x=float(cx / width),
            y=float(centre_y / height),
            width=float(box_width),
            area=float(area),
            k=float(ratio),
            skew=float(skew),
        )

    def _nearest_shape(self, ratio: float, skew: float) -> str:
        protos = self._proto_array
        dist = np.hypot((protos[:, 0] - ratio) / self.k_scale, (protos[:, 1] - skew) / self.skew_scale)
        i = int(dist.argmin())
        return self._proto_names[i] if dist[i] <= self.max_shape_distance else "unknown"

    # ------------------------------------------------------------------ scoring

    def relation_holds(self, a: Detection, b: Detection, rel: str) -> bool:
        """Does detection ``a`` stand ``rel`` detection ``b``? (offset shrunk by the slack, within 60 degrees)."""
        offset = np.array([a.x - b.x, a.y - b.y])
        norm = float(np.linalg.norm(offset))
        if norm == 0:
            return False
        shrunk = np.maximum(np.abs(offset) - self.position_slack * (a.width + b.width), 0.0) * np.sign(offset)
        direction = {"left of": (-1, 0), "right of": (1, 0), "above": (0, -1), "below": (0, 1)}[rel]
        return float(np.dot(shrunk, direction)) / norm > 0.5

    def score(self, detections: Sequence[Detection], spec: Mapping[str, Any]) -> tuple[bool, str]:
        """(passed, reason) for one image's detections against its spec."""
        validate_spec(spec)
        objects, category = spec["objects"], spec["category"]
        if self.strict and len(detections) > len(objects):
            return False, f"{len(detections)} objects detected, the scene has {len(objects)}"

        def matching(obj: Mapping[str, Any], use_color: bool = True) -> list[int]:
            return [
                i
                for i, d in enumerate(detections)
                if d.shape == obj["shape"] and (not use_color or d.color == obj["color"])
            ]

        def name(obj: Mapping[str, Any], use_color: bool = True) -> str:
            return f"{obj['color']} {obj['shape']}" if use_color else str(obj["shape"])

        if category in ("single_object", "colors"):
            use_color = category == "colors"
            found = matching(objects[0], use_color)
            return (True, "ok") if found else (False, f"no {name(objects[0], use_color)} found")
        if category == "counting":
            n, found = len(objects), len(matching(objects[0]))
            return (found == n, "ok" if found == n else f"found {found} {name(objects[0])}s, expected {n}")
        a, b = objects[0], objects[1]
        if category in ("two_objects", "color_attr"):
            use_color = category == "color_attr"
            ma, mb = matching(a, use_color), matching(b, use_color)
            if any(i != j for i in ma for j in mb):
                return True, "ok"
            missing = [name(o, use_color) for o, m in ((a, ma), (b, mb)) if not m] or ["two distinct objects"]
            return False, "missing " + " and ".join(missing)
        # position
        rel = spec["relations"][0]
        subj, obj = objects[rel["a"]], objects[rel["b"]]
        ms, mo = matching(subj), matching(obj)
        if not ms or not mo:
            missing = [name(o) for o, m in ((subj, ms), (obj, mo)) if not m]
            return False, "missing " + " and ".join(missing)
        for i in ms:
            for j in mo:
                if i != j and self.relation_holds(detections[i], detections[j], rel["rel"]):
                    return True, "ok"
        return False, f"{name(subj)} is not {rel['rel']} {name(obj)}"

    # ------------------------------------------------------------------ batches

    @staticmethod
    def _as_uint8(images: np.ndarray | torch.Tensor | Sequence[np.ndarray]) -> np.ndarray:
        if isinstance(images, torch.Tensor):
            if images.dtype == torch.uint8:
                images = images.cpu().numpy()
                if images.ndim >= 3 and images.shape[-1] != 3 and images.shape[-3] == 3:
                    images = np.moveaxis(images, -3, -1)
            else:
                images = to_uint8(images)  # float [-1, 1] channels-first, the project's tensor convention
        images = np.asarray(images)
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(
                f"images must be uint8 [N, H, W, 3] (or a float tensor [N, 3, H, W] in [-1, 1]), "
                f"got shape {tuple(images.shape)}"
            )
        if images.dtype != np.uint8:
            raise ValueError(f"numpy images must be uint8, got {images.dtype}; convert tensors with to_uint8")
        return images

    def evaluate_detailed(
        self,
        images: np.ndarray | torch.Tensor | Sequence[np.ndarray],
        specs: Sequence[Mapping[str, Any] | str | None],
    ) -> list[dict[str, Any]]:
        """Per image: {"category", "passed", "reason", "sizes_ok", "detections": [Detection.to_dict()]}.

        ``sizes_ok`` (a diagnostic outside the category scores, which follow GenEval and ignore size): every
        spec object has its own detection of the same colour, shape and size.

        A spec may be a dict or its JSON text (as stored in shards). A ``None`` spec (a sample that is not
        from the shapes world) is skipped: ``passed`` is ``None``.
        """
        arr = self._as_uint8(images)
        specs = [json.loads(s) if isinstance(s, (str, bytes)) else s for s in specs]
        if len(arr) != len(specs):
            raise ValueError(f"got {len(arr)} images but {len(specs)} specs")
        keep = [i for i, spec in enumerate(specs) if spec is not None]
        parsed = dict(zip(keep, self.parse_batch(arr[keep]))) if keep else {}
        results = []
        for i, spec in enumerate(specs):
            if spec is None:
                results.append(
                    {"category": None, "passed": None, "reason": "no spec", "sizes_ok": None, "detections": []}
                )
                continue
            detections = parsed[i]
            passed, reason = self.score(detections, spec)
            results.append(
                {
                    "category": spec["category"],
                    "passed": passed,
                    "reason": reason,
                    "sizes_ok": sizes_match(detections, spec["objects"]),
                    "detections": [d.to_dict() for d in detections],
                }
            )
        return results

    def evaluate(
        self,
        images: np.ndarray | torch.Tensor | Sequence[np.ndarray],
        specs: Sequence[Mapping[str, Any] | str | None],
    ) -> dict[str, float]:
        """Accuracy per category present, and ``overall`` = their mean (GenEval's averaging).

        Samples with a ``None`` spec are skipped and counted in a log warning; if none remain the result is {}.
        """
        results = self.evaluate_detailed(images, specs)
        skipped = sum(r["passed"] is None for r in results)
        if skipped:
            log.warning("ShapesEval skipped %d of %d samples without a scene spec", skipped, len(results))
        per_category: dict[str, list[bool]] = {}
        for r in results:
            if r["passed"] is not None:
                per_category.setdefault(r["category"], []).append(bool(r["passed"]))
        scores = {c: float(np.mean(per_category[c])) for c in CATEGORIES if c in per_category}
        if scores:
            scores["overall"] = float(np.mean(list(scores.values())))
        return scores


def sizes_match(detections: Sequence[Detection], objects: Sequence[Mapping[str, Any]]) -> bool:
    """Every object has a distinct detection with its colour, shape and size (multiset containment)."""
    found = Counter((d.color, d.shape, d.size) for d in detections)
    wanted = Counter((o["color"], o["shape"], o["size"]) for o in objects)
    return all(found[k] >= n for k, n in wanted.items())
