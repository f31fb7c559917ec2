"""Labelled grids: exact geometry, pixel placement, label drawing, text fitting, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from emf_lightning.utils.grids import ELLIPSIS, _font, fit_text, make_labelled_grid, save_grid
from emf_lightning.utils.images import to_uint8


def _distinct_images(n: int, h: int = 8, w: int = 6) -> np.ndarray:
    """uint8 [n, h, w, 3]; image i is filled with a unique colour (never the white background)."""
    out = np.zeros((n, h, w, 3), np.uint8)
    for i in range(n):
        out[i] = (10 * i + 5, 200 - 10 * i, 7 * i)
    return out


def test_geometry_without_labels_matches_formula_and_places_each_cell():
    imgs = _distinct_images(5)
    grid = np.asarray(make_labelled_grid(imgs, nrow=3, padding=2))
    # 2 rows x 3 columns; cell 8x6, padding 2 around every cell.
    assert grid.shape == (2 * (8 + 2) + 2, 3 * (6 + 2) + 2, 3)
    for i in range(5):
        r, c = divmod(i, 3)
        y, x = 2 + r * 10, 2 + c * 8
        assert (grid[y : y + 8, x : x + 6] == imgs[i]).all(), i
    # The missing sixth cell and the padding are background.
    assert (grid[12:20, 18:24] == 255).all()
    assert (grid[0:2] == 255).all()


def test_single_image_is_padded_like_the_rest():
    grid = make_labelled_grid(_distinct_images(1), nrow=4, padding=3)
    assert grid.size == (6 + 6, 8 + 6)  # PIL size is (width, height)


def test_geometry_with_labels_and_upscale():
    imgs = _distinct_images(6)
    grid = make_labelled_grid(
        imgs,
        nrow=3,
        row_labels=["a red circle", "two blue squares"],
        col_labels=["real", "1 step", "2 steps"],
        padding=2,
        upscale=4,
        row_label_width=120,
        col_label_height=30,
    )
    h, w = 8 * 4, 6 * 4
    assert grid.size == (120 + 3 * (w + 2) + 2, 30 + 2 * (h + 2) + 2)
    arr = np.asarray(grid)
    # Cell (1, 2) sits right of the label margin and below the header, magnified by nearest neighbour.
    y, x = 30 + 2 + (h + 2), 120 + 2 + 2 * (w + 2)
    assert (arr[y : y + h, x : x + w] == imgs[5].repeat(4, axis=0).repeat(4, axis=1)).all()
    # Labels put dark ink into both margins; without labels the margins would not exist.
    assert arr[30:, :120].min() < 128
    assert arr[:30, 120:].min() < 128


def test_float_tensor_input_uses_the_shared_conversion():
    x = torch.linspace(-1, 1, 2 * 3 * 4 * 4).reshape(2, 3, 4, 4)
    grid = np.asarray(make_labelled_grid(x, nrow=2, padding=0))
    expected = to_uint8(x)
    assert (grid[:, :4] == expected[0]).all() and (grid[:, 4:] == expected[1]).all()


def test_grayscale_array_is_expanded_to_rgb():
    g = np.full((1, 4, 4, 1), 42, np.uint8)
    grid = np.asarray(make_labelled_grid(g, nrow=1, padding=0))
    assert grid.shape == (4, 4, 3) and (grid == 42).all()


def test_save_grid_writes_png_with_the_same_pixels(tmp_path):
    imgs = _distinct_images(4)
    path = save_grid(imgs, tmp_path / "sub" / "grid.png", nrow=2, row_labels=["x", "y"], col_labels=["1", "2"])
    assert path.exists()
    on_disk = np.asarray(Image.open(path).convert("RGB"))
    in_memory = np.asarray(make_labelled_grid(imgs, nrow=2, row_labels=["x", "y"], col_labels=["1", "2"]))
    assert (on_disk == in_memory).all()


def test_fit_text_wraps_within_width_and_truncates_with_ellipsis():
    font = _font(12)
    text = "a small red circle to the left of a big green triangle above two tiny blue squares"
    lines = fit_text(text, max_width=80, max_lines=2)
    assert len(lines) == 2
    assert all(font.getlength(line) <= 80 for line in lines)
    assert lines[-1].endswith(ELLIPSIS)
    # Enough room: the full text comes back, words intact and in order.
    full = fit_text(text, max_width=80, max_lines=50)
    assert " ".join(full) == text
    assert fit_text("anything", 80, 0) == []


def test_fit_text_breaks_a_word_longer_than_the_line():
    lines = fit_text("x" * 200, max_width=40, max_lines=100)
    assert "".join(lines) == "x" * 200
    assert all(_font(12).getlength(line) <= 40 for line in lines)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(row_labels=["only one"]), ValueError, "row_labels has 1 entries but the grid has 2 rows"),
        (dict(col_labels=["a"]), ValueError, "col_labels has 1 entries but the grid has 2 columns"),
        (dict(nrow=0), ValueError, "nrow must be >= 1, got 0"),
    ],
)
def test_bad_labels_and_nrow_raise_clear_errors(kwargs, error, message):
    args = dict(nrow=2)
    args.update(kwargs)
    with pytest.raises(error, match=message):
        make_labelled_grid(_distinct_images(4), **args)


def test_wrong_dtypes_raise():
    with pytest.raises(TypeError, match="numpy images must be uint8"):
        make_labelled_grid(np.zeros((1, 4, 4, 3), np.float32), nrow=1)
    with pytest.raises(TypeError, match="tensors must be float"):
        make_labelled_grid(torch.zeros(1, 3, 4, 4, dtype=torch.uint8), nrow=1)
    with pytest.raises(ValueError, match="zero images"):
        make_labelled_grid(np.zeros((0, 4, 4, 3), np.uint8), nrow=1)
