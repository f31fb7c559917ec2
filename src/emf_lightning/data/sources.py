"""Where shard samples come from besides the shapes world (`shapes.shapes_samples`): a folder of captioned
images, a JSONL/CSV list.

Each source is a generator of `ShardSample`. Bad input (an image that does not decode, a missing or
empty caption, a malformed line) is skipped and counted in a `SkipCounter`, never fatal.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from emf_lightning.data.health import EMPTY_CAPTION, MISSING_IMAGE, UNDECODABLE_CAPTION, UNDECODABLE_IMAGE, SkipCounter
from emf_lightning.data.shards import ShardSample, normalize_image_ext, sanitize_key
from emf_lightning.data.transforms import IMAGE_EXTENSIONS, encode_png, open_rgb, resize_center_crop

BAD_ROW = "bad_row"  # a JSONL/CSV row that does not parse or lacks the image/caption field
_STORED_AS_IS = ("png", "jpg", "webp")  # formats every reader decodes; others are re-encoded to PNG


def load_image(path: Path, image_size: int | None) -> tuple[bytes, str]:
    """Read and check an image file. Returns (bytes, extension) to store.

    The file is decoded fully, so a damaged image raises here (the caller skips it). Without
    `image_size`, PNG/JPEG/WebP bytes are kept as they are; with it, the image is resized, centre
    cropped and stored as PNG.
    """
    data = path.read_bytes()
    image = open_rgb(data)
    ext = normalize_image_ext(path.suffix)
    if image_size is not None:
        return encode_png(resize_center_crop(image, image_size)), "png"
    if ext in _STORED_AS_IS:
        return data, ext
    return encode_png(image), "png"


def _captions_from_text(text: str) -> list[str]:
    """One caption per non-empty line; the first is the primary caption."""
    return [line.strip() for line in text.splitlines() if line.strip()]


def _sample_from_file(
    path: Path,
    key: str,
    captions: list[str],
    image_size: int | None,
    counter: SkipCounter,
    meta: dict[str, Any] | None = None,
) -> ShardSample | None:
    if not captions:
        counter.skip(EMPTY_CAPTION, f"{path}: no caption")
        return None
    if not path.is_file():
        counter.skip(MISSING_IMAGE, f"{path}: no such file")
        return None
    try:
        image, ext = load_image(path, image_size)
    except Exception as exn:  # Pillow raises many types for damaged/unsupported files
        counter.skip(UNDECODABLE_IMAGE, f"{path}: {type(exn).__name__}: {exn}")
        return None
    return ShardSample(
        key=key,
        image=image,
        image_format=ext,
        caption=captions[0],
        captions=captions if len(captions) > 1 else None,
        meta=meta or None,
    )


def folder_samples(root: str | Path, counter: SkipCounter, image_size: int | None = None) -> Iterator[ShardSample]:
    """Every image under `root` (recursively, sorted) with its sibling caption file `<stem>.txt`.

    The caption file holds one caption per line: the first line is the primary caption, the others
    paraphrases. The key is the image's relative path without extension.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {str(root)!r} does not exist")
    images = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS)
    if not images:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {str(root)!r}")
    for path in images:
        txt = path.with_suffix(".txt")
        try:
            captions = _captions_from_text(txt.read_text(encoding="utf-8")) if txt.is_file() else []
        except UnicodeDecodeError as exn:  # not U+FFFD text in the shards: skip it, counted
            counter.skip(UNDECODABLE_CAPTION, f"{txt}: not UTF-8: {exn}")
            continue
        key = sanitize_key(str(path.relative_to(root).with_suffix("")))
        sample = _sample_from_file(path, key, captions, image_size, counter)
        if sample is not None:
            yield sample


def _read_rows(path: Path, counter: SkipCounter) -> Iterator[tuple[int, dict[str, Any]]]:
    """(row number, row) from a .jsonl/.json-lines or .csv/.tsv file; malformed rows are counted."""
    suffix = path.suffix.lower()
    with path.open(encoding="utf-8", newline="") as f:
        if suffix in (".csv", ".tsv"):
            reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
            for i, row in enumerate(reader, start=1):
                yield i, dict(row)
        elif suffix in (".jsonl", ".ndjson", ".json"):
            for i, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exn:
                    counter.skip(BAD_ROW, f"{path}:{i}: {exn}")
                    continue
                if not isinstance(row, dict):
                    counter.skip(BAD_ROW, f"{path}:{i}: expected a JSON object, got {type(row).__name__}")
                    continue
                yield i, row
        else:
            raise ValueError(f"unsupported list file {str(path)!r}: use .jsonl, .ndjson, .csv or .tsv")


def list_samples(
    path: str | Path,
    counter: SkipCounter,
    root: str | Path | None = None,
    image_field: str = "image",
    caption_field: str = "caption",
    image_size: int | None = None,
) -> Iterator[ShardSample]:
    """Rows of a JSONL or CSV file naming an image path and its caption(s).

    The caption field holds one caption, or (JSONL) a list of captions, primary first. A row's "key"
    or "id" field names the sample (otherwise the row number). Relative image paths are resolved
    against `root` (default: the list file's folder). Other fields are kept in the sample's .json.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"list file {str(path)!r} does not exist")
    base = Path(root) if root is not None else path.parent
    for i, row in _read_rows(path, counter):
        if image_field not in row or not row[image_field]:
            counter.skip(BAD_ROW, f"{path}:{i}: no '{image_field}' field")
            continue
        raw = row.get(caption_field)
        if isinstance(raw, list):
            captions = [str(c).strip() for c in raw if str(c).strip()]
        else:
            captions = _captions_from_text(str(raw)) if raw is not None else []
        image_path = Path(str(row[image_field]))
        if not image_path.is_absolute():
            image_path = base / image_path
        key_src = row.get("key", row.get("id"))
        key = sanitize_key(str(key_src)) if key_src not in (None, "") else f"{i:09d}"
        meta = {k: v for k, v in row.items() if k not in (image_field, caption_field, "key", "id")}
        sample = _sample_from_file(image_path, key, captions, image_size, counter, meta)
        if sample is not None:
            yield sample
