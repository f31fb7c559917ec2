"""The ``emf`` command.

``emf fit|validate|test|predict`` are LightningCLI subcommands over :class:`EMFModule` and
:class:`ShardDataModule` (configs in ``configs/*.yaml``; the encoder is chosen by ``class_path``).
``emf sample|probe|shards|bench|cache-features`` dispatch to ``emf_lightning.commands.<name>.main(argv)``,
imported only when used.

``--ckpt PATH`` is accepted as a short alias of ``--ckpt_path PATH``. With a checkpoint, the model's
saved hyper-parameters (and the datamodule's, when saved) are used as a base config, so
``emf validate --ckpt run.ckpt`` needs no ``--config``; any ``--config`` or override given still wins (each saved
value it replaces is printed; a change of architecture is refused, see ``checkpoint_config.py``).

Errors the user can fix (``errors.UserInputError``: a bad config value, a missing or unreadable file, missing
pretrained weights) are printed as one line on stderr with exit code 2; ``--debug`` (anywhere on the command
line) or ``EMF_DEBUG=1`` shows their traceback. Every other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import sys
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

LIGHTNING_COMMANDS = {
    "fit": "Train a generator (LightningCLI: emf fit --config configs/smollm_shapes.yaml; --dry-run: describe only)",
    "validate": "Judge a checkpoint as its run did: loss, evaluation table, JSON, grid (emf validate --ckpt PATH)",
    "test": "Test loop on a checkpoint",
    "predict": "Generate images for the predict data",
}
EXTRA_COMMANDS = {
    "sample": "Write a prompt x step-count sample grid from a checkpoint",
    "probe": "Discriminability probe of a text encoder",
    "shards": "Write WebDataset shards (shapes world, image folder, JSONL/CSV)",
    "bench": "Benchmark the training step, sampling and data loading",
    "cache-features": "Precompute the text feature cache for a dataset",
    "cache-latents": "Encode shard images once with an autoencoder into shards with latents",
    "export": "Write a checkpoint's EMA generator as a loadable folder (safetensors, config, model card)",
    "serve": "A web page that draws as you type (one checkpoint or export, or two side by side)",
}


def usage() -> str:
    """The top-level help text listing every subcommand."""
    width = max(map(len, [*LIGHTNING_COMMANDS, *EXTRA_COMMANDS]))
    lines = [
        "usage: emf <command> [options]   (emf <command> --help for its options)",
        "",
        "one-step text-to-image generation with MeanFlow and pluggable text encoders",
        "",
        "training (LightningCLI):",
    ]
    lines += [f"  {name:<{width}}  {text}" for name, text in LIGHTNING_COMMANDS.items()]
    lines += ["", "tools:"]
    lines += [f"  {name:<{width}}  {text}" for name, text in EXTRA_COMMANDS.items()]
    return "\n".join(lines)


def command_module_name(command: str) -> str:
    """``cache-features`` -> ``emf_lightning.commands.cache_features``."""
    return "emf_lightning.commands." + command.replace("-", "_")


def run_extra_command(command: str, argv: list[str]) -> int:
    """Import ``emf_lightning.commands.<command>`` lazily and run its ``main(argv)``."""
    name = command_module_name(command)
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as err:
        if err.name != name:  # the command exists but one of its own imports is missing
            raise
        print(f"emf {command}: not available in this installation ({name} is missing).", file=sys.stderr)
        return 2
    result = module.main(argv)
    return int(result or 0)


def _rename_ckpt_alias(argv: list[str]) -> list[str]:
    out = []
    for arg in argv:
        if arg == "--ckpt":
            arg = "--ckpt_path"
        elif arg.startswith("--ckpt="):
            arg = "--ckpt_path=" + arg[len("--ckpt=") :]
        out.append(arg)
    return out


def _ckpt_path(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg == "--ckpt_path" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--ckpt_path="):
            return arg.split("=", 1)[1]
    return None


# Values of ckpt_path that Lightning resolves itself (``emf fit --ckpt_path last`` resumes the latest run).
LIGHTNING_CKPT_NAMES = ("last", "best", "hpc", "registry")
# Subcommands that judge a checkpoint: they also take the run's logger and evaluation callbacks from it.
JUDGING_COMMANDS = ("validate", "test")


def run_lightning(argv: list[str]) -> int:
    """Run a LightningCLI subcommand (``argv[0]`` is fit/validate/test/predict)."""
    import yaml

    from emf_lightning.checkpoint_config import config_from_checkpoint, read_checkpoint
    from emf_lightning.config_files import expand_config_args
    from emf_lightning.dry_run import DryRunFinished
    from emf_lightning.lightning_cli import EMFLightningCLI

    argv = _rename_ckpt_alias(argv)
    dry = argv[0] == "fit" and "--dry-run" in argv
    argv = [a for a in argv if a != "--dry-run"] if dry else argv
    ckpt = _ckpt_path(argv)
    with tempfile.TemporaryDirectory(prefix="emf-config-") as tmp:
        argv = expand_config_args(argv, Path(tmp))
        if ckpt is not None and not (ckpt in LIGHTNING_CKPT_NAMES or ckpt.startswith("registry:")):
            # the model (and data) sections saved in it; validate/test also its logger and evaluation callbacks
            base = config_from_checkpoint(read_checkpoint(ckpt), judging=argv[0] in JUDGING_COMMANDS)
            if base:
                cfg_path = Path(tmp) / "from_checkpoint.yaml"
                cfg_path.write_text(yaml.safe_dump(base))
                # First, so that the user's --config files and overrides take precedence.
                argv = [argv[0], "--config", str(cfg_path), *argv[1:]]
        with warnings.catch_warnings(), _quiet_lightning():
            # We pass argv explicitly (also when called as a console script); that is intended.
            warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter is intended.*")
            try:
                EMFLightningCLI(args=argv, dry_run=dry)
            except DryRunFinished:
                pass
    return 0


class _DropAdvertising(logging.Filter):
    """Lightning's "💡 Tip: try installing litlogger / litmodels" lines: advertising, not information."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Tip:" not in record.getMessage()


