"""A checkpoint's saved configuration against the command line: read, compare, refuse contradictions.

``emf validate|test|predict --ckpt X`` and ``emf fit --ckpt_path X`` start from the ``model:``/``data:``
sections saved in X (``cli.run_lightning`` feeds them to the parser as the first config file), and every
``--config`` or ``--key=value`` given on top wins. This module says what won: a *non-structural* key
(cfg_scale, lr, sample_steps, shard paths...) is an allowed override and is reported, ``saved -> new``; a
*structural* key (the generator's architecture, or the encoder class whose features it was trained on) cannot
change under a checkpoint's weights and is an error naming the key and both values.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from emf_lightning.errors import CheckpointError, InputNotFoundError

# Keys of EMFModule that fix the generator's weights (shapes) or what its output means: the backbone (its class
# and every constructor argument), the loss class (a flow-matching net sampled as MeanFlow gives wrong images),
# the encoder class (the features the generator was trained on), whether the connector standardises them and
# how many token refiner blocks and slot tokens it has, and whether the backbone reads the slots' names.
STRUCTURAL_MODEL_KEYS = (
    "backbone",
    "loss.class_path",
    "encoder.class_path",
    "standardize_text",
    "text_refiner_layers",
    "text_slots",
    "object_supervision",  # its training-only head is in the checkpoint's state dict
    "named_slots",
    "slot_layout",
    "slot_relations",
    "slot_count",
    "slot_pointer",
)
# Backbone arguments that change how it computes or trains, not its weights.
NON_STRUCTURAL_MODEL_KEYS = (
    "backbone.init_args.gradient_checkpointing",
    "backbone.init_args.dropout",
    "backbone.init_args.trainable",
)
_UNSET = "(not set)"
# Where checkpoints keep the run's logger and evaluation callbacks (``judging_config``).
JUDGING_CONFIG_KEY = "emf_judging_config"
# Callbacks that judge a model: what ``emf validate --ckpt`` rebuilds (checkpointing and probes are for fit).
JUDGING_CALLBACKS = ("EvaluationCallback",)
# What ``emf validate --ckpt`` judges with when the checkpoint predates JUDGING_CONFIG_KEY: the run's own
# logger kind, and every judge the evaluator has (each skipped with one warning when its weights are absent).
DEFAULT_JUDGING_CONFIG: dict[str, Any] = {
    "logger": {
        "class_path": "lightning.pytorch.loggers.CSVLogger",
        "init_args": {"save_dir": "runs", "name": "validate"},
    },
    "callbacks": [
        {
            "class_path": "emf_lightning.callbacks.evaluation.EvaluationCallback",
            "init_args": {"shapes_eval": True, "fid": True, "clip_score": True},
        }
    ],
}
_SPEC_BOOKKEEPING = ("unrecorded",)  # to_spec's note of arguments it could not record


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint's contents (tensors memory-mapped, nothing executed), refusing files that are missing,
    unreadable (truncated, a text file...) or not written by ``emf fit``."""
    import torch  # here, not at import: `emf --help` should not pay for torch

    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"checkpoint not found: {path}")
    # torch.save writes a zip archive whose directory is at the end: a truncated copy or another file fails here,
    # where torch.load would report an internal error (a KeyError for a text file).
    if not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"cannot read checkpoint {path}: it is not a complete torch.save archive (truncated, "
            "or another kind of file); pass a .ckpt written by `emf fit`"
        )
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # truncated zip, not a torch file, pickled code...: all "cannot read"
        reason = (str(err).strip().splitlines() or [""])[0]
        raise CheckpointError(
            f"cannot read checkpoint {path} ({type(err).__name__}: {reason}): it is truncated "
            "or not a checkpoint; pass a .ckpt written by `emf fit`"
        ) from err
    hparams = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    state = ckpt.get("state_dict") if isinstance(ckpt, dict) else None
    if (
        not isinstance(hparams, dict)
        or "encoder" not in hparams
        or not isinstance(state, dict)
        or not any(k.startswith("ema_generator.") for k in state)
    ):
        raise CheckpointError(
            f"{path} is not an emf-lightning checkpoint (no EMFModule hyper-parameters and EMA "
            "weights); pass a checkpoint written by `emf fit`"
        )
    return ckpt


