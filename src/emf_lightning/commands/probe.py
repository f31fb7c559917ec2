"""``emf probe``: how discriminative and disentangled is a text encoder's representation?

Builds a probe set (the shapes world by default, or WebDataset shards), encodes it with each requested
encoder, prints a table, and writes ``probe.json`` and ``probe.png`` (same-scene vs different-scene
cosine histograms and per-edit minimal-pair accuracy) to ``--out``.

Examples::

    emf probe --encoder bow --n 200
    emf probe --encoder all --n 1000 --k 2 --out runs/probe/all
    emf probe --encoder configs/smollm_shapes.yaml --data 'shards/val-{000000..000003}.tar'
    emf probe --encoder llm --vary 'layer=[8, 16, [8, 16, -1], -1]' --recommend   # layers, raw and standardised

``--vary KEY=[v1, v2, ...]`` probes one variant of each encoder per value (repeatable: every combination);
``--standardize`` adds each encoder's features z-scored per channel (statistics fitted on the probe's own
captions), as ``model.standardize_text: true`` gives them to the generator; ``--recommend`` does both, ranks
every row by ``RECOMMEND_KEY`` (the same-scene AUC) and prints the best one as config lines to paste.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from emf_lightning.config_files import encoder_spec_in, key_value_args
from emf_lightning.utils.optional import MissingExtraError, require
from emf_lightning.utils.progress import progress
from emf_lightning.utils.weights import MissingWeightsError

# Columns of the summary table: (metric key, header). Missing metrics show as "-".
TABLE_COLUMNS = (
    ("retrieval/relevance_at_k", "rel@k"),
    ("retrieval/normalized_relevance_at_k", "rel@k norm"),
    ("retrieval/exact_precision_at_k", "exact P@k"),
    ("same_scene_auc", "scene AUC"),
    ("retrieval_standardized/relevance_at_k", "rel@k std"),
    ("same_scene_auc_standardized", "AUC std"),
    ("disentanglement/pooled", "disent."),
    ("disentanglement/pooled_standardized", "disent. std"),
    ("disentanglement/token", "disent. tok"),
    ("minimal_pairs/accuracy", "min-pair"),
    ("minimal_pairs_token/accuracy", "min-pair tok"),
    ("wording/retrieval_at_1", "wording P@1"),
    ("wording/auc", "wording AUC"),
    ("anisotropy/pooled", "aniso."),
    ("anisotropy/token", "aniso. tok"),
    ("effective_rank/pooled", "eff. rank"),
)


# The recommendation ranks rows by the same-scene AUC: of the probe's scores, the one whose ranking matched the
# generators' both across encoders (README, `make study`) and across SmolLM2's layers and standardisation
# (docs/llm_encoder_2026-12-06.md). The context scores are printed beside it, not ranked by.
RECOMMEND_KEY = "same_scene_auc"
CONTEXT_KEYS = ("wording/retrieval_at_1", "retrieval/exact_precision_at_k")
STANDARDIZED_SUFFIX = " +std"

# Constructor arguments the probe gives a registry encoder unless --encoder-arg overrides them. The label
# encoder needs a class list; hashing each whole caption into its own class makes it the baseline with no
# language understanding at all (what class-conditional MeanFlow sees), which is what the probe compares.
PROBE_DEFAULTS: dict[str, dict[str, Any]] = {"label": {"num_classes": 4096}}


@dataclass
class EncoderChoice:
    """One encoder to probe: a label for the table and how to build it."""

    label: str
    name: str | None = None  # registry name
    kwargs: dict[str, Any] | None = None  # registry kwargs
    spec: dict[str, Any] | None = None  # class_path / init_args from a YAML config

    def build(self):
        """Instantiate the encoder (may raise MissingWeightsError)."""
        from emf_lightning.encoders.base import TextEncoder
        from emf_lightning.utils.specs import build

        return build(self.config_spec(), TextEncoder)

    def config_spec(self) -> dict[str, Any]:
        """The encoder as a config's ``{class_path, init_args}``."""
        if self.spec is not None:
            return self.spec
        from emf_lightning import encoders

        cls = encoders.encoder_class(self.name)
        exported = getattr(encoders, cls.__name__, None) is cls
        path = f"emf_lightning.encoders.{cls.__name__}" if exported else f"{cls.__module__}.{cls.__name__}"
        return {"class_path": path, "init_args": {**PROBE_DEFAULTS.get(self.name, {}), **(self.kwargs or {})}}

    def with_arg(self, key: str, value: Any) -> EncoderChoice:
        """This encoder with one constructor argument set (in a wrapper's spec: the innermost encoder's)."""
        label = f"{self.label} {key}={json.dumps(value)}"
        if self.spec is None:
            return EncoderChoice(label=label, name=self.name, kwargs={**(self.kwargs or {}), key: value})
        spec = copy.deepcopy(self.spec)
        inner = spec
        while isinstance((inner.get("init_args") or {}).get("encoder"), dict):
            inner = inner["init_args"]["encoder"]
        inner["init_args"] = {**(inner.get("init_args") or {}), key: value}
        return EncoderChoice(label=label, spec=spec)


