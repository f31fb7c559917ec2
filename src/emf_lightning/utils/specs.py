"""Objects that can be saved as ``{"class_path", "init_args"}`` and rebuilt from it.

Checkpoints keep how to rebuild the text encoder, the backbone and the loss (plain data, loadable with
``torch.load(weights_only=True)``), never a pickled object. A class opts in by deriving from
:class:`RecordsInitArgs`: the outermost ``__init__`` call records its arguments in ``self.init_args``.
:func:`to_spec` turns such an object (recursively) into plain data, :func:`build` turns the data back into the
object. The same ``{"class_path", "init_args"}`` shape is what the YAML configs write (jsonargparse).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import os
from collections.abc import Mapping
from typing import Any, TypeVar

import torch

T = TypeVar("T")
_SKIP_KINDS = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)


class RecordsInitArgs:
    """Mixin: ``self.init_args`` holds the constructor arguments of the outermost ``__init__`` call.

    Each subclass's ``__init__`` is wrapped once, at class creation; a subclass calling ``super().__init__``
    does not overwrite what the outermost call recorded, and defaults are filled in, so the recorded arguments
    rebuild exactly this object.
    """

    init_args: dict[str, Any]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is None:
            return
        signature = inspect.signature(init)

        @functools.wraps(init)
        def recording_init(self: Any, *args: Any, **kw: Any) -> None:
            outermost = "_recording_init" not in self.__dict__
            if outermost:
                self.__dict__["_recording_init"] = True
            try:
                init(self, *args, **kw)
            finally:
                if outermost:
                    del self.__dict__["_recording_init"]
            if outermost:
                bound = signature.bind(self, *args, **kw)
                bound.apply_defaults()
                self.__dict__["init_args"] = {
                    k: absolute_if_local_folder(v) if k in FOLDER_ARGUMENTS else v
                    for k, v in bound.arguments.items()
                    if k != "self" and signature.parameters[k].kind not in _SKIP_KINDS
                }

        cls.__init__ = recording_init  # type: ignore[method-assign]


# Constructor arguments that name a model folder (or a hub id): recorded as absolute paths when they are local
# relative folders, so a checkpoint or an export loads from any working directory.
FOLDER_ARGUMENTS = ("model",)


def absolute_if_local_folder(value: Any) -> Any:
    """A relative path to an existing folder -> its absolute path; anything else (hub ids...) unchanged."""
    if isinstance(value, str) and value and not os.path.isabs(value) and os.path.isdir(value):
        return os.path.abspath(value)
    return value


def class_path(obj_or_cls: Any) -> str:
    """``package.module.Class`` of an object or class."""
    cls = obj_or_cls if isinstance(obj_or_cls, type) else type(obj_or_cls)
    return f"{cls.__module__}.{cls.__qualname__}"


def is_plain(value: Any) -> bool:
    """JSON-like data only: what a checkpoint's hyper-parameters may hold to stay loadable with weights_only."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (list, tuple)):
        return all(is_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and is_plain(v) for k, v in value.items())
    return False


def to_plain(value: Any) -> Any:
    """Recorded objects -> specs, tuples -> lists, torch dtypes/devices -> strings; other values unchanged."""
    if isinstance(value, RecordsInitArgs):
        return to_spec(value)
    if isinstance(value, (torch.dtype, torch.device)):
        return str(value).removeprefix("torch.")
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    return value


def to_spec(obj: Any) -> dict[str, Any]:
    """``{"class_path", "init_args"}`` that rebuilds ``obj`` (a spec dict is returned as it is).

    Arguments that are not plain data even after conversion are left out (their defaults apply on rebuild)
    and listed under ``"unrecorded"``.
    """
    if isinstance(obj, dict):
        return obj
    recorded = getattr(obj, "init_args", None)
    if not isinstance(recorded, dict):
        raise TypeError(f"{type(obj).__name__} does not record its constructor arguments (derive from RecordsInitArgs)")
    init_args: dict[str, Any] = {}
    unrecorded: list[str] = []
    for name, value in recorded.items():
        value = to_plain(value)
        if is_plain(value):
            init_args[name] = value
        else:
            unrecorded.append(name)
    spec: dict[str, Any] = {"class_path": class_path(obj), "init_args": init_args}
    if unrecorded:
        spec["unrecorded"] = unrecorded
    return spec


def import_class(path: str) -> type:
    """The class named by a dotted path; a clear error when it does not exist."""
    if not isinstance(path, str) or "." not in path:
        raise ValueError(f"expected a dotted class_path such as 'emf_lightning.meanflow.MeanFlowLoss', got {path!r}")
    module_name, _, name = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name, None)
    except ModuleNotFoundError as err:
        raise ValueError(f"class_path {path!r}: module {module_name!r} cannot be imported ({err})") from err
    if not isinstance(cls, type):
        raise ValueError(f"class_path {path!r} does not name a class")
    return cls


def resolve_class(
    name: str, expected: type[T], registry: Mapping[str, type] | None = None, kind: str | None = None
) -> type[T]:
    """A registry name (``registry``) or a dotted class path -> a subclass of ``expected``: the one class lookup of
    specs, encoders and autoencoders. ``kind`` names the registry in the error for an unknown name."""
    if registry is not None and name in registry:
        return registry[name]
    if registry is not None and (not isinstance(name, str) or "." not in name):
        raise ValueError(f"unknown {kind or expected.__name__} {name!r}; registered: {', '.join(sorted(registry))}")
    cls = import_class(name)
    if not issubclass(cls, expected):
        raise ValueError(f"class_path {name!r} does not name a subclass of {expected.__name__}")
    return cls


def build(spec: Any, expected: type[T]) -> T:
    """Instantiate ``{"class_path", "init_args"}`` (nested specs too); an instance of ``expected`` passes through.

    Only subclasses of ``expected`` are built (nested specs: subclasses of :class:`RecordsInitArgs`), so a
    checkpoint cannot name an arbitrary callable.
    """
    if isinstance(spec, expected):
        return spec
    if not isinstance(spec, dict) or "class_path" not in spec:
        raise TypeError(f"expected a {expected.__name__} or a {{class_path, init_args}} dict, got {spec!r}")
    cls = resolve_class(spec["class_path"], expected)
    init_args = {k: _build_nested(v) for k, v in dict(spec.get("init_args") or {}).items()}
    return cls(**init_args)


def _build_nested(value: Any) -> Any:
    if isinstance(value, dict) and "class_path" in value:
        return build(value, RecordsInitArgs)
    return value
