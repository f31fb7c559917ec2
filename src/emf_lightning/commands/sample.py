"""``emf sample``: a grid of prompts (rows) x sampling step counts (columns) from a checkpoint.

Example::

    emf sample --ckpt runs/smollm_shapes/last.ckpt --prompt "a red circle" --prompt "two blue squares" \\
        --steps 1 2 4 --cfg 1.0 --seed 0 --out grid.png
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from emf_lightning.errors import ConfigError


def finite_float(text: str) -> float:
    """argparse type: a float that is not NaN or infinite (``--cfg nan`` would write black images)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """Arguments of ``emf sample``."""
    p = argparse.ArgumentParser(
        prog="emf sample", description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--ckpt", required=True, help="checkpoint written by `emf fit`")
    p.add_argument(
        "--prompt",
        action="append",
        default=[],
        help="a caption (repeat for several rows); an empty string is the unconditional (null) prompt",
    )
    p.add_argument("--prompts-file", default=None, help="a text file with one prompt per line (added to --prompt)")
    p.add_argument("--steps", type=int, nargs="+", default=[1], help="sampling step counts (one column each)")
    p.add_argument("--cfg", type=finite_float, default=1.0, help="classifier-free guidance scale (1 = none)")
    p.add_argument("--seed", type=int, default=0, help="noise seed; the same seed gives the same images")
    p.add_argument("--out", default="grid.png", help="PNG file to write")
    p.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda', 'cuda:1', ...")
    p.add_argument("--no-ema", action="store_true", help="sample with the raw weights instead of the EMA")
    p.add_argument("--upscale", type=int, default=4, help="nearest-neighbour magnification of each cell")
    return p


def read_prompts(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[str]:
    """--prompt values then the lines of --prompts-file; an empty result is a usage error."""
    prompts = list(args.prompt)
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            parser.error(f"--prompts-file not found: {path}")
        prompts += [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        parser.error('no prompts given: pass at least one --prompt "..." (or a non-empty --prompts-file)')
    return prompts


def resolve_device(name: str) -> torch.device:
    """'auto' picks CUDA when present; a device this machine does not have is a ConfigError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ConfigError(f"--device {name!r} is not a device ({err}); use auto, cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return device
    backend = torch.backends.mps if device.type == "mps" else getattr(torch, device.type, None)
    if backend is not None and hasattr(backend, "is_available") and not backend.is_available():
        raise ConfigError(
            f"--device {name}: this machine has no {device.type} device "
            f"(torch.{device.type}.is_available() is False); use --device cpu or --device auto"
        )
    count = getattr(backend, "device_count", None)
    if device.index is not None and callable(count) and device.index >= count():
        raise ConfigError(
            f"--device {name}: this machine has {count()} {device.type} device(s), "
            f"{device.type}:0 to {device.type}:{count() - 1}"
        )
    return device


@torch.no_grad()
def sample_grid(
    module, prompts: list[str], steps: Sequence[int], cfg: float, seed: int, use_ema: bool = True
) -> torch.Tensor:
    """Images [P * S, C, H, W] in row-major order: row = prompt, column = step count."""
    columns = [module.generate(prompts, steps=s, cfg_scale=cfg, seed=seed, use_ema=use_ema) for s in steps]
    grid = torch.stack(columns, dim=1)  # [P, S, C, H, W]
    return grid.flatten(0, 1)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``emf sample``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    prompts = read_prompts(args, parser)
    if any(s < 1 for s in args.steps):
        parser.error(f"--steps must be >= 1, got {args.steps}")
    device = resolve_device(args.device)

    from emf_lightning.checkpoint_config import read_checkpoint
    from emf_lightning.training import EMFModule
    from emf_lightning.utils.grids import save_grid

    read_checkpoint(args.ckpt)  # refuse a missing, unreadable or foreign file before building anything
    module = EMFModule.load_from_checkpoint(args.ckpt, map_location=device)
    module.eval()
    images = sample_grid(module, prompts, args.steps, args.cfg, args.seed, use_ema=not args.no_ema)
    col_labels = [f"{s} step" + ("s" if s != 1 else "") for s in args.steps]
    row_labels = [p if p else "(unconditional)" for p in prompts]
    path = save_grid(
        images.cpu(), args.out, nrow=len(args.steps), row_labels=row_labels, col_labels=col_labels, upscale=args.upscale
    )
    print(f"wrote {path} ({len(prompts)} prompts x steps {args.steps}, cfg {args.cfg}, seed {args.seed})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
