"""`make demo` / `make demo-compose`: the offline default end to end on a CPU, with the time each stage took.

Two tasks. `--task single` (`make demo`): single objects with a prompted colour, shape and size. `--task compose`
(`make demo-compose`): whole scenes, the six GenEval-like categories of the shapes world (single object, two
objects, counting, colours, position, colour attribution), on configs/compose_layout.yaml (slots that name the
caption's objects, a planned layout, the stated relations).

Stages (each is a plain `emf` command, echoed so you can rerun any of them by hand):
  1. shards    shapes-world WebDataset shards: train, val (new scenes) and heldout (unseen colour-shape pairs)
  2. features  text features for every caption (all-MiniLM-L6-v2 by default), computed once into a feature cache
  3. fit       MeanFlow training with the task's config
  4. baseline  (compose, `--baseline`) flow matching on the same data and recipe for the same wall time
  5. evaluate  ShapesEval (and the sample grid) at 1, 2 and 4 steps on val and on heldout (single: also with the
               same scenes prompted in unseen wordings, shapes.wordings; the baseline: at 1, 2, 4 and 50 steps)
  6. diagnose  how the 1-step samples fail, per category (shapes.diagnosis: missing object, wrong shape or colour,
               extra objects, swapped colours, wrong relation, wrong count, ...; single: also how often the
               prompted colour is there at all), and a grid per category
Then a summary: stage times, ShapesEval per category, the failure modes, where the grids and JSON are.

Usage: python tools/demo.py [--task single|compose] [--out DIR] [--train-n N] [--max-steps N] [--seed S] [--fresh]
       [--config configs/x.yaml] [--set model.optim.lr=0.002 ...] [--n-captions K] [--reworded-captions K]
       [--baseline]
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
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from emf_lightning.utils.progress import progress

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Task:
    """What one demo trains and judges; every field is a default that a command-line flag can override."""

    config: Path
    mix: str | None  # shapes-world category weights of every split; None: the six categories uniformly
    train_n: int
    eval_n: int  # val and heldout scenes each
    n_captions: int  # paraphrases per training scene
    wordings: str  # unseen-wording evaluation (single objects only): all, dev, final or none
    baseline_config: Path | None = None  # the flow-matching run of --baseline


TASKS = {
    # Single objects with a prompted colour, shape and size: the category the demo's target is set on (1-step
    # colour accuracy). Its heldout split asks for colour-shape pairs never seen in training (e.g. a red triangle).
    "single": Task(ROOT / "configs" / "minilm_shapes.yaml", "colors=1", 3000, 256, 1, "all"),
    # Whole scenes, the six categories uniformly (100 val / heldout scenes each); paraphrases so that the
    # encoder sees each relation and binding worded several ways.
    "compose": Task(
        ROOT / "configs" / "compose_layout.yaml",
        None,
        20000,
        600,
        3,
        "none",
        ROOT / "configs" / "compose_layout_flow_matching.yaml",
    ),
}
# The stages, in order, as the progress bar names them.
STAGES = ("shards", "features", "fit", "baseline", "evaluate (val)", "evaluate (heldout)", "diagnose")


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
    p.add_argument("--task", choices=sorted(TASKS), default="single", help="single objects or whole scenes")
    p.add_argument("--out", default=None, help="everything the demo writes goes here (default runs/demo[_compose])")
    p.add_argument("--train-n", type=int, default=None, help="training scenes (default: the task's)")
    p.add_argument("--eval-n", type=int, default=None, help="val and heldout scenes each (default: the task's)")
    p.add_argument("--max-steps", type=int, default=None, help="override the config's max_steps")
    p.add_argument("--fresh", action="store_true", help="delete --out first (shards and features are reused otherwise)")
    p.add_argument("--config", default=None, help="the training config (default: the task's)")
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
    p.add_argument("--wordings", default=None, help="unseen-wording evaluation: all, dev, final or none")
    p.add_argument(
        "--baseline",
        action="store_true",
        help="also train the task's flow-matching baseline for the same wall time and judge it at 1-50 steps",
    )
    args = p.parse_args(argv)
    task = TASKS[args.task]
    if args.baseline and task.baseline_config is None:
        p.error(f"--baseline: the {args.task} task has no baseline config")
    args.config = args.config or str(task.config)
    args.train_n = args.train_n or task.train_n
    args.eval_n = args.eval_n or task.eval_n
    args.n_captions = args.n_captions or task.n_captions
    args.wordings = args.wordings or task.wordings
    args.out = args.out or ("runs/demo" if args.task == "single" else f"runs/demo_{args.task}")

    out = (ROOT / args.out).resolve()
    if args.fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "demo.log"
    times: dict[str, float] = {}
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    with progress("demo: shards", total=len(STAGES)) as advance:
        results, diagnosis = stages(args, task, out, log, times, advance)
    summarise(times, results, out, diagnosis)
    return 0


def stages(
    args: argparse.Namespace, task: Task, out: Path, log: Path, times: dict[str, float], advance
) -> tuple[dict, dict]:
    """Run every stage, timing each into `times` and advancing the stage bar after it."""
    shards, cache, runs = out / "shapes", out / "feature_cache", out / "runs"
    config = Path(args.config).resolve()
    captions = ["--n-captions", str(args.n_captions)]
    if args.reworded_captions:
        captions += ["--reworded-captions", str(args.reworded_captions)]
    mix = ["--mix", task.mix] if task.mix else []

    def done(stage: str) -> None:
        following = STAGES[STAGES.index(stage) + 1] if stage != STAGES[-1] else stage
        advance(1, description=f"demo: {following}")

    # 1. shards (reused when present: they are a pure function of the seed)
    start = time.perf_counter()
    train_manifest = shards / "train.manifest.json"
    if train_manifest.exists():  # reused shards must have been written with the asked-for captions
        source = json.loads(train_manifest.read_text()).get("source", {})
        wanted = {"n_captions": args.n_captions, "reworded_captions": args.reworded_captions or 0}
        found = {k: source.get(k, 0 if k == "reworded_captions" else None) for k in wanted}
        if found != wanted:
            sys.exit(f"demo: {shards} holds training shards written with {found}, not {wanted}: use --fresh or --out")
    for split, n in (("train", args.train_n), ("val", args.eval_n), ("heldout", args.eval_n)):
        if not (shards / f"{split}.manifest.json").exists():
            split_captions = captions if split == "train" else ["--n-captions", "1"]
            out_pattern = str(shards / f"{split}-%06d.tar")
            cmd = ["shards", "shapes", "--out", out_pattern, "--split", split, "--n", str(n), *mix, *split_captions]
            run(emf(*cmd, "--seed", "0"), log)
    times["shards"] = time.perf_counter() - start
    done("shards")
    train, val, heldout = (str(shards / f"{s}-*.tar") for s in ("train", "val", "heldout"))

    # 2. text features, once per caption (an LLM such as SmolLM2 converts its GGUF on first use); paraphrases when
    #    training samples them
    start = time.perf_counter()
    only_primary = args.n_captions == 1 and not args.reworded_captions
    shard_list = f"{train}::{val}::{heldout}"
    cmd = ["cache-features", "--encoder", str(config), "--shards", shard_list, "--root", str(cache)]
    run(emf(*cmd, *(["--no-paraphrases"] if only_primary else [])), log)
    times["features"] = time.perf_counter() - start
    done("features")

    # 3. training
    start = time.perf_counter()
    overrides = [
        f"--data.train_shards={train}",
        f"--data.val_shards={val}",
        f"--model.feature_cache_dir={cache}",
    ]
    if args.max_steps:
        overrides.append(f"--trainer.max_steps={args.max_steps}")
    if args.seed is not None:
        overrides += [f"--seed_everything={args.seed}", f"--model.seed={args.seed}", f"--data.seed={args.seed}"]
    overrides += [f"--{kv}" for kv in args.set]
    ckpt = fit(config, runs, overrides, log)
    times["fit"] = time.perf_counter() - start
    done("fit")

    # 4. the flow-matching baseline for the same wall time: its steps are cheaper, so it gets more of them, and no
    #    step limit (its schedules span the steps the time holds, measured over its first steps)
    checkpoints = {"meanflow": ckpt}
    if args.baseline:
        start = time.perf_counter()
        budget = int(round(times["fit"]))
        limit = [
            f"--trainer.max_time=00:{budget // 3600:02d}:{budget // 60 % 60:02d}:{budget % 60:02d}",
            "--trainer.max_steps=-1",
        ]
        checkpoints["flow matching"] = fit(task.baseline_config, out / "baseline", overrides + limit, log)
        times["baseline"] = time.perf_counter() - start
    done("baseline")

    # 5. evaluation on both held-out sets, from the checkpoint (config: the training one + an evaluation-only
    #    callback list written here, so each set gets its own output folder)
    results = {}
    for name, shard in (("val", val), ("heldout", heldout)):
        start = time.perf_counter()
        for model, path in checkpoints.items():
            label = name if model == "meanflow" else f"{name}, {model}"
            eval_dir = out / f"eval_{name}" if model == "meanflow" else out / f"eval_{name}_baseline"
            results[label] = evaluate(args, path, shard, cache, eval_dir, out / f"{eval_dir.name}.yaml", log)
        times[f"evaluate ({name})"] = time.perf_counter() - start
        done(f"evaluate ({name})")

    start = time.perf_counter()
    splits = (("val", val), ("heldout", heldout))
    single = args.task == "single"
    diagnosis = {name: diagnose(ckpt, shard, args.eval_n, out / f"grids_{name}", single) for name, shard in splits}
    times["diagnose"] = time.perf_counter() - start
    done("diagnose")
    return results, diagnosis


def fit(config: Path, runs: Path, overrides: list[str], log: Path) -> Path:
    """`emf fit` into ``runs``; the run's last.ckpt."""
    where = [f"--trainer.default_root_dir={runs}", f"--trainer.logger.init_args.save_dir={runs}"]
    run(emf("fit", "--config", str(config), *where, *overrides), log)
    ckpt = newest("**/last.ckpt", runs)
    if ckpt is None:
        sys.exit(f"demo: no last.ckpt under {runs}; see {log}")
    return ckpt


