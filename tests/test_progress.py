"""What a person sees while a job runs: the progress bar and ETA, run.log, quiet mode."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from denovo3d.pipeline_control import JobAbortedError, PipelineControl
from denovo3d.progress import JobMonitor, format_duration


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_format_duration() -> None:
    assert [format_duration(s) for s in (0, 42.4, 185, 7620)] == ["0s", "42s", "3m05s", "2h07m"]


def test_bar_and_eta_count_particles(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter([0.0, 10.0, 10.0, 20.0])  # start, sub-batch, end, next start
    monkeypatch.setattr("denovo3d.progress.time.monotonic", lambda: next(clock))
    term = _Terminal()
    monitor = JobMonitor(tmp_path / "run.log", stream=term)
    monitor.plan([100, 300])  # a small batch, then a 3x larger one
    monitor.start_iteration("it 1/2")
    monitor.sub_batch(100, 100)
    assert "it 1/2" in term.getvalue() and "25.0%" in term.getvalue()
    assert monitor.end_iteration(100) == pytest.approx(10.0)
    assert monitor.eta() == "30s"  # 10 s per 100 particles, 300 to go
    monitor.log("it 1/2  done")
    assert term.getvalue().endswith("it 1/2  done\n")
    assert "it 1/2  done" in (tmp_path / "run.log").read_text()


def test_quiet_writes_only_the_log(tmp_path: Path) -> None:
    term = _Terminal()
    monitor = JobMonitor(tmp_path / "run.log", quiet=True, stream=term)
    monitor.plan([10])
    monitor.start_iteration("it 1/1")
    monitor.sub_batch(5, 10)
    monitor.log("a line for the log")
    assert term.getvalue() == ""
    assert "a line for the log" in (tmp_path / "run.log").read_text()


def test_no_bar_when_not_a_terminal(tmp_path: Path) -> None:
    plain = io.StringIO()
    monitor = JobMonitor(tmp_path / "run.log", stream=plain)
    monitor.plan([10])
    monitor.start_iteration("it 1/1")
    monitor.sub_batch(5, 10)
    assert plain.getvalue() == ""  # batch systems get the per-iteration lines only


def test_abort_trigger_is_polled_at_each_sub_batch(tmp_path: Path) -> None:
    control = PipelineControl(tmp_path)
    control.start()
    monitor = JobMonitor(tmp_path / "run.log", quiet=True, abort_requested=control.abort_requested)
    monitor.plan([10])
    monitor.start_iteration("it 1/1")
    monitor.sub_batch(5, 10)
    (tmp_path / "RELION_JOB_ABORT_NOW").touch()
    with pytest.raises(JobAbortedError):
        monitor.sub_batch(10, 10)
    control.aborted()
    assert (tmp_path / "RELION_JOB_EXIT_ABORTED").is_file()
    assert not (tmp_path / "RELION_JOB_ABORT_NOW").exists()
    control.start()  # a new try clears the old markers
    assert not (tmp_path / "RELION_JOB_EXIT_ABORTED").exists()
