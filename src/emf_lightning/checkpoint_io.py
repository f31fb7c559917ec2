"""Checkpoint files that are either the old complete file or the new complete file, never half of one.

Lightning's ``TorchCheckpointIO`` serialises into memory, writes a temporary file in ``$TMPDIR`` and moves it
onto the target (fsspec's transaction). When ``$TMPDIR`` is on another filesystem than the checkpoint folder (a
tmpfs, a node-local disk under a network mount) that move is a copy into the target itself, so a job killed
during the copy leaves a truncated ``last.ckpt`` where the previous good one was.

:class:`AtomicCheckpointIO` writes ``<target>.partial`` in the target's own folder, flushes it to disk and
renames it over the target with ``os.replace`` (atomic within one filesystem). A kill at any point leaves the
previous checkpoint intact under the target name, at worst beside a stale ``.partial`` file that the next save
of the same target overwrites. Remote paths (``s3://``...) keep Lightning's behaviour.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import torch
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.plugins import TorchCheckpointIO

PARTIAL_SUFFIX = ".partial"


def partial_path(path: str | Path) -> Path:
    """Where the checkpoint for ``path`` is written before it is renamed onto ``path``."""
    path = Path(path)
    return path.with_name(path.name + PARTIAL_SUFFIX)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` that writes local checkpoints beside the target and renames them into place."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        fs, local = url_to_fs(str(path))
        if storage_options is not None or not isinstance(fs, LocalFileSystem):
            super().save_checkpoint(checkpoint, path, storage_options=storage_options)
            return
        target = Path(local)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = partial_path(target)
        try:
            torch.save(checkpoint, partial)
            _fsync(partial)  # the data is on disk before the name points at it
            os.replace(partial, target)
        except BaseException:
            with contextlib.suppress(OSError):
                partial.unlink()
            raise
        with contextlib.suppress(OSError):  # the rename itself survives a power cut (not possible on Windows)
            _fsync(target.parent)


def use_atomic_checkpoint_io(strategy: Any) -> bool:
    """Give ``strategy`` an AtomicCheckpointIO when it uses Lightning's default ``TorchCheckpointIO``; a
    checkpoint plugin the user configured (async, remote...) is left alone. Returns whether it was replaced."""
    if type(strategy.checkpoint_io) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()
        return True
    return isinstance(strategy.checkpoint_io, AtomicCheckpointIO)