def expand_variants(choices: list[EncoderChoice], vary: list[str]) -> list[EncoderChoice]:
    """Every choice once per combination of the ``--vary KEY=[v1, v2, ...]`` values."""
    for item in vary:
        key, sep, values = item.partition("=")
        values = yaml.safe_load(values) if sep else None
        if not key or not isinstance(values, list) or not values:
            raise SystemExit(f"emf probe: --vary expects KEY=[v1, v2, ...], got {item!r}")
        choices = [choice.with_arg(key.strip(), value) for choice in choices for value in values]
    return choices


def recommendation_score(metrics: dict[str, Any]) -> float | None:
    """The ``RECOMMEND_KEY`` score of a row (None when the probe set has none, or it is NaN)."""
    value = metrics.get(RECOMMEND_KEY)
    return float(value) if isinstance(value, (int, float)) and value == value else None


def print_recommendation_table(results: dict[str, dict[str, Any]], k: int, console) -> None:
    """One row per setting: the ranked score, then the context scores, raw / standardised side by side."""
    from rich.table import Table

    headers = {key: header.replace("@k", f"@{k}") for key, header in TABLE_COLUMNS}
    table = Table(title=f"Ranked by {headers.get(RECOMMEND_KEY, RECOMMEND_KEY)} (raw / standardised per channel)")
    table.add_column("setting")
    for key in (RECOMMEND_KEY, *CONTEXT_KEYS):
        table.add_column(headers.get(key, key), justify="right")
    for label, res in results.items():
        if label.endswith(STANDARDIZED_SUFFIX):
            continue
        std = results.get(label + STANDARDIZED_SUFFIX, {"metrics": {}})["metrics"]
        cells = [f"{_fmt(res['metrics'].get(key))} / {_fmt(std.get(key))}" for key in (RECOMMEND_KEY, *CONTEXT_KEYS)]
        table.add_row(label, *cells)
    console.print(table)


