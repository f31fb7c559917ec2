"""``emf shards``: write WebDataset shards, or check existing ones.

Examples::

    emf shards shapes --out shards/train-%06d.tar --split train --n 20000 --resolution 32 --seed 0
    emf shards shapes --out shards --split val --n 512          # -> shards/val-000000.tar ...
    emf shards shapes --out shards/heldout-%06d.tar --split heldout --n 1000 --mix colors=2,position=1
    emf shards folder photos/ --out shards/photos-%06d.tar --image-size 256
    emf shards list captions.jsonl --out shards/list-%06d.tar --image-field path --caption-field text
    emf shards check 'shards/train-{000000..000019}.tar'

Each writer prints the brace URL to pass to ``ShardDataModule`` and writes ``<name>.manifest.json``
next to the shards (counts per shard, source, seed, skipped input). ``--encoder NAME`` also stores
precomputed text features of each primary caption (``<key>.features.npz``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from emf_lightning.data.health import SkipCounter, SkipTally
from emf_lightning.data.shards import ShardSample, WriteResult, attach_features, write_shards
from emf_lightning.data.sources import folder_samples, list_samples
from emf_lightning.shapes import shapes_samples
from emf_lightning.utils.progress import counted, progress


def parse_mix(text: str | None) -> dict[str, float] | None:
    """'colors=2,position=1' (or a JSON object) -> {'colors': 2.0, 'position': 1.0}; None/'' -> None."""
    if not text:
        return None
    text = text.strip()
    if text.startswith("{"):
        return {str(k): float(v) for k, v in json.loads(text).items()}
    mix: dict[str, float] = {}
    for part in text.split(","):
        name, sep, weight = part.partition("=")
        if not sep or not name.strip():
            raise argparse.ArgumentTypeError(f"--mix expects name=weight[,name=weight...], got {text!r}")
        try:
            mix[name.strip()] = float(weight)
        except ValueError as exn:
            raise argparse.ArgumentTypeError(f"--mix weight for {name.strip()!r} is not a number: {weight!r}") from exn
    return mix


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--out",
        required=True,
        help="printf shard pattern (shards/train-%%06d.tar), or a folder: <folder>/<split>-%%06d.tar "
        "for shapes, <folder>/data-%%06d.tar otherwise",
    )
    p.add_argument("--maxcount", type=int, default=1000, help="samples per shard (default 1000)")
    p.add_argument("--maxsize", type=float, default=1e9, help="bytes per shard before starting a new one")
    p.add_argument(
        "--encoder", default=None, help="registry name of a text encoder: store its features of each primary caption"
    )
    p.add_argument("--features-batch-size", type=int, default=64)
    p.add_argument("--features-dtype", choices=("float32", "float16"), default="float32")


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of `emf shards` with subcommands shapes, folder, list, check."""
    parser = argparse.ArgumentParser(
        prog="emf shards", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="source", required=True)

    p = sub.add_parser("shapes", help="the synthetic shapes world (offline, exact ground truth)")
    _common(p)
    p.add_argument("--split", default="train", help="train, val, test or heldout")
    p.add_argument("--n", type=int, required=True, help="number of samples")
    p.add_argument("--start", type=int, default=0, help="first sample index (to extend a set)")
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mix", type=parse_mix, default=None, help="category weights, e.g. colors=2,position=1")
    p.add_argument("--n-captions", type=int, default=4, help="paraphrases per sample stored in the .json")
    p.add_argument(
        "--reworded-captions",
        type=int,
        default=0,
        help="also store this many rewordings of single-object scenes (shapes.wordings' dev families: "
        "prompts as users write them, for training; the final test's families are never used)",
    )

    p = sub.add_parser("folder", help="images with sibling <stem>.txt captions (one caption per line)")
    p.add_argument("root")
    _common(p)
    p.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="resize + centre crop to this side and store PNG (default: keep files as they are)",
    )

    p = sub.add_parser("list", help="a JSONL or CSV file of image paths and captions")
    p.add_argument("path")
    _common(p)
    p.add_argument("--root", default=None, help="folder relative image paths start from (default: the file's)")
    p.add_argument("--image-field", default="image")
    p.add_argument("--caption-field", default="caption")
    p.add_argument("--image-size", type=int, default=None)

    p = sub.add_parser("check", help="read shards as training would and report samples and skipped input")
    p.add_argument("shards", nargs="+", help="brace patterns, globs, paths or URLs")
    p.add_argument("--image-size", type=int, default=32)
    return parser


