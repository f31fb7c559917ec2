"""The package layering of docs/architecture.md: a package imports only from the layers below it (and itself),
and the installed package imports nothing from the tests folder."""

from __future__ import annotations

import ast
from pathlib import Path

import emf_lightning

ROOT = Path(emf_lightning.__file__).parent

# Lower number = lower layer; a module may import from a lower layer or from its own package.
LAYERS = {
    "utils": 0,
    "errors": 0,
    "encoders": 1,
    "autoencoders": 1,
    "models": 1,
    "data": 1,
    "shapes": 2,
    "meanflow": 3,
    "evaluation": 4,
    "probe": 4,
    "inference": 4,
    "training": 5,
    "checkpoint_io": 5,
    "callbacks": 6,
    "checkpoint_config": 6,
    "config_files": 6,
    "predict_writer": 6,
    "serve": 7,
    "dry_run": 7,
    "commands": 8,
    "lightning_cli": 8,
    "cli": 9,
    "__init__": 10,
}


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and not node.level:
            names.append(node.module or "")
        elif isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
    return names


def test_every_package_imports_only_from_the_layers_below_it():
    packages = {p.stem for p in ROOT.glob("*.py")} | {p.parent.name for p in ROOT.glob("*/__init__.py")}
    assert packages <= set(LAYERS), packages - set(LAYERS)
    upward = []
    for path in ROOT.rglob("*.py"):
        package = path.relative_to(ROOT).parts[0].removesuffix(".py")
        for name in _imports(path):
            if name.startswith("emf_lightning."):
                target = name.split(".")[1]
                if target != package and LAYERS[target] >= LAYERS[package]:
                    upward.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not upward, upward


def test_the_package_imports_nothing_from_the_tests_folder():
    for path in ROOT.rglob("*.py"):
        assert not {n.split(".")[0] for n in _imports(path)} & {"tests", "helpers", "conftest"}, path
        assert '/ "tests"' not in path.read_text(), f"{path} builds a path into the tests folder"
