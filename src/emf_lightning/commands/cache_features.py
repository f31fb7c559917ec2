"""``emf cache-features``: precompute text features for every unique caption of a dataset.

Frozen encoders are the slow part of a CPU training step; this runs the encoder once per unique caption
(the `.txt` caption and every paraphrase in the `.json` "captions" list of WebDataset shards, or the lines
of a captions file) and stores them in the FeatureCache that training reads (`feature_cache_dir`).
Interrupted runs resume: cached captions are skipped and each batch is saved as it is computed.

Examples::

    emf cache-features --encoder llm --shards 'data/shapes/train-{000000..000009}.tar'
    emf cache-features --encoder configs/smollm_shapes.yaml --captions captions.txt --root runs/features
    emf cache-features --encoder t5 --encoder-arg pretrained=false --captions captions.jsonl --dry-run
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from emf_lightning.config_files import encoder_spec_in, key_value_args
from emf_lightning.data.pipeline import captions_from_shards
from emf_lightning.utils.optional import MissingExtraError
from emf_lightning.utils.progress import progress
from emf_lightning.utils.weights import MissingWeightsError, emf_cache_dir

log = logging.getLogger(__name__)


def default_root() -> Path:
    """Default cache root: `emf_cache_dir()/features` (honours EMF_CACHE)."""
    return emf_cache_dir() / "features"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options of ``emf cache-features``."""
    p = argparse.ArgumentParser(
        prog="emf cache-features",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--encoder",
        required=True,
        help="registry name (llm, qwen3, t5, clip, minilm, bow, label), a class path, or a YAML/JSON file with "
        "the encoder's class_path/init_args (top level, under 'encoder', or a training config's model.init_args.encoder)",
    )
    p.add_argument(
        "--encoder-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="constructor argument (YAML value), repeatable; e.g. max_length=64 or pretrained=false",
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--shards", help="WebDataset shards: path, brace pattern, glob or '::'-separated list")
    source.add_argument("--captions", help="text file with one caption per line, or .jsonl with 'caption'/'captions'")
    p.add_argument("--root", default=None, help=f"cache root folder (default {default_root()})")
    p.add_argument("--batch-size", type=int, default=None, help="captions per encoder call (default: the encoder's)")
    p.add_argument("--device", default=None, help="encoder device, e.g. cuda")
    p.add_argument("--dtype", default=None, help="encoder compute dtype: float32, bfloat16, float16")
    p.add_argument("--no-paraphrases", action="store_true", help="shards: cache only the .txt caption")
    p.add_argument("--no-compact", action="store_true", help="keep one part file per batch instead of merging")
    p.add_argument("--dry-run", action="store_true", help="count captions and show the cache folder; encode nothing")
    return p.parse_args(argv)


# -- encoder ---------------------------------------------------------------------------------------
def spec_from_file(path: Path) -> dict[str, Any]:
    """The encoder {class_path, init_args} in a YAML/JSON file (see --encoder), following its ``extends`` chain."""
    spec = encoder_spec_in(path)
    if spec is None:
        raise SystemExit(f"emf cache-features: no encoder class_path in {path} (or the configs it extends)")
    return spec


def build_from_args(args: argparse.Namespace):
    """Build the encoder named or described by --encoder, with --encoder-arg/--device/--dtype on top."""
    from emf_lightning.encoders import build_encoder

    kwargs = key_value_args(args.encoder_arg, "emf cache-features: --encoder-arg", SystemExit)
    for key in ("device", "dtype"):
        if getattr(args, key):
            kwargs[key] = getattr(args, key)
    path = Path(args.encoder)
    if path.suffix.lower() in (".yaml", ".yml", ".json"):
        if not path.is_file():
            raise SystemExit(f"emf cache-features: encoder config {path} not found")
        spec = spec_from_file(path)
        return build_encoder(spec["class_path"], **{**spec["init_args"], **kwargs})
    return build_encoder(args.encoder, **kwargs)


# -- captions --------------------------------------------------------------------------------------
def captions_from_file(path: Path, skipped: Counter) -> Iterator[str]:
    """Captions of a text file (one per line) or a JSONL file ('caption'/'text' and a 'captions' list)."""
    jsonl = path.suffix.lower() == ".jsonl"
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not jsonl:
                if line.strip():
                    yield line.strip()
                else:
                    skipped["blank line"] += 1
                continue
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                skipped["bad JSON line"] += 1
                log.warning("%s:%d: not JSON (%s); skipped", path, number, err)
                continue
            found = (
                [row.get("caption") or row.get("text")] + list(row.get("captions") or [])
                if isinstance(row, dict)
                else []
            )
            found = [c.strip() for c in found if isinstance(c, str) and c.strip()]
            if not found:
                skipped["row without caption"] += 1
            yield from found


# -- main ------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    """Run `emf cache-features`; returns the process exit status."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    skipped: Counter = Counter()
    if args.captions:
        path = Path(args.captions)
        if not path.is_file():
            raise SystemExit(f"emf cache-features: captions file {path} not found")
        found = captions_from_file(path, skipped)
    else:
        found = captions_from_shards(args.shards, skipped, paraphrases=not args.no_paraphrases)
    captions = list(dict.fromkeys(found))  # first-seen order, duplicates dropped
    for reason, n in sorted(skipped.items()):
        print(f"skipped {n}: {reason}")
    if not captions:
        raise SystemExit("emf cache-features: no captions found")

    from emf_lightning.encoders import FeatureCache

    try:
        encoder = build_from_args(args)
    except (MissingWeightsError, MissingExtraError) as err:
        print(f"emf cache-features: {err}", file=sys.stderr)
        return 2
    cache = FeatureCache(encoder, args.root or default_root())
    todo = sum(1 for c in captions if c not in cache)
    print(f"encoder   {encoder.cache_key} (dim {encoder.dim})")
    print(f"cache     {cache.dir}")
    print(f"captions  {len(captions)} unique, {len(captions) - todo} already cached, {todo} to compute")
    if args.dry_run or not todo:
        return 0
    start = time.perf_counter()
    with progress("encoding captions", total=todo) as advance:
        # The bar replaces the every-10-batches log line where it is drawn.
        computed = cache.precompute(
            captions, batch_size=args.batch_size, advance=advance, log_every=0 if advance.drawn else 10
        )
    elapsed = time.perf_counter() - start
    if not args.no_compact:
        cache.compact()
    print(f"computed  {computed} captions in {elapsed:.1f} s ({computed / max(elapsed, 1e-9):.1f} captions/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
