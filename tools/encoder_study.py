"""`make study`: does the discriminability probe predict which text encoder gives the best few-step generator?

The paper's central claim at small scale: train the same backbone, for the same budget, with each text
encoder, under MeanFlow and under flow matching; judge ShapesEval at 1, 2 and 4 steps (and 50 for flow
matching); put the encoders' probe scores beside it; rank-correlate the probe with 1-step quality.

  python tools/encoder_study.py                                  # CPU scale: 32x32, unet-tiny backbone
  python tools/encoder_study.py --resolution 64 --backbone unet-S --max-steps 3000 --batch-size 128 \
      --parallel 4                                               # GPU scale

Every run is a plain `emf fit` with the offline default config plus a generated override file (saved in
the run folder, so any run can be repeated by hand). Runs are independent processes, so `--parallel N`
runs N at once (useful on a big GPU: small models leave most of it idle).
`--precomputed DIR` trains from feature caches copied from elsewhere (DIR/<encoder>/, written by
`emf cache-features` and exported with emf_lightning.encoders.precomputed.export_features): no text
model is loaded, so the study runs where the encoders' weights are not installed.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from emf_lightning.shapes import CATEGORIES
from emf_lightning.utils.optional import MissingExtraError, require
from emf_lightning.utils.progress import progress

ROOT = Path(__file__).resolve().parents[1]
BASE_CONFIG = ROOT / "configs" / "smollm_shapes.yaml"
MIX = "colors=4,color_attr=1,position=1"

# Each encoder as the training config names it. max_length matches the base config.
ENCODER_SPECS = {
    "llm": {"class_path": "emf_lightning.encoders.LLMEncoder", "init_args": {"model": "smollm2", "max_length": 64}},
    "minilm": {
        "class_path": "emf_lightning.encoders.SentenceEncoder",
        "init_args": {"model": "minilm", "max_length": 64},
    },
    "bow": {"class_path": "emf_lightning.encoders.BagOfWordsEncoder", "init_args": {}},
    "label": {"class_path": "emf_lightning.encoders.LabelEncoder", "init_args": {}},
}
# The probe's edit of a scene that each multi-object category is about: a generator that draws "a red circle
# left of a blue square" must tell it from its mirror image (relation), from the colour-swapped scene (binding)
# and from one more circle (count). The study asks whether the encoder's score on that edit predicts the category.
EDIT_CATEGORY = {"relation": "position", "swap_binding": "color_attr", "count": "counting"}
# The probe's headline numbers shown beside the generators (see docs/probe_results.md for all of them).
PROBE_KEYS = {
    "retrieval/exact_precision_at_k": "probe P@2",
    "same_scene_auc": "probe AUC",
    "minimal_pairs/accuracy": "probe min-pair",
}


def emf_command() -> list[str]:
    exe = Path(sys.executable).with_name("emf")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "emf_lightning.cli"]


def run(cmd: list[str], log: Path, env: dict | None = None) -> None:
    print("$ " + shlex.join(cmd), flush=True)
    with open(log, "a") as out:
        out.write("$ " + shlex.join(cmd) + "\n")
        out.flush()
        code = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env).returncode
    if code != 0:
        tail = "\n".join(log.read_text().splitlines()[-30:])
        raise RuntimeError(f"failed (exit {code}): {shlex.join(cmd)}\n{tail}")


def make_data(args: argparse.Namespace, data: Path, log: Path) -> dict[str, str]:
    """Shapes-world shards at the study's resolution (reused when present)."""
    urls = {}
    for split, n in (("train", args.train_n), ("val", args.eval_n)):
        if not (data / f"{split}.manifest.json").exists():
            run(
                emf_command()
                + [
                    "shards",
                    "shapes",
                    "--out",
                    str(data / f"{split}-%06d.tar"),
                    "--split",
                    split,
                    "--n",
                    str(n),
                    "--mix",
                    args.mix,
                    "--n-captions",
                    "1",
                    "--seed",
                    "0",
                    "--resolution",
                    str(args.resolution),
                ],
                log,
            )
        urls[split] = str(data / f"{split}-*.tar")
    return urls


