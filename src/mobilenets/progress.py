"""Progress for work that takes more than a few seconds: the one place that draws it, with an ETA.

Library functions take ``log`` (a callable taking one line); a
:class:`Progress` sends its lines there.  The CLI's log is :func:`to_stderr`:
notes ("int8: preparing ...") go to stderr as lines; progress bars are drawn
in place on a terminal, and elsewhere (a log file, a pipe) only when asked
(``MOBILENETS_PROGRESS=1``), as a line every :data:`LINE_EVERY` seconds, so that
a log holds results rather than bars.  ``--quiet`` silences both.

A step that lasts long (an int8 calibration layer, a runtime's build, a training
step of a tiny epoch) would leave a bar frozen; a ticker thread redraws the time
spent and the ETA while it runs.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Callable

# how often a bar is redrawn on a terminal, and how often a line is written elsewhere (when asked)
REDRAW_EVERY = 0.5
LINE_EVERY = 5.0
# the environment variable that asks for progress lines where stderr is not a terminal
ASK = "MOBILENETS_PROGRESS"
WIDTH = 20


def duration(seconds: float) -> str:
    """``seconds`` as a person reads it: 7 s, 2 min 05 s, 1 h 03 min."""
    s = int(round(max(seconds, 0.0)))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s // 60 % 60:02d} min"


def bar(done: float, total: float, width: int = WIDTH) -> str:
    filled = int(width * min(max(done / total, 0.0), 1.0)) if total > 0 else 0
    return "[" + "#" * filled + "." * (width - filled) + "]"


def eta(done: float, total: float, elapsed: float) -> float | None:
    """Seconds left at the rate so far (``elapsed`` per ``done``); None before any work is done."""
    if done <= 0 or total <= 0:
        return None
    return max(total - done, 0.0) * elapsed / done


class Stderr:
    """The CLI's ``log``: notes as lines; :meth:`bar` redraws in place on a terminal, else writes lines when
    asked (``MOBILENETS_PROGRESS=1``) and nothing otherwise."""

    def __init__(self, stream=None, *, lines: bool | None = None):
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.lines = (os.environ.get(ASK, "") not in ("", "0")) if lines is None else lines
        self._open = False  # a bar is drawn on the current line
        self._lock = threading.Lock()

    @property
    def shows_bars(self) -> bool:
        return self.tty or self.lines

    def __call__(self, line: str) -> None:
        with self._lock:
            self._close()
            self.stream.write(line + "\n")
            self.stream.flush()

    def bar(self, line: str, final: bool = False) -> None:
        with self._lock:
            if self.tty:
                self.stream.write("\r" + line + "\x1b[K" + ("\n" if final else ""))
                self._open = not final
            elif self.lines:
                self.stream.write(line + "\n")
            self.stream.flush()

    def _close(self) -> None:
        if self._open:
            self.stream.write("\n")
            self._open = False


def to_stderr(quiet: bool = False) -> Stderr | None:
    """The log a command gives the library: None (nothing at all) with ``--quiet``."""
    return None if quiet else Stderr()


class _OnATerminal:
    """The default ``log`` of library calls that can run for minutes (``deploy.compile``, ``deploy.export``):
    stderr where it is a terminal (or ``MOBILENETS_PROGRESS=1`` asks), else nothing; pass ``log=None`` for
    silence anywhere."""

    def __repr__(self) -> str:
        return "ON_A_TERMINAL"


ON_A_TERMINAL = _OnATerminal()


def resolve(log):
    """``log`` as given, or for :data:`ON_A_TERMINAL` a :class:`Stderr` where bars would show, else None."""
    if log is not ON_A_TERMINAL:
        return log
    stderr = Stderr()
    return stderr if stderr.shows_bars else None


class Progress:
    """``done`` of ``total`` units of work (images, steps, or seconds a step is expected to take), with an ETA.

    ``with Progress("predict", 300, log, unit="images") as p: ... p.advance(32)``.
    ``expected=True``: one step whose typical length in seconds is ``total`` (a build, an export, as
    seen here before); its line shows the time spent against that.
    The first line is drawn at once (a user sees within a moment that work
    has started); then at most every :data:`REDRAW_EVERY` s on a terminal and
    every :data:`LINE_EVERY` s elsewhere, also while one step runs long; the last line
    says how long it took.  With ``log=None`` it draws nothing and costs nothing.
    A plain callable log (a library user's ``print``) gets the lines of a non-terminal.
    """

    def __init__(self, what: str, total: float, log: Callable[[str], None] | None, *, unit: str = "",
                 clock: Callable[[], float] = time.monotonic, every: float | None = None, ticker: bool = True,
                 expected: bool = False):
        self.what, self.total, self.unit = what, float(total), unit
        self.expected = expected  # total is the seconds one step is expected to take (as last seen here)
        self.done = 0.0
        self.clock = clock
        self.start = clock()
        sink = getattr(log, "bar", None)
        if log is None or (sink is not None and not getattr(log, "shows_bars", True)):
            self._draw = None
        else:
            self._draw = sink or (lambda line, final=False: log(line))
        tty = getattr(log, "tty", False)
        self.every = every if every is not None else (REDRAW_EVERY if tty else LINE_EVERY)
        self._last = -float("inf")
        self._stop = threading.Event()
        self._thread = None
        if self._draw is not None:
            self._show(force=True)
            if ticker:
                self._thread = threading.Thread(target=self._tick, daemon=True, name="mobilenets-progress")
                self._thread.start()

    def line(self) -> str:
        elapsed = self.clock() - self.start
        if self.expected:  # one step of known typical length: the time spent is the progress
            left = self.total - elapsed if elapsed < self.total else None
            return (f"{self.what}: {bar(elapsed, self.total)} {duration(elapsed)} spent, "
                    f"ETA {duration(left) if left is not None else '? (longer than the ' + duration(self.total) + ' it took before)'}")
        left = eta(self.done, self.total, elapsed)
        unit = f" {self.unit}" if self.unit else ""
        count = f"{self.done:g}/{self.total:g}{unit}" if self.unit else f"{100 * self.done / self.total:.0f}%" \
            if self.total > 0 else ""
        return (f"{self.what}: {bar(self.done, self.total)} {count}, {duration(elapsed)} spent, "
                f"ETA {duration(left) if left is not None else '?'}")

    def advance(self, n: float = 1) -> None:
        self.done = min(self.done + n, self.total) if self.total > 0 else self.done + n
        self._show()

    def _show(self, force: bool = False) -> None:
        now = self.clock()
        if self._draw is None or (not force and now - self._last < self.every):
            return
        self._last = now
        self._draw(self.line())

    def _tick(self) -> None:
        while not self._stop.wait(self.every):
            self._show()

    def close(self, note: str = "", *, stopped: bool = False) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._draw is not None:
            spent = duration(self.clock() - self.start)
            text = f"{self.what}: stopped after {spent}" if stopped else f"{self.what}: done in {spent}"
            self._draw(text + (f" ({note})" if note else ""), final=True)
            self._draw = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close(stopped=exc[0] is not None)  # the error that follows says why
