"""utils/progress.py: bars only where someone watches (a terminal, rank 0, EMF_NO_PROGRESS unset), on stderr,
counting either way; a command's stdout and files are the same with and without them."""

from __future__ import annotations

import io
import threading

import pytest
from rich.console import Console

from emf_lightning.utils import progress as P


def terminal(buf: io.StringIO) -> Console:
    """A console that believes it is a terminal, writing into `buf`."""
    return Console(file=buf, force_terminal=True, width=100, color_system=None)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for var in (P.DISABLE_ENV, *P._RANK_ENV):
        monkeypatch.delenv(var, raising=False)


def test_a_drawn_bar_counts_and_shows_the_total():
    buf = io.StringIO()
    with P.progress("writing shards", total=5, console=terminal(buf)) as advance:
        assert advance.drawn
        for _ in range(3):
            advance()
        advance(2, description="writing shards (done)")
    assert advance.completed == 5
    text = buf.getvalue()
    assert "writing shards (done)" in text and "5/5" in text


def test_disabled_by_the_environment_draws_nothing_but_still_counts(monkeypatch):
    monkeypatch.setenv(P.DISABLE_ENV, "1")
    buf = io.StringIO()
    with P.progress("x", total=3, console=terminal(buf)) as advance:
        advance(3)
    assert not advance.drawn and advance.completed == 3 and buf.getvalue() == ""
    monkeypatch.setenv(P.DISABLE_ENV, "0")  # "0" means bars on
    with P.progress("x", total=1, console=terminal(buf)) as advance:
        advance()
    assert advance.drawn


def test_no_bar_off_a_terminal_or_when_the_caller_says_so():
    buf = io.StringIO()
    with P.progress("x", total=2, console=Console(file=buf, force_terminal=False)) as advance:
        advance(2)
    assert not advance.drawn and advance.completed == 2 and buf.getvalue() == ""
    with P.progress("x", total=2, console=terminal(buf), enabled=False) as advance:
        advance(2)
    assert not advance.drawn and buf.getvalue() == ""


def test_only_rank_zero_draws(monkeypatch):
    import sys

    # Before Lightning is imported: the launcher's variables decide.
    monkeypatch.delitem(sys.modules, "lightning_utilities.core.rank_zero", raising=False)
    monkeypatch.setenv("RANK", "1")
    assert P.process_rank() == 1 and not P.progress_allowed()
    monkeypatch.setenv("RANK", "0")
    assert P.progress_allowed()
    # Once Lightning runs, its rank wins (ddp_spawn processes get it from the strategy, not the environment).
    from lightning_utilities.core.rank_zero import rank_zero_only

    monkeypatch.setattr(rank_zero_only, "rank", 3, raising=False)
    assert P.process_rank() == 3
    buf = io.StringIO()
    with P.progress("x", total=1, console=terminal(buf)) as advance:
        advance()
    assert not advance.drawn and buf.getvalue() == ""


def test_track_yields_every_item_in_order_and_advances_from_threads():
    buf = io.StringIO()
    assert list(P.track(range(7), "items", console=terminal(buf))) == list(range(7))
    assert "7/7" in buf.getvalue()
    with P.progress("threads", total=400) as advance:  # not drawn here (pytest's stderr), counted all the same
        workers = [threading.Thread(target=lambda: [advance() for _ in range(100)]) for _ in range(4)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    assert advance.completed == 400


def test_the_bar_closes_when_the_job_fails():
    buf = io.StringIO()
    console = terminal(buf)
    with pytest.raises(RuntimeError, match="boom"):
        with P.progress("x", total=2, console=console) as advance:
            advance()
            raise RuntimeError("boom")
    assert not console._live_stack  # the live display was stopped, the terminal is free again


def test_emf_shards_stdout_and_shards_are_the_same_with_and_without_bars(tmp_path, monkeypatch, capsys):
    from emf_lightning.commands import shards

    argv = [
        "shapes",
        "--out",
        "out/train-%06d.tar",
        "--split",
        "train",
        "--n",
        "12",
        "--maxcount",
        "5",
        "--resolution",
        "16",
    ]
    bars = io.StringIO()
    monkeypatch.setattr(P, "_pick_console", lambda console: (terminal(bars), False))
    runs = {}
    for name in ("bars", "plain"):
        if name == "plain":
            monkeypatch.setenv(P.DISABLE_ENV, "1")
        (tmp_path / name).mkdir()
        monkeypatch.chdir(tmp_path / name)
        assert shards.main(argv) == 0
        runs[name] = capsys.readouterr()
    assert runs["bars"].out == runs["plain"].out
    assert runs["bars"].out.startswith("wrote 12 samples in 3 shard(s)")
    assert "writing shapes shards" in bars.getvalue() and "12/12" in bars.getvalue()
    for tar in sorted((tmp_path / "plain" / "out").glob("*.tar")):
        assert tar.read_bytes() == (tmp_path / "bars" / "out" / tar.name).read_bytes()


def test_bars_go_to_stderr_and_join_a_live_display_already_on_screen(monkeypatch):
    import rich
    from rich.live import Live

    console, nested = P._pick_console(None)
    assert console.stderr and not nested
    # Lightning's RichProgressBar runs a live display on rich's global console: a bar started during training
    # joins it (nested, removed when done) instead of drawing a second display over it.
    buf = io.StringIO()
    monkeypatch.setattr(rich, "_console", terminal(buf))
    with Live("training bar", console=rich.get_console(), auto_refresh=False):
        with P.progress("evaluation", total=2) as advance:
            assert advance.drawn
            advance(2)
        assert len(rich.get_console()._live_stack) == 1  # only the outer display is left
    assert "training bar" in buf.getvalue()
