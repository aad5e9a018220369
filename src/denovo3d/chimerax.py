"""A ChimeraX command script (``view.cxc``) that opens the final maps of a job, ready to look at.

Threshold: the level that encloses the expected volume of the particle. The expected volume is
``PROTEIN_FILL`` (0.4) of a sphere of the particle diameter (``rlnParticleDiameter`` in the
optimiser.star; 0.6 of the box edge when unknown): a globular protein fills about 30-50 % of its
bounding sphere. The level is the voxel value above which that many voxels lie (a quantile of the
map's histogram), so it adapts to any scale of the map and to any box.

Symmetry axes are drawn as cylinders through the box centre (voxel ``s // 2``, where RELION puts
the symmetry origin), coloured by fold: from an explicit list of axes when the symmetry step wrote
one, else from the point group's axes in RELION's standard orientation (which
``initial_model.mrc`` is aligned to). Only documented ChimeraX commands are used: ``open``,
``volume``, ``shape cylinder``, ``view``, ``lighting``.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from denovo3d.errors import InputError
from denovo3d.io.atomic import atomic_path, ensure_writable_dir
from denovo3d.io.mrc import read_mrc
from denovo3d.io.star import read_star
from denovo3d.report import Job

__all__ = [
    "PROTEIN_FILL",
    "SymmetryAxis",
    "enclosing_level",
    "expected_volume_a3",
    "point_group_axes",
    "symmetry_axes_from_files",
    "write_job_view",
    "write_view_cxc",
]

PROTEIN_FILL = 0.4
_FOLD_COLOURS = {2: "cornflowerblue", 3: "limegreen", 4: "orange", 5: "red", 6: "magenta"}
_MAP_COLOURS = ["lightsteelblue", "gold", "lightcoral", "mediumaquamarine", "plum", "sandybrown"]


@dataclass(frozen=True)
class SymmetryAxis:
    """A rotation axis: unit ``direction_xyz`` and its ``fold`` (0 when unknown)."""

    direction_xyz: tuple[float, float, float]
    fold: int


def expected_volume_a3(diameter_a: float) -> float:
    """Expected particle volume (Å³): ``PROTEIN_FILL`` of the sphere of ``diameter_a``."""
    return PROTEIN_FILL * math.pi / 6.0 * diameter_a**3


def enclosing_level(volume: np.ndarray, voxel_size_a: float, enclosed_a3: float) -> float:
    """Threshold whose isosurface encloses ``enclosed_a3`` Å³ of the map ``(z, y, x)``.

    At least one voxel and at most half of the box are enclosed.
    """
    values = np.sort(np.asarray(volume, dtype=np.float64).ravel())[::-1]
    n = round(enclosed_a3 / voxel_size_a**3)
    n = min(max(n, 1), values.size // 2)
    return float(values[n - 1])


def _rotation(axis: np.ndarray, fold: int) -> np.ndarray:
    """Rotation matrix by 360°/fold about the unit ``axis`` (Rodrigues)."""
    u = axis / np.linalg.norm(axis)
    a = 2 * math.pi / fold
    k = np.array([[0, -u[2], u[1]], [u[2], 0, -u[0]], [-u[1], u[0], 0]])
    return np.eye(3) + math.sin(a) * k + (1 - math.cos(a)) * (k @ k)


# RELION's generators (symmetries.cpp fill_symmetry_class): (axis xyz, fold)
_I_GENERATORS = {
    "I": [((0, 0, 1), 2), ((0.525731, 0, 0.850651), 5), ((0, 0.356822, 0.934172), 3)],
    "I1": [((1, 0, 0), 2), ((0.850651, 0, -0.525731), 5), ((0.934172, 0.356822, 0), 3)],
    "I2": [((0, 0, 1), 2), ((0.525731, 0, 0.850651), 5), ((0, 0.356822, 0.934172), 3)],
    "I3": [((-0.525731, 0, 0.850651), 2), ((0, 0, 1), 5), ((-0.491123, 0.356822, 0.794654), 3)],
    "I4": [((0.525731, 0, 0.850651), 2), ((0.894427, 0, 0.447214), 5),
           ((0.491123, 0.356822, 0.794654), 3)],
}  # fmt: skip


def _generators(group: str) -> list[tuple[tuple[float, float, float], int]]:
    g = group.strip().upper()
    m = re.fullmatch(r"([CD])(\d+)[VH]?", g)
    if m:
        n = int(m.group(2))
        gens = [((0.0, 0.0, 1.0), n)] if n > 1 else []
        return gens + ([((1.0, 0.0, 0.0), 2)] if m.group(1) == "D" else [])
    if g in ("T", "TD", "TH"):
        return [((0, 0, 1), 3), ((0, 0.816496, 0.577350), 2)]
    if g in ("O", "OH"):
        return [((1, 1, 1), 3), ((0, 0, 1), 4)]
    return _I_GENERATORS.get(g, [])


def point_group_axes(group: str) -> list[SymmetryAxis]:
    """Rotation axes of a RELION point group (Cn, Dn, T, O, I, I1-I4) in RELION's orientation.

    The group is closed from RELION's generators; each axis appears once with its highest fold.
    Groups without rotation axes (C1, Ci, Cs) or unknown names give an empty list.
    """
    mats = [_rotation(np.asarray(a, float), n) for a, n in _generators(group)]
    elements = [np.eye(3)]
    frontier = list(mats)
    while frontier and len(elements) <= 120:
        m = frontier.pop()
        if any(np.allclose(m, e, atol=1e-4) for e in elements):
            continue
        elements.append(m)
        frontier.extend(m @ g for g in mats)
    axes: dict[tuple[int, int, int], tuple[np.ndarray, int]] = {}
    for m in elements[1:]:
        angle = math.acos(max(-1.0, min(1.0, (np.trace(m) - 1) / 2)))
        w, v = np.linalg.eig(m)
        u = np.real(v[:, np.argmin(np.abs(w - 1))])
        u = u / np.linalg.norm(u)
        if u[np.argmax(np.abs(u) > 1e-6)] < 0:
            u = -u  # one sign per axis
        key = tuple(round(float(c) * 1e3) for c in u)
        fold = round(2 * math.pi / angle)
        if key not in axes or fold > axes[key][1]:
            axes[key] = (u, fold)
    return [SymmetryAxis(tuple(float(c) for c in u), n) for u, n in axes.values()]


def _fmt(p: np.ndarray) -> str:
    return ",".join(f"{c:.2f}" for c in p)


def write_view_cxc(
    path: str | Path,
    maps: Sequence[tuple[Path, np.ndarray, float]],
    diameter_a: float | None = None,
    axes: Sequence[SymmetryAxis] = (),
    axes_source: str = "",
) -> Path:
    """Write a ChimeraX script opening ``maps`` (file, volume ``(z, y, x)``, voxel Å) with axes.

    File names are written relative to the script's folder (ChimeraX runs a .cxc from there).
    The first map is shown; the others are opened hidden, one ``volume #N show`` away.
    """
    path = Path(path)
    lines = [
        "# denovo3d: open the final maps in ChimeraX (File > Open, or: chimerax view.cxc)",
        "# in a fresh session: the commands below number the maps #1, #2, ...",
        f"# threshold: level enclosing {PROTEIN_FILL:g} of a sphere of the particle diameter",
    ]
    for i, (file, volume, voxel) in enumerate(maps, start=1):
        box_edge_a = volume.shape[-1] * voxel
        d = diameter_a if diameter_a and diameter_a > 0 else 0.6 * box_edge_a
        level = enclosing_level(volume, voxel, expected_volume_a3(d))
        rel = Path(os.path.relpath(Path(file).resolve(), path.parent.resolve()))
        colour = _MAP_COLOURS[(i - 1) % len(_MAP_COLOURS)]
        lines.append(f"# #{i}: level encloses {expected_volume_a3(d):.4g} Å³ (diameter {d:.0f} Å)")
        lines.append(f'open "{rel.as_posix()}"')
        lines.append(
            f"volume #{i} level {level:.6g} style surface color {colour}"
            + ("" if i == 1 else " hide")
        )
    if maps and axes:
        file, volume, voxel = maps[0]
        centre = np.array([n // 2 for n in volume.shape[::-1]], float) * voxel  # xyz Å
        half = 0.55 * max(volume.shape) * voxel
        radius = max(0.008 * max(volume.shape) * voxel, 0.5 * voxel)
        lines.append(f"# symmetry axes ({axes_source or 'point group'}), through the box centre")
        for j, ax in enumerate(axes, start=1):
            u = np.asarray(ax.direction_xyz, float)
            u = u / np.linalg.norm(u)
            colour = _FOLD_COLOURS.get(ax.fold, "gray")
            name = f"axis{j}_{ax.fold}fold" if ax.fold else f"axis{j}"
            lines.append(
                f"shape cylinder radius {radius:.2f} fromPoint {_fmt(centre - half * u)} "
                f"toPoint {_fmt(centre + half * u)} color {colour} name {name}"
            )
    lines += ["lighting soft", "view"]
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    path.chmod(0o644)  # atomic_path's temporary file is private (0600)
    return path


_GROUP_RE = re.compile(r"(?i)^(C\d+[vh]?|D\d+[vh]?|C[is]|T[dh]?|O|Oh|I[1-4]?)$")
_GROUP_KEY_RE = re.compile(r"(?i)group|symmetry|^sym|best|detected|chosen")


def _as_axis(value: object, fold: object = 0) -> SymmetryAxis | None:
    try:
        v = np.asarray(value, dtype=float)
        n = int(fold or 0)
    except (TypeError, ValueError):
        return None
    if v.shape != (3,) or not np.isfinite(v).all() or np.linalg.norm(v) < 1e-9:
        return None
    v = v / np.linalg.norm(v)
    return SymmetryAxis((float(v[0]), float(v[1]), float(v[2])), n)


def _walk_json(node: object, axes: list[SymmetryAxis], groups: list[str]) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            key = str(key)
            if re.search(r"(?i)ax[ie]s", key) and isinstance(value, list):
                items = value if value and isinstance(value[0], list | dict) else [value]
                for item in items:
                    if isinstance(item, dict):
                        vec = next(
                            (item[k] for k in ("axis", "direction", "vector") if k in item), None
                        )
                        fold = next((item[k] for k in ("fold", "order", "n") if k in item), 0)
                        ax = _as_axis(vec, fold)
                    else:
                        ax = _as_axis(item)
                    if ax is not None:
                        axes.append(ax)
            elif isinstance(value, str) and _GROUP_KEY_RE.search(key) and _GROUP_RE.match(value):
                groups.append(value)
            else:
                _walk_json(value, axes, groups)
    elif isinstance(node, list):
        for item in node:
            _walk_json(item, axes, groups)


def symmetry_axes_from_files(files: Sequence[Path]) -> tuple[list[SymmetryAxis], str]:
    """Axes for ``view.cxc`` from whatever the symmetry step wrote (``*symmetry*``/``*axes*``).

    Explicit axes (JSON keys ``axis``/``axes``, STAR columns ``...Axis...X/Y/Z``) win; else the
    point group named in the file (JSON ``group``/``best``..., STAR ``rlnSymmetryGroup``) gives
    RELION's standard axes. Returns the axes and a note on where they came from.
    """
    axes: list[SymmetryAxis] = []
    groups: list[str] = []
    for file in files:
        try:
            if file.suffix == ".json":
                _walk_json(json.loads(file.read_text()), axes, groups)
                continue
            blocks = read_star(file)
        except Exception:  # an unreadable file only means: no axes from it
            continue
        for block in blocks.values():
            if isinstance(block, dict):
                for key, value in block.items():
                    if _GROUP_KEY_RE.search(key) and _GROUP_RE.match(str(value)):
                        groups.append(str(value))
                continue
            for stem in {c[:-1] for c in block.columns if re.search(r"(?i)axis.*X$", c)}:
                if {stem + "Y", stem + "Z"} <= set(block.columns):
                    fold_col = next(
                        (c for c in block.columns if re.search(r"(?i)fold|order", c)), None
                    )
                    for _, row in block.iterrows():
                        fold = row[fold_col] if fold_col else 0
                        ax = _as_axis([row[stem + "X"], row[stem + "Y"], row[stem + "Z"]], fold)
                        if ax is not None:
                            axes.append(ax)
    if axes:
        return axes, f"{len(axes)} axes listed in {', '.join(f.name for f in files)}"
    for group in groups:
        found = point_group_axes(group)
        if found:
            return found, f"point group {group.upper()} in RELION's standard orientation"
    return [], ""


def write_job_view(job: Job) -> Path | None:
    """Write ``view.cxc`` in the job directory for initial_model.mrc and the last classes."""
    last = next((it for it in reversed(job.iterations) if it.classes), None)
    files = [job.initial_model] if job.initial_model else []
    files += [last.classes[k] for k in sorted(last.classes)] if last else []
    maps = []
    for file in files:
        try:
            maps.append((file, *read_mrc(file)))
        except InputError as exc:
            job.notes.append(str(exc))
    if not maps:
        return None
    diameter = None
    opt = next(
        (i.stars["optimiser"] for i in reversed(job.iterations) if "optimiser" in i.stars), None
    )
    if opt is not None:
        try:
            diameter = float(read_star(opt)["optimiser_general"]["rlnParticleDiameter"])
        except (InputError, KeyError, TypeError, ValueError):
            job.notes.append(f"{opt.name}: no rlnParticleDiameter; threshold from the box size")
    axis_files = (
        job.symmetry_files
        + sorted(job.directory.glob("*axes*.json"))
        + sorted(job.directory.glob("*axes*.star"))
    )
    axes, source = symmetry_axes_from_files(axis_files) if job.initial_model else ([], "")
    try:
        ensure_writable_dir(job.directory)
    except InputError as exc:
        job.notes.append(f"view.cxc not written: {exc}")
        return None
    return write_view_cxc(job.directory / "view.cxc", maps, diameter, axes, source)
