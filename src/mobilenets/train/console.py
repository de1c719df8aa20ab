"""What the user sees and does at the terminal during a run: the progress line, Ctrl-C and SIGTERM."""

from __future__ import annotations

import signal
import sys
import threading
import time
from pathlib import Path

from .. import progress

# a step running longer than this many seconds is shown as running, so the line does not look stuck
LONG_STEP = 5.0


class Progress:
    """One status line on stderr: epoch, step, loss, images/s (with the model's and the loader's own rates) and ETA.

    On a terminal the line is rewritten in place; in a log file it is printed
    about ten times an epoch so logs stay short.  A step that runs longer than
    :data:`LONG_STEP` seconds (a tiny epoch of few large steps, the first step's
    warm-up) keeps the line moving: the time it has run is redrawn on a terminal,
    and written as a line elsewhere when ``MOBILENETS_PROGRESS=1`` asks
    (:mod:`mobilenets.progress`, the drawing's home).
    """

    def __init__(self, enabled: bool, batch: int, stream=None):
        self.batch = batch  # images per step, all ranks together
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.last_tenth = -1
        self._line = "training: first step"
        self._since = time.monotonic()
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def start(self) -> None:
        """Keep the line moving through long steps until :meth:`close` (where a line is shown at all)."""
        self._since = time.monotonic()
        if self.enabled and (self.tty or progress.Stderr(self.stream).lines):
            every = progress.REDRAW_EVERY if self.tty else progress.LINE_EVERY
            threading.Thread(target=self._tick, args=(every,), daemon=True, name="mobilenets-train-progress").start()

    def update(self, epoch: int, epochs: int, step: int, steps: int, loss: float, images_per_s: float,
               detail: str = "") -> None:
        if not self.enabled:
            return
        with self._lock:
            self._since = time.monotonic()
            tenth = 10 * step // max(steps, 1)
            eta = (steps - step) * self.batch / images_per_s if images_per_s else 0.0
            self._line = (f"epoch {epoch}/{epochs} {progress.bar(step, steps, 24)} {step}/{steps} "
                          f"loss {loss:.4f} {images_per_s:.1f} img/s {detail + ' ' if detail else ''}eta {_duration(eta)}")
            if not self.tty and (tenth == self.last_tenth or step == steps):
                return
            self.last_tenth = tenth
            self._write(self._line)

    def _write(self, line: str) -> None:
        self.stream.write(("\r" + line + "\x1b[K") if self.tty else line + "\n")
        self.stream.flush()

    def _tick(self, every: float) -> None:
        while not self._stop.wait(every):
            with self._lock:
                running = time.monotonic() - self._since
                if running >= LONG_STEP:
                    self._write(f"{self._line}; next step running {progress.duration(running)}")

    def close(self) -> None:
        self._stop.set()

    def end_epoch(self, row: dict) -> None:
        if not self.enabled:
            return
        with self._lock:
            self._end_epoch(row)
            self._since = time.monotonic()

    def _end_epoch(self, row: dict) -> None:
        if self.tty:
            self.stream.write("\r\x1b[K")
        parts = [f"epoch {row['epoch']}/{row['epochs']}", f"train loss {row['train_loss']:.4f}",
                 f"val top-1 {row['val_top1']:.2f}%"]
        if "val_top5" in row:  # recorded only with more than five classes
            parts.append(f"top-5 {row['val_top5']:.2f}%")
        if "ema_val_top1" in row:
            parts.append(f"EMA top-1 {row['ema_val_top1']:.2f}%")
        parts += [f"lr {row['lr']:.3g}", f"{row['images_per_s']:.1f} img/s", f"{row['epoch_time_s']:.1f} s"]
        if row.get("loader_images_per_core_s"):
            parts.append(f"(model {row['model_images_per_s']:.0f} img/s; loader {row['loader_images_per_core_s']:.0f} "
                         f"img/s per core x {max(row['num_workers'], 1)}, waited {100 * row['input_wait_fraction']:.0f}%)")
        self.stream.write("  ".join(parts) + "\n")
        self.stream.flush()


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class StopRequest:
    """Ctrl-C and SIGTERM set a flag; the loop finishes the current step, saves, and exits."""

    def __init__(self):
        self.signal: int | None = None
        self._previous = {}

    def __enter__(self):
        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C does not wait
        self.signal = signum

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)


class Interrupted(Exception):
    def __init__(self, signum: int, path: Path):
        self.signum, self.path = signum, path
        super().__init__(f"stopped by {signal.Signals(signum).name}; saved {path}")
