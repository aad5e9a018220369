"""The command line: every registered sub-command has help text and an example."""

from __future__ import annotations

import subprocess
import sys

import pytest

from denovo3d.cli import COMMANDS, build_parser


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_each_command_has_help_with_an_example(
    name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([name, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert f"denovo3d {name}" in out and "Example" in out


def test_program_runs_as_module() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "denovo3d", "--help"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0
    for name in COMMANDS:
        assert name in result.stdout
