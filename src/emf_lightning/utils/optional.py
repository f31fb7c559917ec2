"""Optional dependencies: import them where one path needs them, and say which extra to install if absent.

``require("matplotlib", extra="plot", purpose="the probe figure")`` returns the module, or raises
:class:`MissingExtraError` (an ``ImportError``) whose one-line message names the package, what needs it and
the command that installs it: ``pip install 'emf-lightning[plot]'``. The extras live in ``pyproject.toml``;
``tests/test_dependencies.py`` checks that every ``require`` call names an extra that provides its module.
"""

from __future__ import annotations

import importlib
from types import ModuleType

DISTRIBUTION = "emf-lightning"


class MissingExtraError(ImportError):
    """An optional package is not installed; the message says which extra provides it."""

    def __init__(self, module: str, extra: str, purpose: str):
        self.module, self.extra, self.purpose = module, extra, purpose
        super().__init__(
            f"{purpose} needs the `{module}` package, which is not installed: pip install '{DISTRIBUTION}[{extra}]'",
            name=module,
        )


def install_hint(extra: str) -> str:
    """The command that installs one extra of this package."""
    return f"pip install '{DISTRIBUTION}[{extra}]'"


def require(module: str, extra: str, purpose: str) -> ModuleType:
    """Import ``module`` or raise :class:`MissingExtraError` naming ``extra`` (``purpose`` says who needs it)."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        # Only the module itself (or its top package) missing means "install the extra"; a module that is
        # installed but fails to import one of its own dependencies keeps its original error.
        if err.name is None or module.split(".")[0] != err.name.split(".")[0]:
            raise
        raise MissingExtraError(module, extra, purpose) from err
