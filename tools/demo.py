"""`make demo`: the offline default end to end on a CPU, with the time each stage took.

Stages (each is a plain `emf` command, echoed so you can rerun any of them by hand):
  1. shards    shapes-world WebDataset shards: train, val (new scenes) and heldout (unseen colour-shape pairs)
  2. features  text features for every caption (all-MiniLM-L6-v2 by default), computed once into a feature cache
  3. fit       MeanFlow training with configs/minilm_shapes.yaml (the offline default)
  4. evaluate  ShapesEval (and the sample grid) at 1, 2 and 4 steps on val and on heldout, with the training
               grammar's prompts and with the same scenes prompted in unseen wordings (shapes.wordings)
Then a summary: stage times, ShapesEval per category, where the grids and JSON are.

Usage: python tools/demo.py [--out runs/demo] [--train-n 3000] [--max-steps N] [--seed S] [--fresh]
       [--config configs/x.yaml] [--set model.optim.lr=0.002 ...] [--n-captions K] [--reworded-captions K]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from emf_lightning.utils.progress import progress

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "minilm_shapes.yaml"
# Single objects with a prompted colour, shape and size: the category the demo's target is set on (1-step
# colour accuracy). Its heldout split asks for colour-shape pairs never seen in training (e.g. a red
# triangle). `emf shards shapes --mix ...` makes the other GenEval-like categories.
MIX = "colors=1"
# The stages, in order, as the progress bar names them.
STAGES = ("shards", "features", "fit", "evaluate (val)", "evaluate (heldout)", "diagnose")


def emf(*args: str) -> list[str]:
    exe = Path(sys.executable).with_name("emf")
    return [str(exe) if exe.exists() else "emf", *args]


def run(cmd: list[str], log: Path) -> None:
    """Run one stage command, echo it, tee its output to the log, fail loudly with the log's tail."""
    print("$ " + shlex.join(cmd), flush=True)
    with open(log, "a") as out:
        out.write("$ " + shlex.join(cmd) + "\n")
        out.flush()
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    if proc.returncode != 0:
        tail = log.read_text().splitlines()[-40:]
        sys.exit(f"demo: stage failed (exit {proc.returncode}); last lines of {log}:\n" + "\n".join(tail))