def _section(hparams: Any) -> dict[str, Any]:
    if hasattr(hparams, "as_dict"):  # a jsonargparse Namespace: dict() of it would flatten keys to "a.b"
        hparams = hparams.as_dict()
    section = dict(hparams or {})
    for key in ("_instantiator", "_class_path"):  # LightningCLI bookkeeping, not init arguments
        section.pop(key, None)
    return section


def config_from_checkpoint(ckpt: dict[str, Any], judging: bool = False) -> dict[str, Any]:
    """The ``model:`` (and ``data:``, when saved) config sections held in a checkpoint's hyper-parameters;
    the model's in the current format whatever the checkpoint's (``training.checkpoint_format``).

    ``judging`` adds ``trainer:`` with the run's logger and evaluation callbacks (``judging_config``; for a
    checkpoint that predates them, DEFAULT_JUDGING_CONFIG): ``emf validate --ckpt`` alone judges as the run did.
    """
    from emf_lightning.training.checkpoint_format import module_hyperparameters, without_retired

    config: dict[str, Any] = {}
    model = module_hyperparameters(ckpt)
    if model:
        config["model"] = model
    data = _section(ckpt.get("datamodule_hyper_parameters"))
    if data:
        config["data"] = without_retired("ShardDataModule", data)
    if judging:
        recorded = ckpt.get(JUDGING_CONFIG_KEY) or {}
        config["trainer"] = {
            "logger": recorded.get("logger", DEFAULT_JUDGING_CONFIG["logger"]),
            # a run without an evaluation callback is still judged: validate's job is the judging
            "callbacks": recorded.get("callbacks") or DEFAULT_JUDGING_CONFIG["callbacks"],
        }
    return config


def judging_config(trainer_config: Any) -> dict[str, Any]:
    """The trainer's logger and judging callbacks (JUDGING_CALLBACKS) as plain data, ready for a config file.

    A logger given as ``true`` (Lightning's default, TensorBoard) or ``false`` is kept as is.
    """
    trainer = _plain(trainer_config or {})
    callbacks = trainer.get("callbacks") or []
    judging = [
        c
        for c in (callbacks if isinstance(callbacks, list) else [callbacks])
        if isinstance(c, dict) and str(c.get("class_path", "")).rsplit(".", 1)[-1] in JUDGING_CALLBACKS
    ]
    config: dict[str, Any] = {"callbacks": judging}
    if "logger" in trainer and trainer["logger"] is not None:
        config["logger"] = trainer["logger"]
    return config


def _plain(value: Any) -> Any:
    """Comparable plain data: namespaces and mappings become dicts, tuples become lists, class paths the
    defining module's (``emf_lightning.models.DiT`` and ``emf_lightning.models.dit.DiT`` are one class)."""
    if hasattr(value, "as_dict"):  # jsonargparse Namespace
        value = value.as_dict()
    if isinstance(value, dict):
        out = {str(k): _plain(v) for k, v in value.items()}
        if isinstance(out.get("class_path"), str):
            out["class_path"] = _canonical_class_path(out["class_path"])
        return out
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _canonical_class_path(path: str) -> str:
    from emf_lightning.utils.specs import class_path, import_class

    try:
        return class_path(import_class(path))
    except ValueError:  # not importable here: compared as written
        return path


