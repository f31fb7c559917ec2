"""Labelled image grids (prompt x step count, or any rows x columns) saved as PNG.

Cells are laid out row-major with ``padding`` pixels around every cell by torchvision's ``make_grid`` (a
single image, which ``make_grid`` returns unpadded, is padded the same way here). Text labels are drawn with
PIL into a left margin (one label per row, wrapped, truncated with an ellipsis when it does not fit the
row height) and a top margin (one label per column).

Geometry, exactly (``H``, ``W`` = cell size after ``upscale``; ``p`` = padding; ``n`` = cells):

    width  = row_label_width * (row_labels given) + ncol * (W + p) + p
    height = col_label_height * (col_labels given) + nrows * (H + p) + p

with ``ncol = min(nrow, n)``, ``nrows = ceil(n / nrow)`` (torchvision's convention: ``nrow`` is the number
of images in each row).
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from emf_lightning.utils.images import to_uint8

ELLIPSIS = "\u2026"


@lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    # Pillow >= 10.1 ships a scalable default font; the bitmap fallback keeps working without FreeType.
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # pragma: no cover - old Pillow or no FreeType
        return ImageFont.load_default()


def _text_width(font: ImageFont.ImageFont | ImageFont.FreeTypeFont, text: str) -> float:
    return float(font.getlength(text))


def _line_height(font: ImageFont.ImageFont | ImageFont.FreeTypeFont) -> int:
    left, top, right, bottom = font.getbbox("Hgjy|")
    return int(bottom) + 2


def fit_text(text: str, max_width: float, max_lines: int, font_size: int = 12) -> list[str]:
    """Wrap ``text`` into at most ``max_lines`` lines no wider than ``max_width`` pixels.

    Words longer than a line are broken; when the text does not fit, the last line ends with an
    ellipsis. Returns ``[]`` when not even one line fits (``max_lines < 1``).
    """
    if max_lines < 1 or max_width <= 0:
        return []
    font = _font(font_size)
    # Start from the widest character count that could fit and shrink until every line fits in pixels.
    avg = max(_text_width(font, "abcdefghijklmnopqrstuvwxyz") / 26.0, 1.0)
    width_chars = max(1, int(max_width // avg) + 2)
    while True:
        lines = textwrap.wrap(text, width=width_chars, break_long_words=True) or [""]
        if all(_text_width(font, line) <= max_width for line in lines) or width_chars == 1:
            break
        width_chars -= 1
    if len(lines) <= max_lines:
        return lines
    kept = lines[:max_lines]
    last = kept[-1]
    # Drop characters until the ellipsis fits: the reader must see that text was cut.
    while last and _text_width(font, last.rstrip() + ELLIPSIS) > max_width:
        last = last[:-1]
    kept[-1] = last.rstrip() + ELLIPSIS
    return kept


def _as_uint8_nhwc(images: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(images, torch.Tensor):
        if images.dtype == torch.uint8:
            raise TypeError("uint8 images must be a numpy array [B, H, W, C]; tensors must be float in [-1, 1]")
        if images.dim() != 4:
            raise ValueError(f"expected images [B, C, H, W], got shape {tuple(images.shape)}")
        arr = to_uint8(images)
    else:
        arr = np.asarray(images)
        if arr.dtype != np.uint8:
            raise TypeError(f"numpy images must be uint8 [B, H, W, C], got dtype {arr.dtype}")
        if arr.ndim != 4:
            raise ValueError(f"expected images [B, H, W, C], got shape {arr.shape}")
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    if arr.shape[-1] != 3:
        raise ValueError(f"expected 1 or 3 channels, got {arr.shape[-1]}")
    if arr.shape[0] == 0:
        raise ValueError("cannot make a grid of zero images")
    return arr


def _grid_body(cells: np.ndarray, nrow: int, padding: int, background: int) -> np.ndarray:
    """uint8 cells ``[n, H, W, 3]`` laid out ``nrow`` per row by ``torchvision.utils.make_grid`` -> uint8 HxWx3."""
    if cells.shape[0] == 1:  # make_grid returns a lone image as it is; pad it like every other cell
        return np.pad(cells[0], ((padding, padding), (padding, padding), (0, 0)), constant_values=background)
    from torchvision.utils import make_grid  # imported here: torchvision's import is not free

    grid = make_grid(
        torch.from_numpy(np.ascontiguousarray(cells)).permute(0, 3, 1, 2),
        nrow=nrow,
        padding=padding,
        pad_value=background,
    )
    return np.ascontiguousarray(grid.permute(1, 2, 0).numpy())


def make_labelled_grid(
    images: torch.Tensor | np.ndarray,
    nrow: int,
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None,
    padding: int = 2,
    upscale: int = 1,
    row_label_width: int = 200,
    col_label_height: int | None = None,
    font_size: int = 12,
    background: int = 255,
) -> Image.Image:
    """Lay images out row-major, ``nrow`` per row, with optional row and column labels.

    Args:
        images: float tensor ``[B, C, H, W]`` in [-1, 1], or uint8 array ``[B, H, W, C]``.
        nrow: images per row (torchvision convention).
        row_labels: one label per grid row, drawn left of it (wrapped to ``row_label_width``).
        col_labels: one label per column, drawn above it.
        padding: pixels around every cell.
        upscale: integer nearest-neighbour magnification of each image (tiny 32 px samples stay legible).
        row_label_width: left margin in pixels when ``row_labels`` is given.
        col_label_height: top margin in pixels when ``col_labels`` is given (default: two text lines).
        font_size: label font size in pixels.
        background: grey level of the padding and margins.
    """
    if nrow < 1:
        raise ValueError(f"nrow must be >= 1, got {nrow}")
    if upscale < 1:
        raise ValueError(f"upscale must be >= 1, got {upscale}")
    arr = _as_uint8_nhwc(images)
    n = arr.shape[0]
    ncol = min(nrow, n)
    nrows = math.ceil(n / nrow)
    if row_labels is not None and len(row_labels) != nrows:
        raise ValueError(f"row_labels has {len(row_labels)} entries but the grid has {nrows} rows")
    if col_labels is not None and len(col_labels) != ncol:
        raise ValueError(f"col_labels has {len(col_labels)} entries but the grid has {ncol} columns")

    if upscale > 1:
        arr = arr.repeat(upscale, axis=1).repeat(upscale, axis=2)
    cell_h, cell_w = arr.shape[1:3]
    body_img = Image.fromarray(_grid_body(arr, nrow, padding, background))

    font = _font(font_size)
    line_h = _line_height(font)
    left = row_label_width if row_labels is not None else 0
    top = (col_label_height if col_label_height is not None else 2 * line_h + 4) if col_labels is not None else 0
    canvas = Image.new("RGB", (left + body_img.width, top + body_img.height), (background,) * 3)
    canvas.paste(body_img, (left, top))
    draw = ImageDraw.Draw(canvas)
    ink = (0, 0, 0) if background > 127 else (255, 255, 255)

    if row_labels is not None:
        max_lines = max(1, cell_h // line_h)
        for r, label in enumerate(row_labels):
            lines = fit_text(str(label), row_label_width - 2 * padding - 2, max_lines, font_size)
            y0 = top + padding + r * (cell_h + padding)
            y = y0 + max(0, (cell_h - len(lines) * line_h) // 2)
            for line in lines:
                draw.text((padding + 1, y), line, fill=ink, font=font)
                y += line_h
    if col_labels is not None:
        max_lines = max(1, (top - 2) // line_h)
        for c, label in enumerate(col_labels):
            lines = fit_text(str(label), cell_w, max_lines, font_size)
            x0 = left + padding + c * (cell_w + padding)
            y = max(0, top - len(lines) * line_h - 1)
            for line in lines:
                x = x0 + max(0, (cell_w - _text_width(font, line)) / 2)
                draw.text((x, y), line, fill=ink, font=font)
                y += line_h
    return canvas


def save_grid(
    images: torch.Tensor | np.ndarray,
    path: str | Path,
    nrow: int,
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None,
    **kwargs,
) -> Path:
    """Write a labelled grid PNG (see :func:`make_labelled_grid` for the layout and options).

    Creates parent folders. Returns the path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    make_labelled_grid(images, nrow, row_labels=row_labels, col_labels=col_labels, **kwargs).save(path)
    return path
