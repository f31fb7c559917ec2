"""Composed YAML configs: a leaf config names its base with ``extends: <path>`` (relative to the leaf).

``emf fit --config configs/smollm_shapes.yaml`` then runs as LightningCLI would with
``--config configs/base/shapes_cpu.yaml --config <smollm_shapes.yaml without the extends key>``: later files
override earlier ones key by key (jsonargparse's merge), and command-line overrides come last.

One exception to the key-by-key merge: where a later file or the command line names another ``class_path`` for
a component (the backbone, the encoder...), the earlier ``init_args`` of that component are dropped. jsonargparse
would keep every earlier argument the new class also accepts, so a base's DiT ``input_size: 64`` became the SANA
backbone's, and an LLM encoder's ``dtype`` and ``max_length`` a sentence encoder's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

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

    Files with an ``extends`` key are rewritten without it into ``scratch`` (jsonargparse rejects unknown keys),
    and so is every file whose ``init_args`` a later file or the command line makes stale by naming another
    class (see the module docstring).
    """
    out: list[str] = []
    files: list[tuple[int, Path, dict | None, bool]] = []  # (index in out, file, content, to be written)
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
            files.append((len(out) - 1, Path(value), chain[0][1] if chain else None, False))
            continue
        for file, content in chain:
            out += ["--config", str(file)]
            files.append((len(out) - 1, file, content, True))
    return _write_changed(out, files, scratch)


def _write_changed(out: list[str], files: list[tuple[int, Path, dict | None, bool]], scratch: Path) -> list[str]:
    """Drop stale model ``init_args`` (earlier ones of a component whose class a later file or the command line
    changes), then write every file that changed or comes from an ``extends`` chain into ``scratch``."""
    contents = [content for _, _, content, _ in files]
    changed = [write for _, _, _, write in files]
    # The class each model part has in each file: its own class_path, or the one an earlier file named.
    classes: list[dict[str, str]] = []
    for content in contents:
        classes.append({**(classes[-1] if classes else {}), **_class_paths(content or {})})
    for n, content in enumerate(contents):
        for key, name in _class_paths(content or {}).items():
            for m in range(n):
                changed[m] |= _drop_init_args_if_other_class(contents[m], classes[m].get(key), key, name)
    for key, name in command_line_class_paths(out).items():
        for m in range(len(files)):
            changed[m] |= _drop_init_args_if_other_class(contents[m], classes[m].get(key), key, name)
    for n, (index, file, content, _) in enumerate(files):
        if content is not None and changed[n]:
            written = scratch / f"{n:02d}-{file.name}"
            written.write_text(yaml.safe_dump(content, sort_keys=False))
            out[index] = str(written)
    return out


def _class_paths(content: dict, prefix: str = "") -> dict[str, str]:
    """``{"model.backbone": "emf_lightning.models.DiT", ...}``: every mapping (outside lists) naming a class."""
    found: dict[str, str] = {}
    for key, value in content.items():
        if not isinstance(value, dict):
            continue
        name = f"{prefix}{key}"
        if isinstance(value.get("class_path"), str):
            found[name] = value["class_path"]
        found.update(_class_paths(value, name + "."))
    return found


def _same_class(a: str, b: str) -> bool:
    """Class paths naming one class: compared by the class name (``models.DiT`` is ``models.dit.DiT``)."""
    return a.rsplit(".", 1)[-1] == b.rsplit(".", 1)[-1]


def _drop_init_args_if_other_class(content: dict | None, own: str | None, key: str, class_name: str) -> bool:
    """Remove ``init_args`` at dotted ``key`` of ``content`` when they belong to ``own``, a class other than
    ``class_name`` (or to no class named so far). Returns whether anything was removed.

    Only the model's components: a logger's ``name`` and ``save_dir`` rightly carry over to another logger."""
    if not key.startswith("model."):
        return False
    node = content
    for part in key.split("."):
        if not isinstance(node, dict) or not isinstance(node.get(part), dict):
            return False
        node = node[part]
    if "init_args" not in node or (own is not None and _same_class(own, class_name)):
        return False
    del node["init_args"]
    return True


def command_line_class_paths(argv: list[str]) -> dict[str, str]:
    """Classes named on the command line: ``--model.encoder.class_path X``, ``--model.encoder X`` or
    ``--model.encoder '{"class_path": X, ...}'`` (with or without ``=``) -> ``{"model.encoder": X}``."""
    found: dict[str, str] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if not arg.startswith("--") or arg == "--config":
            i += arg == "--config"
            continue
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i >= len(argv) or argv[i].startswith("--"):
                continue
            value, i = argv[i], i + 1
        if key.endswith(".class_path"):
            found[key[: -len(".class_path")]] = value
            continue
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            continue
        if isinstance(parsed, dict) and isinstance(parsed.get("class_path"), str):
            found[key] = parsed["class_path"]
        elif isinstance(parsed, str) and parsed[:1].isupper() and parsed.replace(".", "").replace("_", "").isalnum():
            found[key] = parsed  # a bare class name (``--model.encoder BagOfWordsEncoder``)
        elif isinstance(parsed, str) and "." in parsed and parsed.rsplit(".", 1)[-1][:1].isupper():
            found[key] = parsed  # a dotted class path
    return found


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


def key_value_args(
    pairs: Iterable[str], option: str, error: Callable[[str], BaseException] = ConfigError
) -> dict[str, Any]:
    """``KEY=VALUE`` strings of a repeatable command-line option (``--encoder-arg``, ``--vae-arg``) -> keyword
    arguments, each value parsed as YAML ('false', '64', '[1, 2]'); a pair without a key raises ``error``."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise error(f"{option} expects KEY=VALUE, got {pair!r}")
        out[key.strip()] = yaml.safe_load(value)
    return out


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