@contextlib.contextmanager
def _quiet_lightning():
    """Lightning's advertising tips and the deprecation warnings of the libraries underneath (nothing the user of
    ``emf`` can act on) are not shown; real warnings and Lightning's information lines are."""
    loggers = [
        logging.getLogger(name)
        for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")
    ]
    drop = _DropAdvertising()
    for logger in loggers:
        logger.addFilter(drop)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    # Under validate/test, the fit-time checkpoint callbacks are rightly absent.
    warnings.filterwarnings("ignore", message=".*callbacks used to create the checkpoint need to be provided.*")
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(drop)


def _user_errors() -> tuple[type[BaseException], ...]:
    """The exception types reported as one line (their messages say what to fix)."""
    from emf_lightning.errors import UserInputError
    from emf_lightning.utils.weights import MissingWeightsError

    return UserInputError, MissingWeightsError


def _debug_requested(argv: list[str]) -> tuple[bool, list[str]]:
    """``--debug`` anywhere (removed: no subcommand parser knows it) or ``EMF_DEBUG`` set to a true value."""
    flag = "--debug" in argv
    env = os.environ.get("EMF_DEBUG", "").strip().lower() not in ("", "0", "false", "no")
    return flag or env, [a for a in argv if a != "--debug"]


def dispatch(argv: list[str]) -> int:
    """Run the subcommand named by ``argv[0]``."""
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] == "--version":
        from emf_lightning import __version__

        print(f"emf-lightning {__version__}")
        return 0
    command = argv[0]
    if command in EXTRA_COMMANDS:
        return run_extra_command(command, argv[1:])
    if command in LIGHTNING_COMMANDS:
        return run_lightning(argv)
    print(f"emf: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``emf`` console script: one line and exit 2 for errors the user can fix."""
    debug, argv = _debug_requested(list(sys.argv[1:] if argv is None else argv))
    try:
        return dispatch(argv)
    except _user_errors() as err:
        if debug:
            raise
        name = f"emf {argv[0]}" if argv and (argv[0] in LIGHTNING_COMMANDS or argv[0] in EXTRA_COMMANDS) else "emf"
        print(f"{name}: error: {user_message(err)}", file=sys.stderr)
        return 2


WORKER_TRACEBACK = "Original Traceback (most recent call last)"


def user_message(err: BaseException) -> str:
    """The error's message on one line. An error raised in a DataLoader worker reaches us re-raised by torch with
    the worker's whole traceback as its message: keep the original message only (its last line)."""
    text = str(err)
    if WORKER_TRACEBACK in text:
        last = [line for line in text.splitlines() if line.strip()][-1]
        prefix = f"{type(err).__name__}: "
        text = last.split(prefix, 1)[1] if prefix in last else last
    return " ".join(text.split()) or type(err).__name__


if __name__ == "__main__":
    sys.exit(main())
