"""What a person sees while a refine job runs: one line per iteration, a progress bar with an
ETA on a terminal, and the same lines in ``run.log`` beside the outputs.

The ETA counts particles, not iterations: VDAM mini-batches grow from a few hundred to
thousands of particles, so the time per particle so far times the particles still to search
(the remaining mini-batches plus the final assignment of every particle) is the honest guess.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from denovo3d.pipeline_control import JobAbortedError

__all__ = ["JobMonitor", "format_duration"]


def format_duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``2h07m``."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class JobMonitor:
    """Progress of one job: ``log`` lines go to ``run.log`` (always) and to ``stream`` (unless
    quiet); ``sub_batch`` redraws the bar (terminals only) and, while ``poll_abort``, raises
    :class:`~denovo3d.pipeline_control.JobAbortedError` when ``abort_requested()`` says so."""

    def __init__(
        self,
        log_path: str | Path,
        *,
        quiet: bool = False,
        stream: TextIO | None = None,
        abort_requested: Callable[[], bool] | None = None,
    ) -> None:
        self.log_path = Path(log_path)
        self.quiet = quiet
        self.stream = sys.stdout if stream is None else stream
        self._abort_requested = abort_requested
        self.poll_abort = True
        self.is_tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._bar_width = 0  # characters of the bar on screen (0: none)
        self._particles_total = 0
        self._particles_done = 0
        self._seconds = 0.0
        self._offset = 0
        self._iteration_start = time.monotonic()
        self._label = ""

    # ---- plain lines ---------------------------------------------------------------------
    def log(self, message: str, *, echo: bool = True) -> None:
        """Append ``message`` to run.log; print it too unless quiet or ``echo`` is False."""
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        with open(self.log_path, "a", encoding="utf-8") as log:
            for line in message.splitlines() or [""]:
                log.write(f"{stamp}  {line}\n")
        if echo and not self.quiet:
            self._clear_bar()
            print(message, file=self.stream, flush=True)

    # ---- the whole job -------------------------------------------------------------------
    def plan(self, particles_per_iteration: list[int]) -> None:
        """The particles each remaining step will search (for the ETA)."""
        self._particles_total = int(sum(particles_per_iteration))
        self._particles_done = 0
        self._seconds = 0.0

    def start_iteration(self, label: str) -> None:
        self._iteration_start = time.monotonic()
        self._offset = 0
        self._label = label

    def next_step(self, label: str, particles_before: int) -> None:
        """A second step inside the same iteration (the final assignment of every particle),
        after ``particles_before`` particles; the iteration's clock keeps running."""
        self._offset = particles_before
        self._label = label

    def sub_batch(self, done: int, total: int) -> None:
        """``done`` of ``total`` particles of the current step are searched."""
        if self.poll_abort and self.abort_requested():
            raise JobAbortedError("abort requested (RELION_JOB_ABORT_NOW)")
        if self.quiet or not self.is_tty or self._particles_total <= 0:
            return
        elapsed = time.monotonic() - self._iteration_start
        done_all = self._particles_done + self._offset + done
        fraction = min(1.0, done_all / self._particles_total)
        width = 30
        filled = round(width * fraction)
        eta = self._eta(done_all, self._seconds + elapsed)
        bar = "#" * filled + "." * (width - filled)
        text = f"\r[{bar}] {100 * fraction:5.1f}%  {self._label}  {done}/{total}  ETA {eta}"
        self.stream.write(text + " " * max(0, self._bar_width - len(text)))
        self.stream.flush()
        self._bar_width = len(text)

    def abort_requested(self) -> bool:
        return self._abort_requested is not None and self._abort_requested()

    def end_iteration(self, particles: int) -> float:
        """Account the finished step; returns its seconds."""
        seconds = time.monotonic() - self._iteration_start
        self._particles_done += particles
        self._seconds += seconds
        return seconds

    def eta(self) -> str:
        return self._eta(self._particles_done, self._seconds)

    def _eta(self, done: int, seconds: float) -> str:
        if done <= 0 or self._particles_total <= 0:
            return "--"
        return format_duration(seconds / done * max(0, self._particles_total - done))

    def _clear_bar(self) -> None:
        if self._bar_width:
            self.stream.write("\r" + " " * self._bar_width + "\r")
            self._bar_width = 0
