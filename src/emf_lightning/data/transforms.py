"""Image preprocessing shared by the shard writers and the datamodule: decode, resize, centre crop, encode."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

# Formats read from image folders and lists; shards store png/jpg/webp as-is and re-encode the rest to PNG.
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp", "bmp", "ppm", "tif", "tiff", "gif")


def resize_center_crop(image: Image.Image, size: int) -> Image.Image:
    """Scale so the shorter side is `size` (bicubic, antialiased), then crop the centre `size` x `size`.

    An image that is already `size` x `size` is returned unchanged, pixel for pixel.
    """
    if size <= 0:
        raise ValueError(f"image size must be positive, got {size}")
    w, h = image.size
    if (w, h) != (size, size):
        scale = size / min(w, h)
        new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
        # reducing_gap: large downscales first shrink by an integer factor (fast, still antialiased)
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC, reducing_gap=3.0)
        left, top = (new_w - size) // 2, (new_h - size) // 2
        image = image.crop((left, top, left + size, top + size))
    return image


def open_rgb(data: bytes) -> Image.Image:
    """Decode encoded image bytes (any format Pillow reads) to a fully loaded RGB image."""
    image = Image.open(io.BytesIO(data))
    image.load()  # decode now, so a truncated file fails here and not later
    if image.mode != "RGB":
        # palette/greyscale/alpha -> RGB; alpha is composited on white, the usual choice for captions data
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            image = Image.alpha_composite(background, rgba).convert("RGB")
        else:
            image = image.convert("RGB")
    return image


def encode_png(image: np.ndarray | Image.Image) -> bytes:
    """uint8 [H, W, 3] array or PIL image -> PNG bytes (lossless; deterministic for the same pixels)."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected a uint8 [H, W, 3] image array, got {image.dtype} {image.shape}")
        image = Image.fromarray(image)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()
