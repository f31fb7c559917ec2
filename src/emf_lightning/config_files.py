"""Composed YAML configs: a leaf config names its base with ``extends: <path>`` (relative to the leaf).

``emf fit --config configs/smollm_shapes.yaml`` then runs as LightningCLI would with
``--config configs/base/shapes_cpu.yaml --config <smollm_shapes.yaml without the extends key>``: later files
override earlier ones key by key (jsonargparse's merge), and command-line overrides come last.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from emf_lightning.errors import ConfigError

EXTENDS_KEY = "extends"


class ConfigCompositionError(ConfigError):
    """A config's ``extends`` chain is broken (missing file, cycle, not a mapping)."""


def config_chain(path: str | Path) -> list[tuple[Path, dict]]:
    """``[(file, content without extends), ...]`` from the root base to ``path``."""
    chain: list[tuple[Path, dict]] = []
    seen: set[Path] = set()
    current: Path | None = Path(path)
    while current is not None:
        current = current.resolve()
        if current in seen:
            raise ConfigCompositionError(f"config {path}: 'extends' forms a cycle through {current}")
        seen.add(current)
        if not current.is_file():
            raise ConfigCompositionError(f"config file not found: {current}")
        content = yaml.safe_load(current.read_text()) or {}
        if not isinstance(content, dict):
            raise ConfigCompositionError(f"config {current} must be a YAML mapping")
        base = content.pop(EXTENDS_KEY, None)
        chain.append((current, content))
        current = (current.parent / base) if base is not None else None
    return chain[::-1]


def expand_config_args(argv: list[str], scratch: Path) -> list[str]:
    """``argv`` with every ``--config FILE`` that extends a base replaced by its whole chain, base first.

    Files with an ``extends`` key are rewritten without it into ``scratch`` (jsonargparse rejects unknown keys).
    """
    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        value = None
        if arg == "--config" and i + 1 < len(argv):
            value, i = argv[i + 1], i + 2
        elif arg.startswith("--config="):
            value, i = arg.split("=", 1)[1], i + 1
        else:
            out.append(arg)
            i += 1
            continue
        chain = config_chain(value) if Path(value).is_file() else []
        if len(chain) <= 1:
            out += ["--config", value]
            continue
        for n, (file, content) in enumerate(chain):
            written = scratch / f"{n:02d}-{file.name}"
            written.write_text(yaml.safe_dump(content, sort_keys=False))
            out += ["--config", str(written)]
    return out


def composed_config(path: str | Path) -> dict:
    """The whole ``extends`` chain of ``path`` merged into one mapping, later files winning key by key (nested
    mappings merge, other values are replaced), as LightningCLI reads it."""

    def merge(base: dict, top: dict) -> dict:
        out = dict(base)
        for key, value in top.items():
            out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        return out

    merged: dict = {}
    for _, content in config_chain(path):
        merged = merge(merged, content)
    return merged


def encoder_spec_in(path: str | Path) -> dict | None:
    """The text encoder ``{class_path, init_args}`` a config file names (with its ``extends`` chain): at the top
    level, under ``encoder``, or under ``model.encoder`` / ``model.init_args.encoder`` of a training config.
    None when it names none."""
    cfg = composed_config(path)
    model = cfg.get("model") or {}
    for candidate in (cfg, cfg.get("encoder"), (model.get("init_args") or {}).get("encoder"), model.get("encoder")):
        if isinstance(candidate, dict) and "class_path" in candidate:
            return {"class_path": candidate["class_path"], "init_args": dict(candidate.get("init_args") or {})}
    return None
