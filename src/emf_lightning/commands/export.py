"""``emf export``: a checkpoint's EMA generator as a folder that loads with one call, without pickles.

    emf export --ckpt runs/.../last.ckpt --out exports/my-model
    python -c "from emf_lightning.inference import MeanFlowGenerator; \\
               m = MeanFlowGenerator.from_pretrained('exports/my-model'); print(m.generate(['a red circle']).shape)"

Writes ``config.json`` (the specs of encoder, backbone, loss and autoencoder, the sampling settings, the run's
step), ``model.safetensors`` (the EMA generator), ``README.md`` (a model card with the training configuration
and the run's latest evaluation metrics) and, for a diffusers backbone, ``transformer/`` (a folder diffusers
loads by itself).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from emf_lightning import __version__
from emf_lightning.errors import ConfigError


def build_parser() -> argparse.ArgumentParser:
    """Arguments of ``emf export``."""
    p = argparse.ArgumentParser(prog="emf export", description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", required=True, help="checkpoint written by `emf fit`")
    p.add_argument("--out", required=True, help="folder to write (must be empty or absent)")
    p.add_argument(
        "--metrics",
        default=None,
        help="evaluation metrics JSON for the model card (default: the "
        "newest <run>/eval/metrics-step*.json next to the checkpoint, when there is one)",
    )
    p.add_argument("--name", default=None, help="model name in the card (default: the output folder's name)")
    return p


def latest_metrics(ckpt: Path) -> Path | None:
    """The newest evaluation metrics file of the checkpoint's run (``<run>/checkpoints/x.ckpt`` -> ``<run>/eval``)."""
    for run in (ckpt.parent, ckpt.parent.parent):
        found = sorted((run / "eval").glob("metrics-step*.json"))
        if found:
            return found[-1]
    return None


def export(
    module: Any, out: Path, global_step: int, metrics: dict[str, Any] | None = None, name: str | None = None
) -> Path:
    """Write ``module``'s EMA generator to ``out`` (see the module docstring); returns ``out``."""
    from safetensors.torch import save_file

    from emf_lightning.inference import CONFIG_FILE, EXPORT_FORMAT, EXPORT_VERSION, WEIGHTS_FILE
    from emf_lightning.models.connector import connector_config

    out.mkdir(parents=True, exist_ok=True)
    hp = module.hparams
    net = module.ema_generator  # a module loaded from its checkpoint: whole, never sharded
    overrides = net.backbone.export_pretrained(out)
    state = {
        k: v.detach().cpu().contiguous()
        for k, v in net.state_dict().items()
        if overrides is None or not k.startswith("backbone.")
    }
    save_file(state, str(out / WEIGHTS_FILE))
    backbone = dict(hp["backbone"])
    if overrides is not None:
        backbone["init_args"] = {**backbone.get("init_args", {}), **overrides}
    config = {
        "format": EXPORT_FORMAT,
        "format_version": EXPORT_VERSION,
        "emf_lightning_version": __version__,
        "encoder": hp["encoder"],
        "backbone": backbone,
        **connector_config(hp),
        "loss": hp["loss"],
        "autoencoder": hp.get("autoencoder"),
        "backbone_folder": overrides.get("model") if overrides else None,
        "sample_steps": list(hp.get("sample_steps") or [1]),
        "cfg_scale": float(hp.get("cfg_scale", 1.0)),
        "global_step": int(global_step),
        "data_shape": list(module.data_shape),
    }
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=1))
    (out / "README.md").write_text(model_card(name or out.name, config, dict(hp), metrics))
    return out


def model_card(name: str, config: dict[str, Any], hparams: dict[str, Any], metrics: dict[str, Any] | None) -> str:
    """A README for the export: what it is, how to load it, how it was trained, how it scored."""
    import yaml

    loss = config["loss"]["class_path"].rsplit(".", 1)[-1]
    c, h, w = config["data_shape"]
    lines = [
        f"# {name}",
        "",
        f"A one-step text-to-image generator trained with emf-lightning {config['emf_lightning_version']} "
        f"({loss}, {config['global_step']} optimiser steps), exported with `emf export`. It models "
        f"{c}x{h}x{w} {'latents' if config['autoencoder'] else 'images'}; samples take "
        f"{', '.join(map(str, config['sample_steps']))} step(s) by default (cfg {config['cfg_scale']}).",
        "",
        "## Use",
        "",
        "```python",
        "from emf_lightning.inference import MeanFlowGenerator",
        "",
        f'model = MeanFlowGenerator.from_pretrained("{name}")',
        'images = model.generate(["a red circle left of a blue square"], steps=1, seed=0)  # [-1, 1]',
        "```",
        "",
        "The text encoder"
        + (" and the autoencoder" if config["autoencoder"] else "")
        + " load from their own weights (the Hugging Face cache or a local path), as named below.",
        "",
    ]
    if config.get("backbone_folder"):
        lines += [
            f"`{config['backbone_folder']}/` is a diffusers model folder; its second scalar input (guidance) "
            "is the interval t - r, times the model's time scale.",
            "",
        ]
    lines += [
        "## Training configuration",
        "",
        "```yaml",
        yaml.safe_dump({k: v for k, v in hparams.items() if not k.startswith("_")}, sort_keys=False).rstrip(),
        "```",
        "",
    ]
    if metrics:
        lines += ["## Evaluation", "", "| metric | value |", "|---|---|"]
        lines += [
            f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |"
            for k, v in sorted(_flat_metrics(metrics).items())
        ]
        lines.append("")
    return "\n".join(lines)


def _flat_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """The scalar entries of an evaluation metrics file (its ``metrics`` section when it has one)."""
    body = metrics.get("metrics", metrics)
    return {k: v for k, v in body.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from emf_lightning.checkpoint_config import read_checkpoint
    from emf_lightning.training import EMFModule

    ckpt, out = Path(args.ckpt), Path(args.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a folder: export into a new folder")
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"--out {out} exists and is not empty: export into a new folder")
    checkpoint = read_checkpoint(ckpt)
    module = EMFModule.load_from_checkpoint(ckpt, map_location="cpu")
    metrics_path = Path(args.metrics) if args.metrics else latest_metrics(ckpt)
    metrics = json.loads(metrics_path.read_text()) if metrics_path else None
    export(module, out, int(checkpoint.get("global_step", 0)), metrics, args.name)
    print(
        f"wrote {out} (config.json, model.safetensors, README.md"
        f"{', transformer/' if (out / 'transformer').is_dir() else ''})"
    )
    return 0