def newest(pattern: str, root: Path) -> Path | None:
    found = sorted(root.glob(pattern), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo", help="everything the demo writes goes here")
    p.add_argument("--train-n", type=int, default=3000, help="training scenes")
    p.add_argument("--eval-n", type=int, default=256, help="val and heldout scenes each")
    p.add_argument("--max-steps", type=int, default=None, help="override the config's max_steps")
    p.add_argument("--fresh", action="store_true", help="delete --out first (shards and features are reused otherwise)")
    p.add_argument("--config", default=str(CONFIG), help="the training config (default: the offline default)")
    p.add_argument(
        "--seed",
        type=int,
        default=None,
        help="training seed (model, data order, time draws); the shards stay those of seed 0",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an extra `emf fit` override, e.g. model.optim.lr=0.002 (repeatable)",
    )
    p.add_argument("--n-captions", type=int, default=None, help="paraphrases per training scene (shards)")
    p.add_argument(
        "--reworded-captions",
        type=int,
        default=None,
        help="dev-family rewordings per training scene (shards); the final test's are never used",
    )
    p.add_argument("--wordings", default="all", help="unseen-wording evaluation: all, dev, final or none")
    args = p.parse_args(argv)

    out = (ROOT / args.out).resolve()
    if args.fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "demo.log"
    times: dict[str, float] = {}
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    with progress("demo: shards", total=len(STAGES)) as advance:
        results, diagnosis = stages(args, out, log, times, advance)
    summarise(times, results, out, diagnosis)
    return 0


def stages(args: argparse.Namespace, out: Path, log: Path, times: dict[str, float], advance) -> tuple[dict, dict]:
    """Run every stage, timing each into `times` and advancing the stage bar after it."""
    shards, cache, runs = out / "shapes", out / "feature_cache", out / "runs"
    config = Path(args.config).resolve()
    captions = ["--n-captions", str(args.n_captions or 1)]
    if args.reworded_captions:
        captions += ["--reworded-captions", str(args.reworded_captions)]

    def done(stage: str) -> None:
        following = STAGES[STAGES.index(stage) + 1] if stage != STAGES[-1] else stage
        advance(1, description=f"demo: {following}")

    # 1. shards (reused when present: they are a pure function of the seed)
    start = time.perf_counter()
    train_manifest = shards / "train.manifest.json"
    if train_manifest.exists():  # reused shards must have been written with the asked-for captions
        source = json.loads(train_manifest.read_text()).get("source", {})
        wanted = {"n_captions": args.n_captions or 1, "reworded_captions": args.reworded_captions or 0}
        found = {k: source.get(k, 0 if k == "reworded_captions" else None) for k in wanted}
        if found != wanted:
            sys.exit(f"demo: {shards} holds training shards written with {found}, not {wanted}: use --fresh or --out")
    for split, n in (("train", args.train_n), ("val", args.eval_n), ("heldout", args.eval_n)):
        if not (shards / f"{split}.manifest.json").exists():
            run(
                emf(
                    "shards",
                    "shapes",
                    "--out",
                    str(shards / f"{split}-%06d.tar"),
                    "--split",
                    split,
                    "--n",
                    str(n),
                    "--mix",
                    MIX,
                    *(captions if split == "train" else ["--n-captions", "1"]),
                    "--seed",
                    "0",
                ),
                log,
            )
    times["shards"] = time.perf_counter() - start
    done("shards")
    train, val, heldout = (str(shards / f"{s}-*.tar") for s in ("train", "val", "heldout"))

    # 2. text features, once per caption (an LLM such as SmolLM2 converts its GGUF on first use); paraphrases when
    #    training samples them
    start = time.perf_counter()
    only_primary = (args.n_captions or 1) == 1 and not args.reworded_captions
    run(
        emf(
            "cache-features",
            "--encoder",
            str(config),
            "--shards",
            f"{train}::{val}::{heldout}",
            "--root",
            str(cache),
            *(["--no-paraphrases"] if only_primary else []),
        ),
        log,
    )
    times["features"] = time.perf_counter() - start
    done("features")

    # 3. training
    start = time.perf_counter()
    overrides = [
        f"--data.train_shards={train}",
        f"--data.val_shards={val}",
        f"--model.feature_cache_dir={cache}",
        f"--trainer.default_root_dir={runs}",
        f"--trainer.logger.init_args.save_dir={runs}",
    ]
    if args.max_steps:
        overrides.append(f"--trainer.max_steps={args.max_steps}")
    if args.seed is not None:
        overrides += [f"--seed_everything={args.seed}", f"--model.seed={args.seed}", f"--data.seed={args.seed}"]
    overrides += [f"--{kv}" for kv in args.set]
    run(emf("fit", "--config", str(config), *overrides), log)
    times["fit"] = time.perf_counter() - start
    ckpt = newest("**/last.ckpt", runs)
    if ckpt is None:
        sys.exit(f"demo: no last.ckpt under {runs}; see {log}")
    done("fit")

    # 4. evaluation on both held-out sets, from the checkpoint (config: the training one + an evaluation-only
    #    callback list written here, so each set gets its own output folder)
    results = {}
    for name, shard in (("val", val), ("heldout", heldout)):
        start = time.perf_counter()
        eval_dir = out / f"eval_{name}"
        eval_config = out / f"eval_{name}.yaml"
        eval_config.write_text(
            json.dumps(
                {
                    "trainer": {
                        "logger": False,
                        "callbacks": [
                            {
                                "class_path": "emf_lightning.callbacks.evaluation.EvaluationCallback",
                                "init_args": {
                                    "num_samples": args.eval_n,
                                    "batch_size": 128,
                                    "fid": False,
                                    "clip_score": False,
                                    "shapes_eval": True,
                                    "grid_prompts": 12,
                                    "wordings": None if args.wordings == "none" else args.wordings,
                                    "output_dir": str(eval_dir),
                                },
                            }
                        ],
                    }
                }
            )
        )
        run(
            emf(
                "validate",
                "--config",
                str(config),
                "--config",
                str(eval_config),
                "--ckpt",
                str(ckpt),
                f"--data.val_shards={shard}",
                f"--model.feature_cache_dir={cache}",
                "--trainer.limit_val_batches=1",
                f"--trainer.default_root_dir={eval_dir}",
            ),
            log,
        )  # LightningCLI saves its config.yaml there
        times[f"evaluate ({name})"] = time.perf_counter() - start
        results[name] = json.loads(newest("metrics-*.json", eval_dir).read_text())
        done(f"evaluate ({name})")

    start = time.perf_counter()
    diagnosis = {name: diagnose(ckpt, shard, args.eval_n) for name, shard in (("val", val), ("heldout", heldout))}
    times["diagnose"] = time.perf_counter() - start
    done("diagnose")
    return results, diagnosis


def diagnose(ckpt: Path, shards: str, n: int) -> dict:
    """Why 1-step samples fail ShapesEval's colour category: colour alone vs shape, extra blobs, nothing.

    ShapesEval passes a sample only when the prompted object is found with the right colour AND shape and
    nothing else is there; this splits the failures so a miss can be explained."""
    import glob
    from collections import Counter
    from itertools import islice

    import numpy as np
    import webdataset as wds

    from emf_lightning.evaluation import Evaluator, HeldOutSet, setting_label
    from emf_lightning.shapes import ShapesEval, scene_spec_or_none
    from emf_lightning.training import EMFModule

    samples = list(islice(wds.WebDataset(sorted(glob.glob(shards)), shardshuffle=False).decode("rgb8"), n))
    specs = [scene_spec_or_none(s["json"]) for s in samples]
    held = HeldOutSet(
        np.stack([s["png"] for s in samples]), [s["txt"] for s in samples], specs, [s["__key__"] for s in samples]
    )
    module = EMFModule.load_from_checkpoint(str(ckpt), map_location="cpu").eval()
    # The evaluation stage's sampler, batches and seeds: these are the table's 1-step samples.
    evaluator = Evaluator(steps=(1,), batch_size=128, fid=False, clip_score=False, shapes_eval=False, keep_images=None)
    images = evaluator.evaluate(module, held).images[setting_label(1, 1.0)]
    details = ShapesEval().evaluate_detailed(images, specs)
    colour_right = 0
    reasons: Counter = Counter()
    for spec, d in zip(specs, details):
        want = spec["objects"][0]["color"]
        colours = [det["color"] for det in d["detections"]]
        colour_right += int(want in colours)
        if d["passed"]:
            reasons["passed"] += 1
        elif not colours:
            reasons["nothing detected"] += 1
        elif "objects detected" in d["reason"]:
            reasons["extra objects"] += 1
        else:
            reasons["wrong shape or colour"] += 1
    return {"n": n, "colour_present": colour_right / n, "reasons": dict(reasons.most_common(6))}


def summarise(times: dict[str, float], results: dict[str, dict], out: Path, diagnosis: dict[str, dict]) -> None:
    """Stage times, then ShapesEval per category and step count for each held-out set."""
    from rich.console import Console
    from rich.table import Table

    console = Console(width=120)
    table = Table(title="demo stages")
    table.add_column("stage")
    table.add_column("seconds", justify="right")
    for stage, seconds in times.items():
        table.add_row(stage, f"{seconds:.0f}")
    table.add_row("total", f"{sum(times.values()):.0f}")
    console.print(table)
    summary = {"seconds": times}
    for name, payload in results.items():
        rows = [(f"{s['steps']} step{'s' if s['steps'] > 1 else ''}", s["metrics"]) for s in payload["settings"]]
        rows.append(("real images", payload.get("real", {})))
        # The grammar's categories, then the unseen wordings: dev (may guide tuning) and final (the test).
        cats = [k for k in rows[0][1] if k.startswith("shapes_") and "reworded" not in k]
        cats += [k for k in ("shapes_reworded_dev", "shapes_reworded_final", "shapes_reworded") if k in rows[0][1]][:2]
        t = Table(
            title=f"ShapesEval on {name} prompts ({payload['num_samples']} scenes, step {payload['global_step']})"
        )
        t.add_column("sampler")
        for c in cats:
            t.add_column(c.removeprefix("shapes_"), justify="right")
        for label, metrics in rows:
            t.add_row(label, *[f"{metrics.get(c, float('nan')):.3f}" for c in cats])
        console.print(t)
        summary[name] = payload
    summary["diagnosis_1step"] = diagnosis
    for name, d in diagnosis.items():
        console.print(
            f"1-step {name} samples showing the prompted colour (any shape): {d['colour_present']:.3f}; "
            f"outcomes: {d['reasons']}"
        )
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    console.print(f"grids and metrics: {out}/eval_val, {out}/eval_heldout; summary: {out}/summary.json")


if __name__ == "__main__":
    raise SystemExit(main())
