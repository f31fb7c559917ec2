"""``emf cache-latents``: encode every image of WebDataset shards once with an autoencoder, into new shards.

Each input shard i becomes output shard ``--out % i`` holding every original member of every kept sample plus
``<key>.latent.npy`` (float16 [C, h, w], the scaled latent `ShardDataModule(load_latents=True)` reads) and, with
``--flip``, ``<key>.latent_flip.npy`` (the latent of the horizontally flipped image). Images are decoded, resized
and centre-cropped exactly as the data module does (`data/pipeline.decode_sample`), so a sample the training loader
would skip (undecodable image, no caption, bad JSON, damaged shard) is skipped here, counted and summarised.

Resumable: the manifest next to the output (``<out stem>.manifest.json``) lists every finished shard and is
rewritten after each one; a rerun skips those (except shards that could not be opened: they are tried again).
Shards are written to a temporary name and renamed when complete.

Examples::

    emf cache-latents --vae dc-ae-f32 --shards 'data/train-{000000..000099}.tar' \\
        --out 'data/latents/train-%06d.tar' --image-size 1024 --flip
    emf cache-latents --vae sd-vae --shards 'data/val-*.tar' --out 'data/sd/val-%06d.tar' --image-size 256
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import random
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from emf_lightning.config_files import key_value_args
from emf_lightning.data.health import UNREADABLE_SHARD
from emf_lightning.errors import ConfigError

LATENT_MEMBERS = ("latent.npy", "latent.pth", "latent_flip.npy")  # replaced: they belong to another autoencoder


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options of ``emf cache-latents``."""
    p = argparse.ArgumentParser(
        prog="emf cache-latents",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--vae",
        required=True,
        help="autoencoder: none, sd-vae, flux-vae, dc-ae-f32, a local folder, a "
        "cached HF id or a class path (emf_lightning.autoencoders.build_autoencoder)",
    )
    p.add_argument(
        "--vae-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="autoencoder constructor argument (YAML value), repeatable; e.g. pretrained=false",
    )
    p.add_argument("--shards", required=True, help="input WebDataset shards: path, brace pattern, glob or '::' list")
    p.add_argument(
        "--out",
        required=True,
        help="output shard pattern with an integer field, e.g. out/train-%%06d.tar (output i holds input shard i)",
    )
    p.add_argument("--image-size", type=int, default=256, help="resize the shorter side and centre-crop to this")
    p.add_argument("--flip", action="store_true", help="also store the latent of the horizontally flipped image")
    p.add_argument("--batch-size", type=int, default=16, help="images per autoencoder call")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    p.add_argument("--dtype", default=None, help="autoencoder compute dtype: float32 (default), bfloat16, float16")
    return p.parse_args(argv)


def npy_bytes(array: torch.Tensor) -> bytes:
    """A tensor as float16 .npy bytes (no pickle)."""
    buf = io.BytesIO()
    np.save(buf, array.detach().cpu().to(torch.float16).numpy(), allow_pickle=False)
    return buf.getvalue()


def latent_settings(ae: Any, image_size: int, flip: bool) -> dict[str, Any]:
    """What the cached latents depend on; a rerun into the same output must match it."""
    return {
        "autoencoder": ae.spec,
        "cache_key": ae.cache_key,
        "image_size": image_size,
        "flip": flip,
        "shape": list(ae.latent_shape(image_size)),
        "dtype": "float16",
    }


# -- one shard -------------------------------------------------------------------------------------
def _kept_samples(url: str, image_size: int, counter: Any) -> Iterator[tuple[dict[str, Any], np.ndarray]]:
    """(raw sample, preprocessed uint8 image) for every sample the data module would keep."""
    from emf_lightning.data.pipeline import DecodeOptions, decode_sample
    from emf_lightning.data.tar_reader import iter_shard_samples

    opts = DecodeOptions(image_size=image_size)
    rng = random.Random(0)  # unused: evaluation decoding draws nothing (first caption, no dropout)
    for raw in iter_shard_samples(url, counter):
        sample = decode_sample(raw, opts, rng, counter, train=False)
        if sample is not None:
            yield raw, sample["image"]


def encode_shard(url: str, out: Path, ae: Any, image_size: int, flip: bool, batch_size: int, counter: Any) -> int:
    """Write `out` from input shard `url` (see the module docstring); returns the number of samples written."""
    import webdataset as wds

    from emf_lightning.utils.images import from_uint8

    tmp = out.with_name(out.name + ".tmp")
    written = 0
    writer = wds.TarWriter(str(tmp), encoder=False, mtime=0, user="emf", group="emf", mode=0o644)

    def flush(pending: list[tuple[dict[str, Any], np.ndarray]]) -> None:
        nonlocal written
        images = from_uint8(np.stack([image for _, image in pending]))
        latents = ae.encode(images)
        flipped = ae.encode(images.flip(-1)) if flip else None
        for j, (raw, _) in enumerate(pending):
            record = {k: v for k, v in raw.items() if not k.startswith("__") and k not in LATENT_MEMBERS}
            record["__key__"] = raw["__key__"]
            record["latent.npy"] = npy_bytes(latents[j])
            if flipped is not None:
                record["latent_flip.npy"] = npy_bytes(flipped[j])
            writer.write(record)
            written += 1

    try:
        pending: list[tuple[dict[str, Any], np.ndarray]] = []
        for item in _kept_samples(url, image_size, counter):
            pending.append(item)
            if len(pending) == batch_size:
                flush(pending)
                pending = []
        if pending:
            flush(pending)
    finally:
        writer.close()
    os.replace(tmp, out)  # the shard appears under its name only when complete
    return written