def encoder_spec(name: str, args: argparse.Namespace) -> dict:
    if args.precomputed and name in ("llm", "minilm"):
        return {
            "class_path": "emf_lightning.encoders.PrecomputedEncoder",
            "init_args": {"cache_dir": str(Path(args.precomputed).resolve() / name)},
        }
    return ENCODER_SPECS[name]


def backbone_spec(args: argparse.Namespace) -> dict:
    """The base config's backbone at the study's resolution, unless --backbone names another (e.g. unet-S, S)."""
    if not args.backbone:
        return {"init_args": {"input_size": args.resolution}}
    from emf_lightning.models import BACKBONES

    cls, preset = BACKBONES[args.backbone]
    init_args = {"preset": preset, "input_size": args.resolution}
    if args.patch_size:  # DiT presets only
        init_args["patch_size"] = args.patch_size
    return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": init_args}


def loss_spec(objective: str, args: argparse.Namespace) -> dict:
    """MeanFlow as EMF has it (its schedules; the paper's tangent unless --jvp-tangent predicted), whatever the
    demo config tunes, or flow matching on the same time schedule."""
    time_sampler = {"mu": [-0.5, 0.5], "sigma": [1.0, 2.0], "neq_ratio": [0.25, 0.75]}
    common = {"time_sampler": time_sampler, "adaptive_p": 1.0, "adaptive_c": 0.001, "cond_drop_prob": 0.1}
    if objective == "flow_matching":
        return {"class_path": "emf_lightning.meanflow.FlowMatchingLoss", "init_args": common}
    return {
        "class_path": "emf_lightning.meanflow.MeanFlowLoss",
        "init_args": {**common, "jvp_tangent": args.jvp_tangent},
    }


def run_config(name: str, objective: str, args: argparse.Namespace, urls: dict, run_dir: Path, cache: Path) -> dict:
    """The override file for one (encoder, objective) run: everything that differs from the base config."""
    steps = [1, 2, 4, 50] if objective == "flow_matching" else [1, 2, 4]
    return {
        "seed_everything": args.seed,
        "trainer": {
            "max_steps": args.max_steps,
            "max_time": f"00:{args.max_minutes // 60:02d}:{args.max_minutes % 60:02d}:00" if args.max_minutes else None,
            "precision": args.precision,
            "val_check_interval": None,
            "limit_val_batches": 0,
            "logger": {
                "class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": str(run_dir), "name": "log"},
            },
            "callbacks": [
                {
                    "class_path": "emf_lightning.callbacks.evaluation.EvaluationCallback",
                    "init_args": {
                        "every_n_steps": args.max_steps,
                        "num_samples": args.eval_n,
                        "batch_size": 128,
                        "steps": steps,
                        "fid": False,
                        "clip_score": False,
                        "shapes_eval": True,
                        "grid_prompts": 8,
                        "output_dir": str(run_dir / "eval"),
                        "on_train_end": True,
                    },
                }
            ],
            "enable_checkpointing": False,
            "enable_progress_bar": False,
        },
        "model": {
            "encoder": encoder_spec(name, args),
            "backbone": backbone_spec(args),
            "loss": loss_spec(objective, args),
            "feature_cache_dir": str(cache),
            "standardize_text": False,  # every encoder's raw features, as the study has always measured them
            "text_refiner_layers": 0,  # and the per-token connector alone
        },
        "data": {
            "train_shards": urls["train"],
            "val_shards": urls["val"],
            "image_size": args.resolution,
            "batch_size": args.batch_size,
            "caption_sampling": "first",
            "epoch_length": args.batch_size * max(args.max_steps, 1),
        },
    }


