"""One side-by-side run on shapes-world data: fit a config with overrides, then ShapesEval on val and heldout with
the grammar's prompts and unseen wordings (dev and final families). The runs of docs/wording_robustness.md.

    python tools/side_by_side.py NAME --config configs/minilm_shapes.yaml --data runs/demo/shapes \\
        --train 'train-*.tar' [--seed S] [--set model.optim.lr=0.002 ...] [--out runs/side_by_side]

Run two at a time with OMP_NUM_THREADS=1 on a 2-core machine. Prints one line and writes <out>/<NAME>/results.json.
A fitted run is judged again under other sampling-time settings with ``--judge-set model.layout_spacing=0.45
--tag _spaced`` (the fit is kept; the judgement lands in eval_<split>_spaced and results_spaced.json).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

EVALUATION = {
    "class_path": "emf_lightning.callbacks.evaluation.EvaluationCallback",
    "init_args": {
        "num_samples": 256,
        "batch_size": 128,
        "fid": False,
        "clip_score": False,
        "shapes_eval": True,
        "grid_prompts": 12,
        "wordings": "all",
    },
}
CHECKPOINT = "[{class_path: emf_lightning.callbacks.checkpoint.FinalModelCheckpoint, init_args: {filename: last, save_last: true}}]"


def emf(*args: str) -> list[str]:
    exe = Path(sys.executable).with_name("emf")
    return [str(exe) if exe.exists() else "emf", *args]


def setting(s: dict) -> str:
    """A result row's key: the step count, with the guidance scale when it is not 1 (`1`, `2@cfg2.0`)."""
    cfg = float(s.get("cfg_scale", 1.0))
    return f"{s['steps']}" + ("" if cfg == 1.0 else f"@cfg{cfg}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name")
    p.add_argument("--config", default="configs/minilm_shapes.yaml")
    p.add_argument("--data", default="runs/demo/shapes", help="folder with the shards (make demo writes it)")
    p.add_argument("--train", default="train-*.tar", help="training shards inside --data")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--cache", default="runs/side_by_side/feature_cache")
    p.add_argument("--out", default="runs/side_by_side")
    p.add_argument("--num-samples", type=int, default=256, help="held-out scenes judged per split")
    p.add_argument("--cfg", type=float, nargs="+", default=[1.0], help="guidance scales judged at sampling")
    p.add_argument("--wordings", default="all", help="unseen-wording evaluation: all, dev, final or none")
    p.add_argument("--fit-only", action="store_true", help="train and stop (a pre-training phase for `init_from`)")
    p.add_argument(
        "--judge-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an override for judging only (a sampling-time key such as model.layout_spacing); needs --tag",
    )
    p.add_argument("--tag", default="", help="suffix of this judgement's folders and results file")
    a = p.parse_args(argv)
    if a.judge_set and not a.tag:
        p.error("--judge-set judges a fitted run again: name the judgement with --tag (e.g. --tag _spaced)")
    out, data = Path(a.out) / a.name, Path(a.data)
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, EMF_NO_PROGRESS="1")
    with open(out / "log.txt", "a") as log:

        def run(cmd: list[str]) -> None:
            log.write("$ " + " ".join(cmd) + "\n")
            log.flush()
            subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, check=True)

        start = time.perf_counter()
        if not (out / "fit_seconds").exists():
            run(
                emf(
                    "fit",
                    "--config",
                    a.config,
                    f"--data.train_shards={data / a.train}",
                    f"--data.val_shards={data / 'val-*.tar'}",
                    f"--model.feature_cache_dir={a.cache}",
                    f"--trainer.default_root_dir={out}",
                    f"--trainer.logger.init_args.save_dir={out}",
                    f"--seed_everything={a.seed}",
                    f"--model.seed={a.seed}",
                    f"--data.seed={a.seed}",
                    f"--trainer.callbacks={CHECKPOINT}",
                    "--trainer.limit_val_batches=0",
                    "--trainer.enable_progress_bar=false",
                    *[f"--{kv}" for kv in a.set],
                )
            )
            (out / "fit_seconds").write_text(f"{time.perf_counter() - start:.1f}")
        ckpt = sorted(out.rglob("last.ckpt"))[-1]
        fit_seconds = float((out / "fit_seconds").read_text())
        if a.fit_only:
            print(f"{a.name}: {ckpt} ({fit_seconds:.0f} s fit)")
            return 0
        results = {"name": a.name, "args": vars(a), "fit_seconds": fit_seconds}
        for split in ("val", "heldout"):
            folder = out / f"eval_{split}{a.tag}"
            judged = {
                "output_dir": str(folder),
                "num_samples": a.num_samples,
                "cfg_scales": a.cfg,
                "wordings": None if a.wordings == "none" else a.wordings,
            }
            callback = {**EVALUATION, "init_args": {**EVALUATION["init_args"], **judged}}
            config = out / f"eval_{split}{a.tag}.json"
            config.write_text(json.dumps({"trainer": {"logger": False, "callbacks": [callback]}}))
            if not list(folder.glob("metrics-*.json")):
                run(
                    emf(
                        "validate",
                        "--ckpt",
                        str(ckpt),
                        "--config",
                        str(config),
                        f"--data.val_shards={data / f'{split}-*.tar'}",
                        f"--model.feature_cache_dir={a.cache}",
                        "--trainer.limit_val_batches=1",
                        f"--trainer.default_root_dir={folder}",
                        "--trainer.enable_progress_bar=false",
                        *[f"--{kv}" for kv in a.judge_set],
                    )
                )
            payload = json.loads(sorted(folder.glob("metrics-*.json"))[-1].read_text())
            results[split] = {
                setting(s): {k: v for k, v in s["metrics"].items() if k.startswith("shapes_")}
                for s in payload["settings"]
            }
    (out / f"results{a.tag}.json").write_text(json.dumps(results, indent=1))
    if a.wordings == "none":  # scenes of every category: the mean of the categories at each setting
        for split in ("val", "heldout"):
            row = ", ".join(f"{k} {v.get('shapes_overall', float('nan')):.3f}" for k, v in results[split].items())
            print(f"{a.name}{a.tag} {split}: {row} ({results['fit_seconds']:.0f} s fit)")
        return 0
    held = results["heldout"][setting({"steps": 1, "cfg_scale": a.cfg[0]})]
    print(
        f"{a.name}: heldout 1 step grammar {held.get('shapes_colors', float('nan')):.3f}, dev wordings "
        f"{held.get('shapes_reworded_dev', float('nan')):.3f}, final wordings "
        f"{held.get('shapes_reworded_final', float('nan')):.3f} ({results['fit_seconds']:.0f} s fit)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
