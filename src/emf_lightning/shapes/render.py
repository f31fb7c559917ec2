"""Antialiased rendering of shapes-world specs with numpy: supersample each object's box, box-filter down.

Only the pixels inside an object's bounding box are supersampled, so a 32x32 scene costs a few small
array operations per object; 256x256 works the same way.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from emf_lightning.shapes.scene import BACKGROUND, COLORS, SHAPE_EXTENT, SIZE_FRACTION, validate_spec


def object_half_extent(obj: Mapping[str, Any], resolution: int) -> float:
    """Half the width (= height) of the object's own bounding box, in pixels."""
    return 0.5 * SIZE_FRACTION[obj["size"]] * SHAPE_EXTENT[obj["shape"]] * resolution


def _inside(shape: str, dx: np.ndarray, dy: np.ndarray, h: float) -> np.ndarray:
    """Point-in-shape test for offsets (dx, dy) from the box centre; h = half box side; y grows down."""
    if shape == "circle":
        return dx * dx + dy * dy <= h * h
    if shape == "square":
        return (np.abs(dx) <= h) & (np.abs(dy) <= h)
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= h
    if shape == "triangle":
        # apex at the top centre, base along the bottom edge: the half-width grows from 0 to h.
        return (dy <= h) & (np.abs(dx) <= 0.5 * (dy + h))
    raise ValueError(f"unknown shape '{shape}'")


def coverage(obj: Mapping[str, Any], resolution: int, supersample: int = 4) -> tuple[np.ndarray, int, int]:
    """Fraction of each pixel the object covers, on the pixel box that holds it.

    Squares are covered exactly; other shapes by ``supersample`` x ``supersample`` point samples per pixel.
    Returns (coverage [h, w] float32 in [0, 1], top row, left column). Pixel (i, j) spans
    [j, j + 1) x [i, i + 1) in pixel units; the object's centre is (x * resolution, y * resolution).
    """
    h = object_half_extent(obj, resolution)
    cx, cy = float(obj["x"]) * resolution, float(obj["y"]) * resolution
    x0, x1 = max(0, math.floor(cx - h)), min(resolution, math.ceil(cx + h))
    y0, y1 = max(0, math.floor(cy - h)), min(resolution, math.ceil(cy + h))
    if obj["shape"] == "square":
        # exact: a square's coverage is the product of its overlaps with the pixel's column and row
        ox = np.clip(np.minimum(np.arange(x0, x1) + 1, cx + h) - np.maximum(np.arange(x0, x1), cx - h), 0, 1)
        oy = np.clip(np.minimum(np.arange(y0, y1) + 1, cy + h) - np.maximum(np.arange(y0, y1), cy - h), 0, 1)
        return (oy[:, None] * ox[None, :]).astype(np.float32), y0, x0
    s = supersample
    xs = x0 + (np.arange((x1 - x0) * s, dtype=np.float32) + 0.5) / s - cx
    ys = y0 + (np.arange((y1 - y0) * s, dtype=np.float32) + 0.5) / s - cy
    hits = _inside(obj["shape"], xs[None, :], ys[:, None], h).astype(np.float32)
    cov = hits.reshape(y1 - y0, s, x1 - x0, s).mean(axis=(1, 3))
    return cov, y0, x0


def render(spec: Mapping[str, Any], resolution: int = 32, supersample: int = 4) -> np.ndarray:
    """Render a scene spec to a uint8 [resolution, resolution, 3] image (antialiased, black background)."""
    if int(resolution) < 8:
        raise ValueError(f"resolution must be at least 8 pixels, got {resolution}")
    if int(supersample) < 1:
        raise ValueError(f"supersample must be >= 1, got {supersample}")
    validate_spec(spec)
    img = np.empty((resolution, resolution, 3), dtype=np.float32)
    img[:] = BACKGROUND
    for obj in spec["objects"]:
        cov, y0, x0 = coverage(obj, resolution, supersample)
        region = img[y0 : y0 + cov.shape[0], x0 : x0 + cov.shape[1]]
        colour = np.asarray(COLORS[obj["color"]], dtype=np.float32)
        region += cov[..., None] * (colour - region)  # alpha compositing over what is already there
    return np.rint(img).astype(np.uint8)