def _samples(args: argparse.Namespace, counter: SkipCounter) -> tuple[Iterator[ShardSample], dict[str, Any]]:
    if args.source == "shapes":
        from emf_lightning.shapes import ShapesWorld

        world = ShapesWorld(
            seed=args.seed,
            resolution=args.resolution,
            split=args.split,
            mix=args.mix,
            size=args.start + args.n,
            n_captions=args.n_captions,
            reworded_captions=args.reworded_captions,
        )
        source = {
            "kind": "shapes",
            "split": args.split,
            "n": args.n,
            "start": args.start,
            "resolution": args.resolution,
            "seed": args.seed,
            "mix": args.mix,
            "n_captions": args.n_captions,
            "reworded_captions": args.reworded_captions,
        }
        return shapes_samples(world, n=args.n, start=args.start), source
    if args.source == "folder":
        return (
            folder_samples(args.root, counter, image_size=args.image_size),
            {"kind": "folder", "root": str(args.root), "image_size": args.image_size},
        )
    return (
        list_samples(
            args.path,
            counter,
            root=args.root,
            image_field=args.image_field,
            caption_field=args.caption_field,
            image_size=args.image_size,
        ),
        {
            "kind": "list",
            "path": str(args.path),
            "root": args.root,
            "image_field": args.image_field,
            "caption_field": args.caption_field,
            "image_size": args.image_size,
        },
    )


def output_pattern(args: argparse.Namespace) -> str:
    """--out as a printf pattern: kept if it has an integer field (%06d), else taken as a folder."""
    if "%" in args.out:
        return args.out
    name = args.split if args.source == "shapes" else "data"
    return str(Path(args.out) / f"{name}-%06d.tar")


def write(args: argparse.Namespace) -> WriteResult:
    """Run one writer subcommand; returns what was written."""
    counter = SkipCounter(f"emf shards {args.source}")
    totals: dict[str, int] = {}

    def skipped() -> dict[str, int]:
        for reason, n in counter.drain().items():
            totals[reason] = totals.get(reason, 0) + n
        return totals

    samples, source = _samples(args, counter)
    features = None
    if args.encoder:
        from emf_lightning.encoders import build_encoder

        encoder = build_encoder(args.encoder)
        samples = attach_features(
            samples, encoder.encode, batch_size=args.features_batch_size, dtype=args.features_dtype
        )
        features = {
            "encoder": args.encoder,
            "cache_key": encoder.cache_key,
            "dim": encoder.dim,
            "dtype": args.features_dtype,
            "caption": "primary",
        }
    total = args.n if args.source == "shapes" else None  # folders and lists are not counted up front
    with progress(f"writing {args.source} shards", total=total) as advance:
        return write_shards(
            counted(samples, advance),
            output_pattern(args),
            maxcount=args.maxcount,
            maxsize=args.maxsize,
            source=source,
            skipped=skipped,
            features=features,
        )


def check(args: argparse.Namespace) -> SkipTally:
    """Read every shard once (one process) and tally delivered samples and skips."""
    from emf_lightning.data.pipeline import DecodeOptions, ShardStream, expand_shard_urls

    stream = ShardStream(
        expand_shard_urls(args.shards), batch_size=256, train=False, options=DecodeOptions(image_size=args.image_size)
    )
    tally = SkipTally()
    with progress("checking shards (samples)") as advance:
        for batch in stream:
            tally.add(batch["skipped"], len(batch["key"]))
            advance(len(batch["key"]))
    return tally


def main(argv: list[str] | None = None) -> int:
    """Entry point of `emf shards`; returns the process exit code."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    args = build_parser().parse_args(argv)
    try:
        if args.source == "check":
            tally = check(args)
            print(tally.summary("check"))
            return 1 if tally.counts else 0
        result = write(args)
    except (ValueError, FileNotFoundError) as exn:
        print(f"emf shards: error: {exn}", file=sys.stderr)
        return 2
    skipped = ", ".join(f"{k}={v}" for k, v in sorted(result.skipped.items())) or "none"
    print(f"wrote {result.total} samples in {len(result.shards)} shard(s); skipped: {skipped}")
    print(result.urls)
    return 0


if __name__ == "__main__":
    sys.exit(main())