def train_one(name: str, objective: str, args, urls, out: Path, cache: Path) -> dict | None:
    run_dir = out / "runs" / f"{name}-{objective}"
    if collect(run_dir) is None:
        run_dir.mkdir(parents=True, exist_ok=True)
        config = run_dir / "override.json"
        config.write_text(json.dumps(run_config(name, objective, args, urls, run_dir, cache), indent=1))
        start = time.perf_counter()
        try:
            run(
                emf_command() + ["fit", "--config", str(BASE_CONFIG), "--config", str(config)],
                run_dir / "fit.log",
                env=run_env(args.parallel),
            )
        except RuntimeError as err:  # one failed run must not cost the others' results
            print(f"study: {name}/{objective} failed: {err}", file=sys.stderr)
            return None
        (run_dir / "seconds.txt").write_text(f"{time.perf_counter() - start:.1f}\n")
    return collect(run_dir)


def run_env(parallel: int) -> dict:
    """Environment of one training process: with N runs at once, each gets cores / N OpenMP threads.

    Left alone, every process starts one thread per core; on a small machine the threads then spin against
    each other and each run slows down by far more than N (10x and worse on 2 cores)."""
    env = dict(os.environ)
    if parallel > 1 and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // parallel))
    return env


def collect(run_dir: Path) -> dict | None:
    """A finished run's ShapesEval per step count (None if it has not finished)."""
    done = sorted((run_dir / "eval").glob("metrics-*.json"))
    if not done:
        return None
    payload = json.loads(done[-1].read_text())
    seconds = float((run_dir / "seconds.txt").read_text()) if (run_dir / "seconds.txt").exists() else float("nan")
    encoder, _, objective = run_dir.name.partition("-")
    return {
        "encoder": encoder,
        "objective": objective,
        "seconds": seconds,
        "global_step": payload["global_step"],
        "shapes": {s["steps"]: s["metrics"] for s in payload["settings"]},
        "real": payload.get("real", {}),
    }


def probe_scores(names: list[str], args, out: Path, log: Path) -> dict[str, dict]:
    """The probe's numbers per encoder: from --probe-json, or by running `emf probe` here."""
    path = Path(args.probe_json) if args.probe_json else out / "probe" / "probe.json"
    if not path.exists():
        run(
            emf_command()
            + [
                "probe",
                "--encoder",
                ",".join(names),
                "--n",
                str(args.probe_n),
                "--k",
                "2",
                "--out",
                str(path.parent),
                "--feature-cache",
                str(out / "probe_features"),
            ],
            log,
        )
    encoders = json.loads(path.read_text())["encoders"]
    return {n: encoders[n]["metrics"] for n in names if n in encoders}


def spearman(a: list[float], b: list[float]) -> float:
    """Rank correlation (average ranks for ties)."""
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic) if len(a) > 2 else float("nan")


