"""A RELION 4/5 tomography particle set as tables: optimisation set -> particles.star -> optics.

This module reads and checks the STAR side only (labels, optics, paths); the volumes are read by
:mod:`denovo3d.particles`. Every problem is an :class:`InputError` naming the file, the row (data
rows counted from 1) or label, and what was found against what was expected.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from denovo3d.errors import InputError
from denovo3d.io.star import read_star, require_labels

__all__ = ["ParticleTables", "read_particle_tables", "resolve_project_path"]

PARTICLE_LABELS = ["rlnImageName"]
OPTICS_LABELS = ["rlnOpticsGroup", "rlnImageSize"]
_OPTIMISATION_SET_LABEL = "rlnTomoParticlesFile"


@dataclass(frozen=True)
class ParticleTables:
    """The tables of a particle set, checked for consistency.

    ``particles`` keeps the original row order and all columns (they are carried to the outputs).
    ``pixel_size_a`` and ``box`` are the (single) values of the optics table; ``kind`` is
    ``"pseudo"`` for RELION-4 pseudo-subtomograms (CTF-premultiplied, with a weights volume)
    and ``"classic"`` for RELION-3.1-style subtomograms with an optional 3D CTF.
    """

    particles_path: Path
    particles: pd.DataFrame
    optics: pd.DataFrame
    project_dir: Path
    tomograms_path: Path | None
    pixel_size_a: float
    box: int
    kind: str


def _is_optimisation_set(blocks: dict) -> bool:
    for block in blocks.values():
        columns = block.columns if isinstance(block, pd.DataFrame) else block.keys()
        if _OPTIMISATION_SET_LABEL in columns:
            return True
    return False


def _optimisation_set_entry(blocks: dict, label: str) -> str | None:
    for block in blocks.values():
        if isinstance(block, pd.DataFrame):
            if label in block.columns and len(block):
                value = block[label].iloc[0]
                return None if pd.isna(value) or str(value) in ("", '""') else str(value)
        elif label in block:
            value = str(block[label])
            return None if value in ("", '""') else value
    return None


def resolve_project_path(name: str, project_dir: Path) -> Path:
    """A path from a STAR file, resolved as RELION does: relative to the project directory."""
    path = Path(name)
    return path if path.is_absolute() else project_dir / path


def _guess_project_dir(star_path: Path, first_name: str, project_dir: Path | None) -> Path:
    """RELION resolves paths from the directory the job runs in (``project_dir``, default the
    current one). If the first file is not found there, try the STAR file's directory and its
    parents (a user who runs from elsewhere), so that a moved project still reads."""
    if project_dir is not None:
        return project_dir
    candidates = [Path.cwd(), star_path.parent, *star_path.parent.parents]
    for candidate in candidates[:6]:
        if resolve_project_path(first_name, candidate).exists():
            return candidate
    return Path.cwd()


def _optics_pixel_size(optics: pd.DataFrame, path: Path) -> pd.Series:
    if "rlnImagePixelSize" in optics.columns:
        return optics["rlnImagePixelSize"].astype(float)
    if "rlnTomoTiltSeriesPixelSize" in optics.columns:
        binning = optics.get("rlnTomoSubtomogramBinning", pd.Series(1.0, index=optics.index))
        return optics["rlnTomoTiltSeriesPixelSize"].astype(float) * binning.astype(float)
    raise InputError(
        path,
        "data_optics has neither rlnImagePixelSize nor rlnTomoTiltSeriesPixelSize",
        label="rlnImagePixelSize",
    )


def _check_optics(optics: pd.DataFrame, path: Path) -> tuple[float, int, str]:
    require_labels(optics, OPTICS_LABELS, path, "optics")
    if len(optics) == 0:
        raise InputError(path, "data_optics has no rows")
    if "rlnImageDimensionality" in optics.columns:
        for i, dim in enumerate(optics["rlnImageDimensionality"]):
            if int(dim) != 3:
                raise InputError(
                    path,
                    f"rlnImageDimensionality is {int(dim)}: 3D subtomograms are needed, "
                    "not 2D images or tilt stacks (re-extract with 3D pseudo-subtomograms)",
                    row=i + 1,
                    label="rlnImageDimensionality",
                )
    pixel = _optics_pixel_size(optics, path)
    boxes = optics["rlnImageSize"].astype(int)
    for i in range(len(optics)):
        if abs(pixel.iloc[i] - pixel.iloc[0]) > 1e-3 * pixel.iloc[0]:
            raise InputError(
                path,
                f"optics groups differ in pixel size: {pixel.iloc[i]:g} Å "
                f"in this group, {pixel.iloc[0]:g} Å in the first",
                row=i + 1,
                label="rlnImagePixelSize",
            )
        if boxes.iloc[i] != boxes.iloc[0]:
            raise InputError(
                path,
                f"optics groups differ in box size: {boxes.iloc[i]} here, "
                f"{boxes.iloc[0]} in the first",
                row=i + 1,
                label="rlnImageSize",
            )
        if pixel.iloc[i] <= 0 or not np.isfinite(pixel.iloc[i]):
            raise InputError(
                path,
                f"pixel size {pixel.iloc[i]} is not positive",
                row=i + 1,
                label="rlnImagePixelSize",
            )
    box = int(boxes.iloc[0])
    if box < 8 or box % 2:
        raise InputError(
            path, f"box size {box} must be even and at least 8", row=1, label="rlnImageSize"
        )
    premultiplied = optics.get("rlnCtfDataAreCtfPremultiplied", pd.Series(0, index=optics.index))
    kinds = {"pseudo" if int(p) == 1 else "classic" for p in premultiplied}
    if len(kinds) > 1:
        raise InputError(
            path,
            "optics groups mix CTF-premultiplied pseudo-subtomograms and classic subtomograms",
            label="rlnCtfDataAreCtfPremultiplied",
        )
    return float(pixel.iloc[0]), box, kinds.pop()


def _check_particles(particles: pd.DataFrame, optics: pd.DataFrame, kind: str, path: Path) -> None:
    if len(particles) == 0:
        raise InputError(path, "the particle table data_particles has no rows")
    require_labels(particles, PARTICLE_LABELS, path, "particles")
    if kind == "pseudo":
        require_labels(particles, ["rlnCtfImage"], path, "particles")
    if "rlnOpticsGroup" in particles.columns:
        known = set(optics["rlnOpticsGroup"].astype(int))
        groups = particles["rlnOpticsGroup"].astype(int).to_numpy()
        bad = np.flatnonzero(~np.isin(groups, list(known)))
        if bad.size:
            raise InputError(
                path,
                f"optics group {groups[bad[0]]} is not in data_optics (known: {sorted(known)})",
                row=int(bad[0]) + 1,
                label="rlnOpticsGroup",
            )
    elif len(optics) > 1:
        raise InputError(
            path, "several optics groups but no rlnOpticsGroup column", label="rlnOpticsGroup"
        )
    for label in ("rlnImageName", "rlnCtfImage"):
        if label in particles.columns:
            empty = np.flatnonzero(particles[label].astype(str).str.strip().isin(["", '""', "nan"]))
            if empty.size:
                raise InputError(path, "empty file name", row=int(empty[0]) + 1, label=label)


def read_particle_tables(path: str | Path, project_dir: str | Path | None = None) -> ParticleTables:
    """Read a particles.star (or an optimisation_set.star naming one) and check its tables."""
    path = Path(path)
    blocks = read_star(path)
    tomograms_path = None
    if _is_optimisation_set(blocks):
        name = _optimisation_set_entry(blocks, _OPTIMISATION_SET_LABEL)
        if name is None:
            raise InputError(
                path, "optimisation set names no particles file", label=_OPTIMISATION_SET_LABEL
            )
        base = Path(project_dir) if project_dir is not None else None
        guess = _guess_project_dir(path, name, base)
        particles_path = resolve_project_path(name, guess)
        tomo = _optimisation_set_entry(blocks, "rlnTomoTomogramsFile")
        tomograms_path = None if tomo is None else resolve_project_path(tomo, guess)
        if not particles_path.is_file():
            raise InputError(
                path,
                f"the particles file it names was not found: {particles_path}",
                label=_OPTIMISATION_SET_LABEL,
            )
        path = particles_path
        blocks = read_star(path)
    general = blocks.get("general")
    if isinstance(general, dict) and int(general.get("rlnTomoSubTomosAre2DStacks", 0)) == 1:
        raise InputError(
            path,
            "the particles are 2D tilt stacks (rlnTomoSubTomosAre2DStacks 1); "
            "denovo3d needs 3D pseudo-subtomograms (RELION 5: Extract subtomos "
            "with 'Write output as 2D stacks' off)",
            label="rlnTomoSubTomosAre2DStacks",
        )
    optics = blocks.get("optics")
    particles = blocks.get("particles")
    if not isinstance(particles, pd.DataFrame):
        raise InputError(path, "no data_particles table found")
    if not isinstance(optics, pd.DataFrame):
        raise InputError(path, "no data_optics table found (RELION >= 3.1 particle files have one)")
    pixel, box, kind = _check_optics(optics, path)
    _check_particles(particles, optics, kind, path)
    particles = particles.reset_index(drop=True)
    project = _guess_project_dir(
        path,
        str(particles["rlnImageName"].iloc[0]),
        Path(project_dir) if project_dir is not None else None,
    )
    return ParticleTables(
        particles_path=path,
        particles=particles,
        optics=optics.reset_index(drop=True),
        project_dir=project,
        tomograms_path=tomograms_path,
        pixel_size_a=pixel,
        box=box,
        kind=kind,
    )
