"""What an EMFModule checkpoint holds, by format version, and the converter from older versions.

Version 2 (this one) names the backbone and the loss by class (``{"class_path", "init_args"}``) and groups the
optimiser settings (``optim``). Version 1 (emf-lightning before the redesign) kept a flat list of 36 arguments
(``backbone_size``, ``time_mu``, ``lr``, ...); :func:`upgrade_hyperparameters` maps them one to one, so a
version-1 checkpoint loads, resumes and samples exactly as it did. The state-dict keys did not change.
"""

from __future__ import annotations

from typing import Any

FORMAT_VERSION = 2
FORMAT_KEY = "emf_format_version"


class CheckpointFormatError(ValueError):
    """A checkpoint written by a newer (or unknown) version of emf-lightning."""


def checkpoint_version(checkpoint: dict[str, Any]) -> int:
    """The format version of a loaded checkpoint dict (1 for checkpoints written before versions existed)."""
    return int(checkpoint.get(FORMAT_KEY, 1))


def module_hyperparameters(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """EMFModule's constructor arguments saved in ``checkpoint``, in the current format.

    Raises:
        CheckpointFormatError: for a checkpoint of a newer format than this installation reads.
    """
    version = checkpoint_version(checkpoint)
    hparams = dict(checkpoint.get("hyper_parameters") or {})
    for key in ("_instantiator", "_class_path"):
        hparams.pop(key, None)
    if version > FORMAT_VERSION:
        raise CheckpointFormatError(
            f"this checkpoint has emf-lightning checkpoint format {version}; this installation reads formats "
            f"1-{FORMAT_VERSION}: upgrade emf-lightning (pip install -U emf-lightning)"
        )
    if version == 1 or "backbone_size" in hparams:
        hparams = upgrade_hyperparameters(hparams)
    backbone = hparams.get("backbone")
    if isinstance(backbone, dict) and isinstance(backbone.get("init_args"), dict):
        owner = str(backbone.get("class_path", "")).rpartition(".")[2]
        hparams["backbone"] = {**backbone, "init_args": without_retired(owner, backbone["init_args"])}
    return hparams


# Constructor arguments removed after checkpoints recorded them: {class: {argument: the value that behaves as the
# code does now}}. A checkpoint holding that value loads without it; another value would change the run: refused.
RETIRED_INIT_ARGS: dict[str, dict[str, Any]] = {
    "SanaMeanFlowBackbone": {"interval_scale": None},  # t - r is scaled like t
    "DiT": {"qk_norm": True},  # QK-norm always on
    "ShardDataModule": {"prefetch_factor": None, "caption_dropout": 0.0},  # dropout is the loss's cond_drop_prob
}


def without_retired(owner: str, init_args: dict[str, Any]) -> dict[str, Any]:
    """``init_args`` of class ``owner`` saved in a checkpoint, minus the retired arguments (see above)."""
    retired = RETIRED_INIT_ARGS.get(owner, {})
    changed = {k: v for k, v in init_args.items() if k in retired and v != retired[k]}
    if changed:
        raise CheckpointFormatError(
            f"this checkpoint sets {owner} options this version no longer has: {changed} "
            f"(only {dict((k, retired[k]) for k in changed)} loads)"
        )
    return {k: v for k, v in init_args.items() if k not in retired}


_LOSS_ARGS = ("adaptive_p", "adaptive_c", "guidance_omega", "guidance_kappa", "guidance_interval", "cond_drop_prob")
_TIME_ARGS = {
    "time_distribution": "distribution",
    "time_mu": "mu",
    "time_sigma": "sigma",
    "neq_ratio": "neq_ratio",
    "one_step_share": "one_step_share",
}
_OPTIM_ARGS = ("lr", "betas", "weight_decay", "warmup_steps", "lr_decay", "min_lr_ratio", "schedule_steps", "ema_decay")
_KEPT_ARGS = ("encoder", "init_from", "feature_cache_dir", "use_feature_cache", "sample_steps", "cfg_scale", "seed")
# Version-1 arguments that selected between JVP implementations: the one production path replaced them.
_RETIRED_ARGS = ("selective_jvp", "jvp_strategy")


def upgrade_hyperparameters(v1: dict[str, Any]) -> dict[str, Any]:
    """Version-1 flat hyper-parameters -> version-2 constructor arguments (same model, loss and schedule)."""
    from emf_lightning.models.generator import BACKBONES

    known = {
        "backbone_size",
        "image_size",
        "in_channels",
        "patch_size",
        "backbone_overrides",
        "objective",
        "jvp_tangent",
        *_LOSS_ARGS,
        *_TIME_ARGS,
        *_OPTIM_ARGS,
        *_KEPT_ARGS,
        *_RETIRED_ARGS,
    }
    unknown = sorted(set(v1) - known)
    if unknown:
        raise CheckpointFormatError(
            f"unrecognised version-1 hyper-parameters {unknown}: cannot convert this checkpoint"
        )
    name = v1.get("backbone_size", "tiny")
    if name not in BACKBONES:
        raise CheckpointFormatError(f"version-1 checkpoint names an unknown backbone_size {name!r}")
    cls, preset = BACKBONES[name]
    backbone_args = {"preset": preset, "input_size": v1.get("image_size", 32), "in_channels": v1.get("in_channels", 3)}
    if v1.get("patch_size") is not None:
        backbone_args["patch_size"] = v1["patch_size"]
    backbone_args.update(v1.get("backbone_overrides") or {})

    time_args = {new: v1[old] for old, new in _TIME_ARGS.items() if old in v1}
    loss_args: dict[str, Any] = {k: v1[k] for k in _LOSS_ARGS if k in v1}
    loss_args["cond_drop_prob"] = v1.get("cond_drop_prob", 0.1)  # version 1's module default
    loss_args["time_sampler"] = {"class_path": "emf_lightning.meanflow.TimeSampler", "init_args": time_args}
    objective = v1.get("objective", "meanflow")
    if objective == "meanflow":
        loss_args["jvp_tangent"] = v1.get("jvp_tangent", "conditional")
        loss_class = "emf_lightning.meanflow.MeanFlowLoss"
    else:
        loss_class = "emf_lightning.meanflow.FlowMatchingLoss"

    out: dict[str, Any] = {k: v1[k] for k in _KEPT_ARGS if k in v1}
    out["backbone"] = {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": backbone_args}
    out["loss"] = {"class_path": loss_class, "init_args": loss_args}
    out["optim"] = {k: v1[k] for k in _OPTIM_ARGS if k in v1}
    return out
