"""RELION STAR tables through ``starfile``, with the traps of the library handled once.

- name columns are read as strings (``rlnTomoName`` 01 must not become 1);
- floats are written with ``%.8g`` (the default ``%.6f`` destroys σ² values);
- NaN is never written (RELION cannot parse starfile's ``<NA>``);
- every write is atomic and starts with RELION's ``# version`` line.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pandas as pd
import starfile

from denovo3d.errors import InputError
from denovo3d.io.atomic import atomic_path

__all__ = ["STRING_LABELS", "read_star", "require_labels", "write_star"]

STRING_LABELS = [
    "rlnTomoName",
    "rlnTomoParticleName",
    "rlnTomoTiltSeriesName",
    "rlnOpticsGroupName",
    "rlnMicrographName",
    "rlnImageName",
    "rlnCtfImage",
    "rlnReferenceImage",
    "rlnTomoParticlesFile",
    "rlnTomoTomogramsFile",
    "rlnTomoTrajectoriesFile",
    "rlnTomoManifoldsFile",
    "rlnTomoReferenceMap1File",
    "rlnTomoReferenceMap2File",
    "rlnTomoReferenceMaskFile",
    "rlnTomoReferenceFscFile",
]

_VERSION_LINE = "# version 50001\n"


def read_star(path: str | Path) -> dict[str, pd.DataFrame | dict]:
    """Read every block of a STAR file: loops as DataFrames, key-value blocks as dicts."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "file not found")
    try:
        blocks = starfile.read(path, always_dict=True, parse_as_string=STRING_LABELS)
    except Exception as exc:  # starfile raises many types on malformed text
        raise InputError(path, f"not a readable STAR file ({type(exc).__name__}: {exc})") from None
    if not blocks:
        raise InputError(path, "no data blocks found (is this a STAR file?)")
    return dict(blocks)


def require_labels(table: pd.DataFrame, labels: list[str], path: str | Path, block: str) -> None:
    """Raise InputError naming the first required label missing from ``block``."""
    for label in labels:
        if label not in table.columns:
            raise InputError(path, f"required label missing from data_{block}", label=label)


def write_star(path: str | Path, blocks: Mapping[str, pd.DataFrame | dict]) -> Path:
    """Write STAR blocks atomically, RELION-readable (``%.8g`` floats, no NaN)."""
    path = Path(path)
    for name, block in blocks.items():
        values = block.to_numpy() if isinstance(block, pd.DataFrame) else list(block.values())
        if pd.isna(pd.DataFrame(values)).to_numpy().any():
            raise ValueError(f"refusing to write NaN into block data_{name} of {path}")
    with atomic_path(path) as tmp:
        starfile.write(dict(blocks), tmp, float_format="%.8g", sep="\t")
        text = tmp.read_text()
        lines = [ln for ln in text.splitlines(keepends=True) if not ln.startswith("# Created by")]
        tmp.write_text(_VERSION_LINE + "".join(lines))
    return path
