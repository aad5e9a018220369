"""One exception type for bad user input, so the CLI can print one clear line and exit 2."""

from __future__ import annotations

from pathlib import Path

__all__ = ["InputError"]


class InputError(Exception):
    """Bad input: names the file, the row or label where known, and the problem.

    The message reads ``FILE[, row N][, label L]: problem``, where row numbers count data rows
    from 1 as a user sees them in the STAR file.
    """

    def __init__(
        self,
        path: str | Path | None,
        problem: str,
        *,
        row: int | None = None,
        label: str | None = None,
    ) -> None:
        self.path = None if path is None else str(path)
        self.row = row
        self.label = label
        self.problem = problem
        where = [self.path] if self.path else []
        if row is not None:
            where.append(f"row {row}")
        if label is not None:
            where.append(f"label {label}")
        super().__init__(f"{', '.join(where)}: {problem}" if where else problem)