def _flatten(value: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, item in value.items():
        name = f"{prefix}{key}"
        if isinstance(item, dict) and item:
            flat.update(_flatten(item, name + "."))
        else:
            flat[name] = item
    return flat


def differences(saved: dict[str, Any], given: Any) -> list[tuple[str, Any, Any]]:
    """``(key, saved, given)`` for every key whose value differs, nested keys dotted (``encoder.init_args.dim``);
    a nested key present on one side only shows ``(not set)`` on the other.

    A top-level key the checkpoint does not have at all (an argument added after it was written) takes its
    default, which overrides nothing, and is left out.
    """
    saved_plain = _plain(_section(saved))
    old = _flatten(saved_plain)
    new = {k: v for k, v in _flatten(_plain(_section(given))).items() if k.split(".", 1)[0] in saved_plain}
    keys = [k for k in old if k.rsplit(".", 1)[-1] not in _SPEC_BOOKKEEPING] + [k for k in new if k not in old]
    return [(k, old.get(k, _UNSET), new.get(k, _UNSET)) for k in keys if old.get(k, _UNSET) != new.get(k, _UNSET)]


def is_structural(key: str) -> bool:
    """Whether a (dotted) model key is one of STRUCTURAL_MODEL_KEYS or lies under one (and is not exempt)."""

    def under(keys: tuple[str, ...]) -> bool:
        return any(key == s or key.startswith(s + ".") for s in keys)

    return under(STRUCTURAL_MODEL_KEYS) and not under(NON_STRUCTURAL_MODEL_KEYS)


def check_overrides(ckpt: dict[str, Any], model_config: Any, data_config: Any, path: str | Path) -> list[str]:
    """Lines ``model.cfg_scale: 1.0 -> 3.0`` for every saved value the command line overrides.

    Raises CheckpointError naming each structural key the command line changes, with both values.
    """
    from emf_lightning.training.checkpoint_format import module_hyperparameters

    model_diff = differences(module_hyperparameters(ckpt), model_config)
    structural = [(k, old, new) for k, old, new in model_diff if is_structural(k)]
    if structural:
        clashes = "; ".join(
            f"model.{k} is {old!r} in the checkpoint but {new!r} on the command line" for k, old, new in structural
        )
        raise CheckpointError(
            f"{clashes}: the weights in {path} need the architecture they were trained with; drop "
            "the override (or train a new model to change it)"
        )
    lines = [f"model.{k}: {old!r} -> {new!r}" for k, old, new in model_diff]
    if data_config is not None and ckpt.get("datamodule_hyper_parameters"):
        lines += [
            f"data.{k}: {old!r} -> {new!r}"
            for k, old, new in differences(config_from_checkpoint(ckpt).get("data", {}), data_config)
        ]
    return lines


def saved_text_dim(state: dict[str, Any]) -> int | None:
    """Width of the text features the checkpoint's generator takes (its connector's input), if recorded."""
    weight = state.get("generator.connector.fc1.weight")
    return int(weight.shape[1]) if weight is not None and weight.ndim == 2 else None


def check_weights_fit(model: Any, ckpt: dict[str, Any], path: str | Path) -> None:
    """Refuse a model whose parameters do not have the checkpoint's shapes, before anything loads into it.

    The config-level check catches changed architecture keys; this one catches what only the built model shows,
    an encoder (same class, other arguments) whose feature width differs from the one the generator took.
    """
    saved: dict[str, Any] = ckpt["state_dict"]
    text_dim = saved_text_dim(saved)
    encoder_dim = getattr(getattr(model, "encoder", None), "dim", None)
    if text_dim is not None and encoder_dim is not None and encoder_dim != text_dim:
        raise CheckpointError(
            f"model.encoder gives features of width {encoder_dim}, but the generator in {path} was "
            f"trained on width {text_dim}: use the checkpoint's encoder (drop the --model.encoder "
            "overrides)"
        )
    rebuilt = set(ckpt.get("emf_rebuilt_keys") or [])  # frozen pretrained weights, rebuilt rather than saved
    mismatched = _shape_mismatches(((k, v) for k, v in model.state_dict().items() if k not in rebuilt), saved)
    if mismatched:
        name, have, want = mismatched[0]
        raise CheckpointError(
            f"the model built from this configuration does not fit the weights in {path}: {name} "
            f"is {have} here and {want} in the checkpoint ({len(mismatched)} such parameters); "
            "drop the overrides of the architecture"
        )


def _shape_mismatches(params: Iterable[tuple[str, Any]], saved: dict[str, Any]) -> list[tuple[str, str, str]]:
    out = []
    for name, value in params:
        want = saved.get(name)
        have_shape = tuple(value.shape)
        if want is None:
            out.append((name, f"shape {list(have_shape)}", "absent"))
        elif tuple(want.shape) != have_shape:
            out.append((name, f"shape {list(have_shape)}", f"shape {list(want.shape)}"))
    return out