def report(results: list[dict], probes: dict, args, out: Path) -> str:
    backbone = args.backbone or "of the base config"
    lines = [
        f"Encoder study: {args.resolution}x{args.resolution}, backbone {backbone}, {args.max_steps} steps x "
        f"batch {args.batch_size}, {args.eval_n} val scenes (ShapesEval overall / colors).",
        "",
    ]
    head = [
        "encoder",
        "objective",
        *PROBE_KEYS.values(),
        "1 step",
        "2 steps",
        "4 steps",
        "50 steps",
        "colors@1",
        "steps",
        "train s",
    ]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        p = probes.get(r["encoder"], {})
        cells = [r["encoder"], r["objective"], *[f"{p[k]:.3f}" if k in p else "-" for k in PROBE_KEYS]]
        for s in (1, 2, 4, 50):
            m = r["shapes"].get(s)
            cells.append(f"{m['shapes_overall']:.3f}" if m else "-")
        cells.append(f"{r['shapes'][1].get('shapes_colors', float('nan')):.3f}")
        cells.append(str(r["global_step"]))
        cells.append(f"{r['seconds']:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    mf = [r for r in results if r["objective"] == "meanflow" and r["encoder"] in probes]
    if len(mf) >= 3:
        one_step = [r["shapes"][1]["shapes_overall"] for r in mf]
        for key, label in PROBE_KEYS.items():
            rho = spearman([probes[r["encoder"]][key] for r in mf], one_step)
            lines.append(
                f"- Spearman rank correlation of {label} with MeanFlow 1-step ShapesEval overall: {rho:+.2f} "
                f"(n = {len(mf)} encoders)"
            )
    lines += composition_report(mf, probes)
    text = "\n".join(lines) + "\n"
    (out / "study.md").write_text(text)
    (out / "study.json").write_text(json.dumps({"args": vars(args), "results": results, "probes": probes}, indent=1))
    plot(results, probes, out)
    return text


def composition_report(mf: list[dict], probes: dict) -> list[str]:
    """Per-category 1-step scores of the MeanFlow runs, and whether the probe's per-edit minimal-pair accuracy
    predicts the category that edit tests (rank correlation over encoders, per edit and pooled over edits), on
    mean-pooled features and on the token features the generator's cross-attention reads."""
    categories = [c for c in CATEGORIES if mf and f"shapes_{c}" in mf[0]["shapes"][1]]
    if len(categories) < 2:
        return []
    levels = {"pooled": "minimal_pairs", "token": "minimal_pairs_token"}
    lines = ["", "MeanFlow at 1 step, per category, beside the probe's minimal-pair accuracy per edit:", ""]
    head = ["encoder", *categories, *[f"probe {e} ({lv})" for lv in levels for e in EDIT_CATEGORY]]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in mf:
        p = probes.get(r["encoder"], {})
        cells = [r["encoder"], *[f"{r['shapes'][1][f'shapes_{c}']:.3f}" for c in categories]]
        keys = [f"{prefix}/accuracy/{e}" for prefix in levels.values() for e in EDIT_CATEGORY]
        cells += [f"{p[k]:.3f}" if k in p else "-" for k in keys]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for level, prefix in levels.items():
        pooled: tuple[list[float], list[float]] = ([], [])
        for edit, category in EDIT_CATEGORY.items():
            key = f"{prefix}/accuracy/{edit}"
            runs = [r for r in mf if key in probes.get(r["encoder"], {}) and f"shapes_{category}" in r["shapes"][1]]
            if len(runs) < 3:
                continue
            probe = [probes[r["encoder"]][key] for r in runs]
            score = [r["shapes"][1][f"shapes_{category}"] for r in runs]
            pooled[0].extend(probe)
            pooled[1].extend(score)
            lines.append(
                f"- probe minimal pairs ({edit}, {level}) vs 1-step {category}: Spearman "
                f"{spearman(probe, score):+.2f} (n = {len(runs)} encoders)"
            )
        if pooled[0]:
            lines.append(
                f"- {level}, pooled over the three edits (each encoder's edit score vs its category): Spearman "
                f"{spearman(*pooled):+.2f} (n = {len(pooled[0])} encoder-edit pairs)"
            )
    return lines


def plot(results: list[dict], probes: dict, out: Path) -> None:
    """Left: ShapesEval overall vs sampling steps per encoder/objective. Right: probe vs 1-step quality."""
    try:
        matplotlib = require("matplotlib", extra="plot", purpose="The study's figure")
    except MissingExtraError as err:
        print(f"study: figure skipped: {err}", file=sys.stderr)
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for r in results:
        steps = sorted(r["shapes"])
        style = "-o" if r["objective"] == "meanflow" else "--s"
        left.plot(
            steps, [r["shapes"][s]["shapes_overall"] for s in steps], style, label=f"{r['encoder']} {r['objective']}"
        )
    left.set_xscale("log")
    left.set_xlabel("sampling steps")
    left.set_ylabel("ShapesEval overall")
    left.legend(fontsize=7)
    for r in results:
        if r["objective"] == "meanflow" and r["encoder"] in probes:
            x = probes[r["encoder"]]["same_scene_auc"]
            y = r["shapes"][1]["shapes_overall"]
            right.scatter([x], [y])
            right.annotate(r["encoder"], (x, y))
    right.set_xlabel("probe: same-scene AUC")
    right.set_ylabel("MeanFlow 1-step ShapesEval overall")
    fig.tight_layout()
    fig.savefig(out / "study.png", dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--encoders", default="llm,minilm,bow,label")
    p.add_argument("--objectives", default="meanflow,flow_matching")
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument(
        "--jvp-tangent",
        default="conditional",
        choices=["conditional", "predicted"],
        help="MeanFlow's du/dt tangent: the paper's e - x (default) or improved MeanFlow's u(z, t, t)",
    )
    p.add_argument("--backbone", default=None, help="a backbone preset (default: the base config's, unet-tiny)")
    p.add_argument("--patch-size", type=int, default=None, help="DiT patch size (DiT presets only)")
    p.add_argument("--max-steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--precision", default="bf16-mixed", help="bf16 autocast (faster on AVX512-BF16 CPUs too)")
    p.add_argument(
        "--max-minutes",
        type=int,
        default=None,
        help="stop each run after this long (then it is evaluated where it got to)",
    )
    p.add_argument("--mix", default=MIX, help="shapes-world category weights of the study's data")
    p.add_argument("--train-n", type=int, default=3000)
    p.add_argument("--eval-n", type=int, default=256)
    p.add_argument("--probe-n", type=int, default=500, help="captions in the probe's retrieval pool")
    p.add_argument("--probe-json", default=None, help="reuse an `emf probe` JSON instead of running the probe")
    p.add_argument("--precomputed", default=None, help="DIR with DIR/llm and DIR/minilm exported feature caches")
    p.add_argument("--parallel", type=int, default=1, help="runs at once")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/study")
    p.add_argument("--report-only", action="store_true", help="tabulate the runs already finished in --out")
    args = p.parse_args(argv)

    out = (ROOT / args.out).resolve() if not Path(args.out).is_absolute() else Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "study.log"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    names = [n.strip() for n in args.encoders.split(",") if n.strip()]
    objectives = [o.strip() for o in args.objectives.split(",") if o.strip()]
    unknown = [n for n in names if n not in ENCODER_SPECS]
    if unknown:
        p.error(f"unknown encoders {unknown}; the study knows {sorted(ENCODER_SPECS)}")
    jobs = [(n, o) for n in names for o in objectives]
    if args.report_only:  # e.g. after a time limit cut some runs short
        results = [collect(out / "runs" / f"{n}-{o}") for n, o in jobs]
        results = [r for r in results if r is not None]
        print(report(results, probe_scores(names, args, out, log), args, out))
        return 0
    urls = make_data(args, out / f"shapes{args.resolution}", log)
    cache = out / "feature_cache"
    if not args.precomputed:  # each encoder's features once, before any training run needs them
        for name in names:
            spec_file = out / f"encoder-{name}.json"
            spec_file.write_text(json.dumps({"encoder": ENCODER_SPECS[name]}))
            run(
                emf_command()
                + [
                    "cache-features",
                    "--encoder",
                    str(spec_file),
                    "--shards",
                    f"{urls['train']}::{urls['val']}",
                    "--root",
                    str(cache),
                    "--no-paraphrases",
                ],
                log,
            )
    with progress("study: training runs", total=len(jobs)) as advance:

        def one(job: tuple[str, str]) -> dict | None:
            result = train_one(*job, args, urls, out, cache)
            advance(1, description=f"study: {job[0]}/{job[1]} done")
            return result

        with ThreadPoolExecutor(max_workers=max(1, args.parallel)) as pool:
            results = [r for r in pool.map(one, jobs) if r is not None]
    probes = probe_scores(names, args, out, log)
    print(report(results, probes, args, out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
