"""The README's main command end to end, at a tiny size: every step runs and leaves its files."""

from __future__ import annotations

from pathlib import Path

import pytest

from denovo3d.cli import main as cli_main
from denovo3d.io.mrc import read_mrc


def test_demo_runs_every_step_and_reuses_its_data(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["demo", "--o", str(tmp_path / "ex"), "--n", "40", "--box", "24", "--pixel_size", "12"]
    assert cli_main([*argv, "--iter", "3", "--j", "1"]) == 0
    out = capsys.readouterr().out
    for step in ("simulate", "inspect", "refine", "report"):
        assert f"$ denovo3d {step}" in out
    assert "FSC 0.5 to the truth" in out
    job = tmp_path / "ex" / "InitialModel"
    model, voxel = read_mrc(job / "initial_model.mrc")
    assert model.shape == (24, 24, 24) and voxel == pytest.approx(12.0)
    assert (job / "report.html").is_file() and (job / "run_it003_data.star").is_file()
    assert cli_main([*argv, "--iter", "3", "--j", "1"]) == 0  # again: data reused, job resumed
    out = capsys.readouterr().out
    assert "reusing the example data" in out and "--continue" in out
    assert "$ denovo3d simulate" not in out
