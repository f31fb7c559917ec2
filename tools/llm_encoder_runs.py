"""Issue 23's measurements (docs/llm_encoder_2026-12-06.md): SmolLM2 settings scored by the probe (raw and
standardised per channel), the same settings trained on the demo's data and budget, and the rank correlation
between the two. Run alone on the 2-core machine, from the repository root, once `make demo` (or tools/demo.py)
has written runs/demo/shapes:

    OMP_NUM_THREADS=1 .venv/bin/python tools/llm_encoder_runs.py                         # 1300 steps, seeds 0 1 2
    OMP_NUM_THREADS=1 .venv/bin/python tools/llm_encoder_runs.py --steps 325 --seeds 0   # a quarter-budget screen
    .venv/bin/python tools/llm_encoder_runs.py --report-only                             # tables from what exists

Fits run two at a time (tools/side_by_side.py, one thread each); a fit whose results.json exists is skipped, so an
interrupted run resumes. Prints the generator's scores per setting (mean over seeds) and Spearman's rho between
each probe score and the generator's 1-step heldout scores, with n.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

SMOL = "configs/smollm_shapes.yaml"
# name -> (probe row of `emf probe --vary 'layer=[-1, 8, [8, 16, -1]]' --recommend`, side_by_side --set overrides)
# Every setting is the per-token connector alone: smollm_shapes.yaml adds a token refiner since 2026-12-06, and
# the probe scores frozen features, not a trained refiner (that run: docs/llm_encoder_2026-12-06.md).
PER_TOKEN = "model.text_refiner_layers=0"
SETTINGS: dict[str, tuple[str, list[str]]] = {
    "raw_last": ("llm layer=-1", ["model.standardize_text=false", PER_TOKEN]),
    "std_last": ("llm layer=-1 +std", ["model.standardize_text=true", PER_TOKEN]),
    "raw_layer8": ("llm layer=8", ["model.standardize_text=false", "model.encoder.init_args.layer=8", PER_TOKEN]),
    "std_layer8": ("llm layer=8 +std", ["model.standardize_text=true", "model.encoder.init_args.layer=8", PER_TOKEN]),
    "std_mean8_16_last": (
        "llm layer=[8, 16, -1] +std",
        ["model.standardize_text=true", "model.encoder.init_args.layer=[8, 16, -1]", PER_TOKEN],
    ),
}
# The offline default beside them (--minilm): generator runs only, no probe row, so reported but not correlated.
MINILM: dict[str, list[str]] = {"minilm_raw": [], "minilm_std": ["model.standardize_text=true"]}
PROBE_KEYS = ("wording/retrieval_at_1", "same_scene_auc", "retrieval/exact_precision_at_k", "minimal_pairs/accuracy")
GENERATOR_KEYS = ("shapes_colors", "shapes_reworded_final")


def run_probe(out: Path, emf: str) -> None:
    if (out / "probe" / "probe.json").exists():
        return
    cmd = [emf, "probe", "--encoder", "llm", "--encoder-arg", "max_length=64", "--vary", "layer=[-1, 8, [8, 16, -1]]"]
    cmd += ["--recommend", "--feature-cache", str(out / "probe_features"), "--out", str(out / "probe"), "--no-figure"]
    subprocess.run(cmd, check=True)


def fit(name: str, config: str, overrides: list[str], seed: int, steps: int, out: Path) -> None:
    run = f"{name}_s{seed}"
    if (out / "runs" / run / "results.json").exists():
        return
    cmd = [sys.executable, "tools/side_by_side.py", run, "--config", config, "--data", "runs/demo/shapes"]
    cmd += ["--seed", str(seed), "--cache", str(out / "feature_cache"), "--out", str(out / "runs")]
    for kv in [f"trainer.max_steps={steps}", *overrides]:
        cmd += ["--set", kv]
    subprocess.run(cmd, check=True)


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman's rho (average ranks for ties)."""

    def ranks(v: list[float]) -> list[float]:
        order = sorted(range(len(v)), key=v.__getitem__)
        r = [0.0] * len(v)
        i = 0
        while i < len(v):
            j = i
            while j + 1 < len(v) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    var = (sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry)) ** 0.5
    return cov / var if var else float("nan")


def report(out: Path) -> None:
    probe_path = out / "probe" / "probe.json"
    probe = json.loads(probe_path.read_text())["encoders"] if probe_path.exists() else {}
    rows = {}
    for name, row in [*((n, r) for n, (r, _) in SETTINGS.items()), *((n, None) for n in MINILM)]:
        results = [json.loads(p.read_text()) for p in sorted((out / "runs").glob(f"{name}_s*/results.json"))]
        if not results:
            continue
        held = [r["heldout"]["1"] for r in results]
        rows[name] = {
            "seeds": len(results),
            **{k: sum(h.get(k, float("nan")) for h in held) / len(held) for k in GENERATOR_KEYS},
            "probe": {k: (probe.get(row) or {}).get("metrics", {}).get(k) for k in PROBE_KEYS} if row else {},
        }
        print(
            f"{name:20s} seeds {len(results)}  heldout 1 step "
            + "  ".join(f"{k} {rows[name][k]:.3f}" for k in GENERATOR_KEYS)
        )
    named = [n for n in rows if rows[n]["probe"] and all(v is not None for v in rows[n]["probe"].values())]
    for key in PROBE_KEYS:
        for target in GENERATOR_KEYS:
            if len(named) >= 3:
                rho = spearman([rows[n]["probe"][key] for n in named], [rows[n][target] for n in named])
                print(f"Spearman {key} vs {target}: {rho:+.2f} (n = {len(named)} settings)")
    (out / "summary.json").write_text(json.dumps(rows, indent=1))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=1300)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--minilm", action="store_true", help="also MiniLM, raw and with model.standardize_text=true")
    p.add_argument("--jobs", type=int, default=2, help="fits at a time (2: one thread each; 1: alone)")
    p.add_argument("--out", default="runs/llm_encoder")
    p.add_argument("--report-only", action="store_true")
    a = p.parse_args(argv)
    out = Path(a.out)
    if not a.report_only:
        run_probe(out, str(Path(sys.executable).with_name("emf")))
        jobs = [(n, SMOL, SETTINGS[n][1], s) for s in a.seeds for n in a.settings]
        if a.minilm:
            jobs += [(n, "configs/minilm_shapes.yaml", sets, s) for s in a.seeds for n, sets in MINILM.items()]
        with ThreadPoolExecutor(a.jobs) as pool:
            for future in [pool.submit(fit, *job, a.steps, out) for job in jobs]:
                future.result()
    report(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