# -- manifest --------------------------------------------------------------------------------------
def finished_shards(path: Path, settings: dict[str, Any], out_dir: Path) -> dict[str, dict[str, Any]]:
    """{source url: shard entry} of an earlier run into the same output with the same settings."""
    if not path.is_file():
        return {}
    doc = json.loads(path.read_text())
    earlier = doc.get("latent") or {}
    if {k: earlier.get(k) for k in ("cache_key", "image_size", "flip")} != {
        k: settings[k] for k in ("cache_key", "image_size", "flip")
    }:
        raise ConfigError(
            f"{path} records latents made with different settings ({earlier.get('cache_key')}, image size "
            f"{earlier.get('image_size')}, flip {earlier.get('flip')}) than this run ({settings['cache_key']}, "
            f"image size {settings['image_size']}, flip {settings['flip']}); write to another --out or delete "
            "that folder first"
        )
    # a shard that could not be opened (network, failing pipe) is tried again
    return {
        s["source"]: s
        for s in doc.get("shards", [])
        if (out_dir / s["name"]).is_file() and UNREADABLE_SHARD not in (s.get("skipped") or {})
    }


# -- main ------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    """Run `emf cache-latents`; returns the process exit status."""
    from emf_lightning.autoencoders import build_autoencoder
    from emf_lightning.commands.sample import resolve_device
    from emf_lightning.data.health import SHARD_REASONS, SkipCounter
    from emf_lightning.data.pipeline import expand_shard_urls
    from emf_lightning.data.shards import MANIFEST_FORMAT, brace_url, manifest_path, write_manifest
    from emf_lightning.utils.progress import track

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.batch_size < 1 or args.image_size < 1:
        raise ConfigError("--batch-size and --image-size must be >= 1")
    try:
        args.out % 0
    except TypeError:
        raise ConfigError(f"--out {args.out!r} needs an integer field such as %06d") from None
    urls = expand_shard_urls(args.shards)
    outputs = [Path(args.out % i) for i in range(len(urls))]
    if len(set(outputs)) != len(outputs):
        raise ConfigError(f"--out {args.out!r} gives the same name to several shards")
    kwargs = key_value_args(args.vae_arg, "--vae-arg")
    kwargs.setdefault("device", str(resolve_device(args.device)))  # auto: CUDA when present
    if args.dtype:
        kwargs.setdefault("dtype", args.dtype)
    ae = build_autoencoder(args.vae, **kwargs)  # missing weights or a folder that is no VAE: one line, exit 2
    if args.image_size % ae.downsample:
        raise ConfigError(
            f"--image-size {args.image_size} is not divisible by the autoencoder's factor {ae.downsample} "
            f"({ae.cache_key}): use a multiple of {ae.downsample}, e.g. "
            f"{max(ae.downsample, args.image_size // ae.downsample * ae.downsample)}"
        )
    settings = latent_settings(ae, args.image_size, args.flip)
    outputs_pattern = Path(args.out)
    out_dir = outputs_pattern.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    mpath = manifest_path(args.out)
    done = finished_shards(mpath, settings, out_dir)
    print(f"autoencoder  {ae.cache_key} on {ae.device} -> latents {tuple(settings['shape'])} float16")
    print(f"shards       {len(urls)} in, {sum(u in done for u in urls)} already done, writing {args.out}")
    counter, skipped = SkipCounter("cache-latents"), Counter()
    entries: list[dict[str, Any]] = []
    urls_out = str(out_dir / brace_url(outputs_pattern.name, len(urls)))
    doc = {
        "format": MANIFEST_FORMAT,
        "pattern": args.out,
        "urls": urls_out,
        "total": 0,
        "shards": entries,
        "source": {"kind": "cache-latents", "shards": args.shards},
        "skipped": skipped,
        "latent": settings,
        "complete": False,
    }
    encoded = 0
    for url, out in track(list(zip(urls, outputs)), "encoding shards"):
        if url in done and done[url]["name"] == out.name:
            entries.append(done[url])
            skipped.update(done[url].get("skipped") or {})
        else:
            count = encode_shard(url, out, ae, args.image_size, args.flip, args.batch_size, counter)
            here = counter.drain()
            skipped.update(here)
            entries.append({"name": out.name, "source": url, "count": count, "skipped": here})
            encoded += 1
        doc["total"] = sum(e["count"] for e in entries)
        write_manifest(mpath, doc)
    doc["complete"] = True
    write_manifest(mpath, doc)
    print(f"wrote        {encoded} shard(s); {doc['total']} samples with latents in {doc['urls']}")
    for reason, n in sorted(skipped.items()):
        print(f"skipped      {n} {'shards' if reason in SHARD_REASONS else 'samples'}: {reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