def recommend(results: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """The best-scoring row as ``{label, score, config}``; config is the ``model:`` section to paste."""
    scored = [(recommendation_score(r["metrics"]), label) for label, r in results.items()]
    scored = [(score, label) for score, label in scored if score is not None]
    if not scored:
        return None
    score, label = max(scored)
    best = results[label]
    model: dict[str, Any] = {"encoder": best["spec"]}
    model["standardize_text"] = bool(best.get("standardized"))
    return {"label": label, "score": score, "keys": [RECOMMEND_KEY], "config": {"model": model}}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options of ``emf probe``."""
    p = argparse.ArgumentParser(
        prog="emf probe", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--encoder",
        default="all",
        help="registry name (llm, qwen3, t5, clip, minilm, bow, label), a comma-separated list, "
        "'all' (every encoder whose weights are present) or a YAML config with an encoder "
        "class_path (default: all)",
    )
    p.add_argument(
        "--encoder-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="keyword argument for registry encoders (YAML value), repeatable; e.g. max_length=64",
    )
    p.add_argument(
        "--data", default=None, help="WebDataset shards (path, brace pattern or comma list); default: the shapes world"
    )
    p.add_argument(
        "--vary",
        action="append",
        default=[],
        metavar="KEY=[V1, V2]",
        help="probe each encoder once per value of this constructor argument (YAML list), repeatable; "
        "e.g. 'layer=[8, 16, -1]' or 'chat_template=[false, true]'",
    )
    p.add_argument(
        "--standardize",
        action="store_true",
        help="also score each encoder's features standardised per channel (model.standardize_text)",
    )
    p.add_argument(
        "--recommend",
        action="store_true",
        help=f"implies --standardize; print the best row as config lines (ranked by {RECOMMEND_KEY})",
    )
    p.add_argument("--n", type=int, default=1000, help="captions in the retrieval pool (default 1000)")
    p.add_argument("--k", type=int, default=2, help="neighbours per query for retrieval (default 2)")
    p.add_argument("--group", type=int, default=2, help="paraphrases per shapes-world scene in the pool")
    p.add_argument(
        "--pairs", type=int, default=200, help="shapes-world scenes used for minimal pairs and reductions (default 200)"
    )
    p.add_argument(
        "--image-encoder",
        default="dinov2",
        choices=("dinov2", "clip", "pixels", "none"),
        help="image features that score retrieval on shards without scene specs (default dinov2)",
    )
    p.add_argument("--image-weights", default=None, help="local weights file for --image-encoder")
    p.add_argument("--batch-size", type=int, default=64, help="captions per encoder call")
    p.add_argument("--seed", type=int, default=0, help="probe-set seed")
    p.add_argument(
        "--feature-cache",
        default=None,
        metavar="DIR",
        help="keep text features in this FeatureCache root, so a rerun does not re-encode",
    )
    p.add_argument("--out", default=None, help="output folder (default runs/probe/<encoder>)")
    p.add_argument("--no-figure", action="store_true", help="skip the PNG figure")
    return p.parse_args(argv)


def _spec_from_yaml(path: Path) -> dict[str, Any]:
    """The encoder ``{class_path, init_args}`` a YAML file names, following its ``extends`` chain."""
    spec = encoder_spec_in(path)
    if spec is None:
        raise SystemExit(
            f"emf probe: no encoder class_path found in {path} or the configs it extends (looked at the top level, "
            "'encoder', 'model.init_args.encoder' and 'model.encoder')"
        )
    return spec


def resolve_encoders(arg: str, kwargs: dict[str, Any], say) -> tuple[list[EncoderChoice], dict[str, str]]:
    """Turn ``--encoder`` into encoders to probe, and {name: reason} for those skipped: with 'all', every
    registry encoder whose weights are not on this machine is skipped, and ``say`` tells the user."""
    if arg.endswith((".yaml", ".yml")):
        path = Path(arg)
        if not path.is_file():
            raise SystemExit(f"emf probe: config {arg} not found")
        spec = _spec_from_yaml(path)
        return [EncoderChoice(label=path.stem, spec=spec)], {}
    from emf_lightning.encoders import ENCODERS

    if arg != "all":
        names = [n.strip() for n in arg.split(",") if n.strip()]
        unknown = [n for n in names if n not in ENCODERS]
        if unknown:
            raise SystemExit(
                f"emf probe: unknown encoder {', '.join(unknown)}; choose from "
                f"{', '.join(ENCODERS)}, 'all' or a YAML config"
            )
        return [EncoderChoice(label=n, name=n, kwargs=kwargs) for n in names], {}
    chosen, skipped, seen = [], {}, set()
    for name, cls in ENCODERS.items():
        if cls in seen or name == "precomputed":  # aliases once; a cache folder is no model to compare
            continue
        seen.add(cls)
        if cls.weights_available(**kwargs):
            chosen.append(EncoderChoice(label=name, name=name, kwargs=kwargs))
        else:
            skipped[name] = "pretrained weights not found on this machine"
            say(f"skip {name}: {skipped[name]}")
    return chosen, skipped


def _fmt(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.1f}" if abs(value) >= 10 else f"{value:.3f}"


def _edit_kinds(results: dict[str, dict[str, Any]]) -> list[str]:
    """The minimal-pair edit kinds any row has an accuracy for, sorted."""
    prefix = "minimal_pairs/accuracy/"
    return sorted({key[len(prefix) :] for res in results.values() for key in res["metrics"] if key.startswith(prefix)})


def print_tables(results: dict[str, dict[str, Any]], k: int, console) -> None:
    """The summary table (one row per encoder) and per-edit minimal-pair accuracy."""
    from rich.table import Table

    table = Table(title=f"Discriminability probe (k={k})")
    table.add_column("encoder")
    table.add_column("dim", justify="right")
    for _, header in TABLE_COLUMNS:
        table.add_column(header.replace("@k", f"@{k}"), justify="right")
    table.add_column("s", justify="right")
    for label, res in results.items():
        m = res["metrics"]
        table.add_row(label, str(res["dim"]), *[_fmt(m.get(key)) for key, _ in TABLE_COLUMNS], f"{res['seconds']:.1f}")
    console.print(table)
    kinds = _edit_kinds(results)
    if kinds:
        per = Table(title="Minimal-pair accuracy per edit (pooled / token)")
        per.add_column("encoder")
        for kind in kinds:
            per.add_column(kind, justify="right")
        for label, res in results.items():
            m = res["metrics"]
            per.add_row(
                label,
                *[
                    f"{_fmt(m.get(f'minimal_pairs/accuracy/{kd}'))} / "
                    f"{_fmt(m.get(f'minimal_pairs_token/accuracy/{kd}'))}"
                    for kd in kinds
                ],
            )
        console.print(per)


def save_figure(results: dict[str, dict[str, Any]], histograms: dict[str, tuple], path: Path) -> None:
    """Same-scene vs different-scene cosine histograms per encoder, and minimal-pair accuracy per edit.
    Raises MissingExtraError without matplotlib (the `plot` extra)."""
    matplotlib = require("matplotlib", extra="plot", purpose="The probe figure")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    labels = list(results)
    cols = max(1, len(labels))
    fig = plt.figure(figsize=(3.6 * cols + 1, 6.4))
    grid = fig.add_gridspec(2, cols)
    for j, label in enumerate(labels):
        ax = fig.add_subplot(grid[0, j])
        same, diff = histograms[label]
        lo = float(min(same.min() if len(same) else 1.0, diff.min() if len(diff) else 1.0))
        bins = np.linspace(min(lo, 0.0), 1.0, 41)
        if len(diff):
            ax.hist(diff, bins=bins, density=True, alpha=0.6, label="different scene")
        if len(same):
            ax.hist(same, bins=bins, density=True, alpha=0.6, label="same scene")
        auc = results[label]["metrics"].get("same_scene_auc")
        ax.set_title(f"{label}" + (f"  AUC {auc:.3f}" if auc is not None else ""), fontsize=10)
        ax.set_xlabel("cosine (mean-pooled)")
        if j == 0:
            ax.set_ylabel("density")
            ax.legend(fontsize=8)
    kinds = _edit_kinds(results)
    bar = fig.add_subplot(grid[1, :])  # one grouped bar chart across the whole bottom row
    if kinds:
        width = 0.8 / len(labels)
        x = np.arange(len(kinds))
        for i, label in enumerate(labels):
            vals = [results[label]["metrics"].get(f"minimal_pairs/accuracy/{kd}", np.nan) for kd in kinds]
            bar.bar(x + i * width - 0.4 + width / 2, vals, width, label=label)
        bar.axhline(0.5, color="grey", lw=0.8, ls="--")
        bar.set_xticks(x, kinds, fontsize=8)
        bar.set_ylim(0, 1)
        bar.set_ylabel("minimal-pair accuracy")
        bar.set_title("edited scene farther than a paraphrase (pooled cosine); 0.5 = chance", fontsize=10)
        bar.legend(fontsize=8, ncol=len(labels))
    else:
        bar.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def standardized_encode(encode, captions: list[str]):
    """``encode`` followed by per-channel standardisation with statistics fitted on ``captions``' features:
    what ``model.standardize_text`` hands the generator's connector."""
    from emf_lightning.encoders.statistics import fit_channel_statistics, standardize_features

    mean, std = fit_channel_statistics(encode, captions)
    return lambda batch: standardize_features(encode(batch), mean, std)


def _counting(encode, advance, total: int, label: str):
    """``encode`` that also advances a progress bar by the number of captions it was given, and relabels it
    once all ``total`` are encoded (the metrics come next, under the same bar)."""

    def counted(captions: list[str]):
        out = encode(captions)
        advance(len(captions), description=f"metrics ({label})" if advance.completed + len(captions) >= total else None)
        return out

    return counted


def main(argv: list[str] | None = None) -> int:
    """Run the probe; returns the process exit code (0 ok, 2 nothing could be probed)."""
    args = parse_args(argv)
    from rich.console import Console

    # Piped or captured output has no terminal width; give the wide table room instead of eliding it.
    console = Console(width=None if sys.stdout.isatty() else 180)
    say = console.print
    if args.k < 1 or args.n < 2 * max(args.group, 1) or args.k >= args.n:
        raise SystemExit(
            f"emf probe: need 1 <= k < n and n >= 2 * group; got n={args.n}, k={args.k}, group={args.group}"
        )
    kwargs = key_value_args(args.encoder_arg, "emf probe: --encoder-arg", SystemExit)
    choices, skipped = resolve_encoders(args.encoder, kwargs, say)
    if not choices:
        say("emf probe: no encoder to probe (none has its weights here)")
        return 2
    out = Path(
        args.out
        or f"runs/probe/{Path(args.encoder).stem if args.encoder.endswith(('.yaml', '.yml')) else args.encoder.replace(',', '+')}"
    )
    out.mkdir(parents=True, exist_ok=True)

    from emf_lightning.encoders.cache import FeatureCache
    from emf_lightning.probe.evaluation import evaluate_probe
    from emf_lightning.probe.sets import shapes_probe_set, shard_probe_set

    t0 = time.perf_counter()
    if args.data:
        shards = args.data.split(",") if "," in args.data and "{" not in args.data else args.data
        probe = shard_probe_set(
            shards,
            n=args.n,
            image_encoder=None if args.image_encoder == "none" else args.image_encoder,
            image_weights=args.image_weights,
        )
    else:
        probe = shapes_probe_set(n=args.n, group=args.group, seed=args.seed, n_pairs=args.pairs, n_reduce=args.pairs)
    say(
        f"probe set {probe.name}: {len(probe.captions)} retrieval captions, {len(probe.reduced)} reductions, "
        f"{len(probe.anchors)} minimal pairs ({time.perf_counter() - t0:.1f} s); relevance: {probe.relevance_source}"
    )
    for note in probe.notes:
        say(f"note: {note}")

    choices = expand_variants(choices, args.vary)
    standardize = args.standardize or args.recommend
    results: dict[str, dict[str, Any]] = {}
    histograms: dict[str, tuple] = {}
    for choice in choices:
        start = time.perf_counter()
        try:
            encoder = choice.build()
        except (MissingWeightsError, MissingExtraError) as err:
            if args.encoder == "all":
                skipped[choice.label] = str(err)
                say(f"skip {choice.label}: {err}", markup=False)  # messages hold [extra] brackets
                continue
            console.print(f"emf probe: {err}", markup=False)
            return 2
        n_captions = len(probe.all_captions())
        say(f"encoding {n_captions} captions with {choice.label} ({encoder.cache_key}) ...")
        # in memory without --feature-cache: standardising re-encodes the same captions
        cache = FeatureCache(encoder, root=args.feature_cache)
        row = {"dim": encoder.dim, "cache_key": encoder.cache_key, "spec": choice.config_spec()}

        def score(label: str, encode, extra: dict[str, Any], start: float) -> None:
            result = evaluate_probe(probe, encode, k=args.k, batch_size=args.batch_size, seed=args.seed)
            results[label] = {**row, **extra, "seconds": time.perf_counter() - start, "metrics": result.metrics}
            histograms[label] = (result.same_scene_cosines.numpy(), result.different_scene_cosines.numpy())

        with progress(f"encoding ({choice.label})", total=n_captions) as advance:
            score(choice.label, _counting(cache.encode, advance, n_captions, choice.label), {}, start)
        cache.save()  # nothing to write for an in-memory cache
        if standardize:
            encode = standardized_encode(cache.encode, probe.all_captions())
            score(choice.label + STANDARDIZED_SUFFIX, encode, {"standardized": True}, time.perf_counter())
        del encoder
    if not results:
        say("emf probe: every requested encoder was skipped")
        return 2

    print_tables(results, args.k, console)
    best = recommend(results) if args.recommend else None
    if args.recommend:
        print_recommendation_table(results, args.k, console)
    if best is not None:
        say(f"recommended: {best['label']} ({RECOMMEND_KEY} {best['score']:.3f}); config:")
        print(yaml.safe_dump(best["config"], sort_keys=False).rstrip())
    report = {
        "command": "emf probe " + " ".join(sys.argv[2:] if argv is None else argv),
        "args": vars(args),
        "probe_set": probe.summary(),
        "encoders": results,
        "skipped": skipped,
        "recommendation": best,
    }
    (out / "probe.json").write_text(json.dumps(report, indent=2, sort_keys=False))
    written = [out / "probe.json"]
    if not args.no_figure:
        try:
            save_figure(results, histograms, out / "probe.png")
            written.append(out / "probe.png")
        except MissingExtraError as err:  # the numbers are written; only the picture is missing
            say(f"figure skipped: {err}", markup=False)
    say("wrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
