"""Rich progress bars for long jobs, drawn only where someone watches them.

``with progress("writing shards", total=n) as advance: ... advance(k)`` shows a bar in the style of
Lightning's ``RichProgressBar`` (description, bar, done/total, elapsed and remaining time) and yields an
:class:`Advance`, which counts whatever it is given whether or not a bar is drawn. ``track(items, ...)``
wraps an iterable the same way.

The bar goes to stderr, so what a command prints on stdout (tables, URLs, JSON) is byte for byte the same
with or without it. It is drawn only when all of these hold:

* stderr is a terminal (rich's test, so ``FORCE_COLOR``/``TTY_COMPATIBLE`` work as rich documents);
* ``EMF_NO_PROGRESS`` is unset, empty or ``0``;
* this process is global rank 0 (Lightning's rank once it is running, else ``RANK``/``LOCAL_RANK``/...);
* the caller did not pass ``enabled=False``.

Inside a Lightning run, Lightning's own rich bar already holds the terminal: a bar started then joins that
display (rich nests live displays on one console) and disappears when it finishes, instead of fighting it.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterable, Iterator, Sized
from contextlib import contextmanager
from typing import Any, TypeVar

T = TypeVar("T")

DISABLE_ENV = "EMF_NO_PROGRESS"
# Where launchers put the process's global rank, in the order Lightning reads them.
_RANK_ENV = ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")


class Advance:
    """Counts finished items and moves the bar, if one is drawn. Thread-safe (the study advances it from
    worker threads).

    ``advance(n=1, description=None)``: ``n`` more items done; a ``description`` relabels the bar.
    """

    def __init__(self, bar: Any | None = None, task: Any | None = None):
        self._bar = bar
        self._task = task
        self._lock = threading.Lock()
        self.completed = 0

    @property
    def drawn(self) -> bool:
        """Whether a bar is on screen for this counter."""
        return self._bar is not None

    def __call__(self, n: int = 1, description: str | None = None) -> None:
        with self._lock:
            self.completed += int(n)
        if self._bar is not None:
            self._bar.update(self._task, advance=int(n), description=description)


def process_rank() -> int:
    """Global rank of this process: Lightning's once it has set one, else the launcher's variables, else 0."""
    # Read, never import: a command that does not use Lightning should not pay for importing it.
    rank_zero = sys.modules.get("lightning_utilities.core.rank_zero")
    rank = getattr(getattr(rank_zero, "rank_zero_only", None), "rank", None)
    if rank is not None:
        return int(rank)
    for var in _RANK_ENV:
        value = os.environ.get(var, "").strip()
        if value.isdigit():
            return int(value)
    return 0


def progress_allowed() -> bool:
    """False when ``EMF_NO_PROGRESS`` asks for no bars or this is not rank 0 (the terminal is checked later)."""
    if os.environ.get(DISABLE_ENV, "").strip() not in ("", "0"):
        return False
    return process_rank() == 0


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # replaced or closed streams
        return False


def _pick_console(console: Any | None) -> tuple[Any, bool]:
    """(console, joins a live display already on it). A live rich display (Lightning's bar) is joined;
    otherwise a fresh console on stderr."""
    from rich import get_console
    from rich.console import Console

    if console is not None:
        return console, bool(getattr(console, "_live_stack", None))
    shared = get_console()
    if getattr(shared, "_live_stack", None):  # rich has no public "is a live display running?"
        return shared, True
    return Console(stderr=True), False


def _columns() -> list[Any]:
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return [
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("•"),
        TimeRemainingColumn(),
    ]


@contextmanager
def progress(
    description: str,
    total: int | None = None,
    *,
    enabled: bool = True,
    console: Any | None = None,
    transient: bool | None = None,
) -> Iterator[Advance]:
    """A progress bar for one job; yields an :class:`Advance` (see the module docstring for when it draws).

    Args:
        description: what is being done ("writing shards"); ``advance(description=...)`` changes it.
        total: number of items, or None when unknown (the bar then pulses and counts).
        enabled: False switches the bar off whatever else holds (e.g. ``trainer.is_global_zero``).
        console: a rich ``Console`` to draw on (tests); default stderr, or the live display on screen.
        transient: remove the bar when done; default: only when it joined another live display.
    """
    if not (enabled and progress_allowed()):
        yield Advance()
        return
    target, nested = _pick_console(console)
    if not target.is_terminal:
        yield Advance()
        return
    from rich.errors import LiveError
    from rich.progress import Progress

    bar = Progress(
        *_columns(),
        console=target,
        transient=nested if transient is None else transient,
        # Printing to stdout while the bar is live: route it above the bar only when stdout is the terminal
        # too; a redirected stdout must receive its own bytes, not the bar's console.
        redirect_stdout=_isatty(sys.stdout),
        redirect_stderr=True,
    )
    task = bar.add_task(description, total=total)
    try:
        bar.start()
    except LiveError:  # a rich without nested live displays, and another one is running
        yield Advance()
        return
    try:
        yield Advance(bar, task)
    finally:
        bar.stop()


def counted(items: Iterable[T], advance: Advance) -> Iterator[T]:
    """Yield ``items``, advancing by one after each has been consumed."""
    for item in items:
        yield item
        advance()


def track(items: Iterable[T], description: str, total: int | None = None, **kwargs: Any) -> Iterator[T]:
    """Iterate ``items`` under a :func:`progress` bar, one step per item (``total`` defaults to ``len``)."""
    if total is None and isinstance(items, Sized):
        total = len(items)
    with progress(description, total, **kwargs) as advance:
        yield from counted(items, advance)