def evaluate(
    args: argparse.Namespace, ckpt: Path, shards: str, cache: Path, eval_dir: Path, eval_config: Path, log: Path
) -> dict:
    """`emf validate --ckpt` with an evaluation-only callback writing to ``eval_dir``; its metrics JSON."""
    callback = {
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
    eval_config.write_text(json.dumps({"trainer": {"logger": False, "callbacks": [callback]}}))
    run(
        emf(
            "validate",
            "--ckpt",
            str(ckpt),
            "--config",
            str(eval_config),
            f"--data.val_shards={shards}",
            f"--model.feature_cache_dir={cache}",
            "--trainer.limit_val_batches=1",
            f"--trainer.default_root_dir={eval_dir}",
        ),
        log,
    )  # LightningCLI saves its config.yaml there
    return json.loads(newest("metrics-*.json", eval_dir).read_text())


def held_out_set(shards: str, n: int):
    """The first ``n`` samples of the shards as an Evaluator HeldOutSet (the evaluation stage reads the same)."""
    import glob
    from itertools import islice

    import webdataset as wds

    from emf_lightning.evaluation import HeldOutSet
    from emf_lightning.shapes import scene_spec_or_none

    samples = list(islice(wds.WebDataset(sorted(glob.glob(shards)), shardshuffle=False).decode("rgb8"), n))
    specs = [scene_spec_or_none(s["json"]) for s in samples]
    images = np.stack([s["png"] for s in samples])
    return HeldOutSet(images, [s["txt"] for s in samples], specs, [s["__key__"] for s in samples])


def samples_of(ckpt: Path, held, steps: tuple[int, ...]) -> dict[int, np.ndarray]:
    """The evaluation stage's samples (same sampler, batches and seeds) at each step count."""
    from emf_lightning.evaluation import Evaluator, setting_label
    from emf_lightning.training import EMFModule

    module = EMFModule.load_from_checkpoint(str(ckpt), map_location="cpu").eval()
    evaluator = Evaluator(steps=steps, batch_size=128, fid=False, clip_score=False, shapes_eval=False, keep_images=None)
    result = evaluator.evaluate(module, held)  # at the run's own guidance scale, as the evaluation stage
    return {steps: result.images[setting_label(steps, cfg)] for steps, cfg in result.settings}


def diagnose(ckpt: Path, shards: str, n: int, grids: Path, single: bool = False, per_category: int = 6) -> dict:
    """How 1-step samples fail, per category (shapes.diagnosis), and one grid per category: the real image, then 1,
    2 and 4 steps, for the first ``per_category`` scenes of it, each row labelled with its prompt and the 1-step
    sample's failure mode. ``single`` (single objects): also the share of samples showing the prompted colour."""

    from emf_lightning.shapes import ShapesEval
    from emf_lightning.shapes.diagnosis import failure_mode, failure_table
    from emf_lightning.utils.grids import save_grid

    held = held_out_set(shards, n)
    samples = samples_of(ckpt, held, (1, 2, 4))
    details = ShapesEval().evaluate_detailed(samples[1], held.specs)
    by_category: dict[str, list[int]] = {}
    for i, spec in enumerate(held.specs):
        if spec is not None:
            by_category.setdefault(spec["category"], []).append(i)
    for category, rows in by_category.items():
        rows = rows[:per_category]
        cells = np.stack([img for i in rows for img in (held.images[i], *(samples[s][i] for s in (1, 2, 4)))])
        labels = [
            f"{held.captions[i]} [{failure_mode(held.specs[i], details[i]['detections'], details[i]['passed'])}]"
            for i in rows
        ]
        save_grid(
            cells,
            grids / f"{category}.png",
            nrow=4,
            row_labels=labels,
            col_labels=["real", "1 step", "2 steps", "4 steps"],
            upscale=4,
            row_label_width=260,
        )
    result = {"n": len(held), "failures_1step": failure_table(held.specs, details), "grids": str(grids)}
    if single:  # ShapesEval needs colour AND shape right: is the colour alone there (in any shape)?
        shown = [
            spec["objects"][0]["color"] in {det["color"] for det in d["detections"]}
            for spec, d in zip(held.specs, details)
        ]
        result["colour_present"] = sum(shown) / len(held)
    return result


def summarise(times: dict[str, float], results: dict[str, dict], out: Path, diagnosis: dict[str, dict]) -> None:
    """Stage times, then ShapesEval per category and step count for each held-out set, then the failure modes."""
    from rich.console import Console
    from rich.table import Table

    console = Console(width=140)
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
        t = Table(title=f"How 1-step {name} samples fail (of {d['n']} scenes); grids per category: {d['grids']}")
        t.add_column("category")
        t.add_column("outcomes")
        for category, modes in d["failures_1step"].items():
            t.add_row(category, ", ".join(f"{mode} {count}" for mode, count in modes.items()))
        console.print(t)
        if "colour_present" in d:
            console.print(f"1-step {name} samples showing the prompted colour (any shape): {d['colour_present']:.3f}")
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    console.print(f"grids and metrics: {out}/eval_val, {out}/eval_heldout; summary: {out}/summary.json")


if __name__ == "__main__":
    raise SystemExit(main())
