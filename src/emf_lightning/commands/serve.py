"""``emf serve``: a web page that redraws the image as you type, for one checkpoint or export, or two side by side.

Example::

    emf serve --ckpt runs/demo/runs/minilm_shapes/version_0/checkpoints/last.ckpt          # then open the URL
    emf serve --ckpt a.ckpt --export exports/b --port 8000                                    # A/B

It binds to 127.0.0.1 unless ``--host`` says otherwise, and serves the page and its two API routes only.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from emf_lightning.commands.sample import resolve_device

MODEL_NAMES = "ABCD"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="emf serve", description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    # Both flags append to one list so that the order on the command line is the order on the page (A, B).
    p.add_argument(
        "--ckpt", dest="sources", action="append", type=lambda s: ("ckpt", s), help="checkpoint written by `emf fit`"
    )
    p.add_argument(
        "--export", dest="sources", action="append", type=lambda s: ("export", s), help="folder written by `emf export`"
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind; 0.0.0.0 lets other machines in")
    p.add_argument("--port", type=int, default=7860, help="port to listen on (0: any free port)")
    p.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda', 'cuda:1', ...")
    p.add_argument("--no-ema", action="store_true", help="checkpoints: sample with the raw weights, not the EMA")
    p.add_argument("--max-queue", type=int, default=64, help="images waiting beyond this are answered 'busy'")
    p.add_argument("--max-batch", type=int, default=16, help="most requests sampled in one forward")
    p.add_argument("--max-steps", type=int, default=64, help="largest step count a request may ask for")
    p.add_argument("--max-prompt-chars", type=int, default=1000, help="longest prompt accepted")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--verbose", action="store_true", help="log every HTTP request")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``emf serve``: load the models, print the URL, serve until Ctrl-C."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.sources:
        parser.error("give a model: --ckpt PATH or --export DIR (twice, in any mix, for an A/B comparison)")
    if len(args.sources) > len(MODEL_NAMES):
        parser.error(f"at most {len(MODEL_NAMES)} models side by side, got {len(args.sources)}")
    for name in ("max_queue", "max_batch", "max_steps", "max_prompt_chars"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    device = resolve_device(args.device)

    import torch

    from emf_lightning.serve import Limits, ServeApp, load_served_model, make_server

    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="emf serve: %(message)s")
    models = [
        load_served_model(kind, path, name, device, use_ema=not args.no_ema)
        for name, (kind, path) in zip(MODEL_NAMES, args.sources)
    ]
    limits = Limits(max_prompt_chars=args.max_prompt_chars, max_steps=args.max_steps)
    app = ServeApp(models, limits, max_queue=args.max_queue, max_batch=args.max_batch)
    warm_up(app)
    server = make_server(app, args.host, args.port)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"emf serve: listening on {args.host}: anyone who can reach this machine can use it", file=sys.stderr)
    for model in models:
        print(f"{model.name}: {model.source} ({model.objective}, steps {list(model.default_steps)}, {model.device})")
    print(f"serving {server.url}  (Ctrl-C stops)", flush=True)
    app.start()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        app.stop()
    return 0


def warm_up(app) -> None:
    """One sample per model before the port opens: the first user should not pay for lazy initialisation."""
    for model in app.models.values():
        model.sample(["warm up"], [0], 1, 1.0)


if __name__ == "__main__":
    sys.exit(main())
