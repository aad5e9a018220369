"""A job directory as RELION's VDAM and ``denovo3d refine`` leave it, and its numbers per iteration.

Files: ``ROOT_itNNN_classKKK.mrc`` and ``ROOT_itNNN_{model,data,optimiser}.star`` for each written
iteration, ``initial_model.mrc`` and ``*symmetry*.star|json``. Every file and label is optional:
what is missing becomes a note (``Job.notes``), never an error.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from denovo3d.errors import InputError
from denovo3d.geometry.euler import euler_to_matrix
from denovo3d.io.star import read_star

__all__ = ["Iteration", "Job", "convergence_table", "find_job", "pose_changes", "read_blocks"]

_FILE_RE = re.compile(  # ROOT_itNNN_classKKK.mrc or ROOT_itNNN_{model,data,optimiser}.star
    r"^(?P<root>.+?)_it(?P<it>\d{3,})_"
    r"(?:class(?P<cls>\d{3})\.mrc|(?P<kind>model|data|optimiser)\.star)$"
)


@dataclass
class Iteration:
    """Files of one written iteration: class maps by class number, STAR files by kind."""

    number: int
    classes: dict[int, Path] = field(default_factory=dict)
    stars: dict[str, Path] = field(default_factory=dict)


@dataclass
class Job:
    """A job directory as found on disk, with notes on what is missing."""

    directory: Path
    root: str
    iterations: list[Iteration]
    initial_model: Path | None
    symmetry_files: list[Path]
    notes: list[str] = field(default_factory=list)


def find_job(directory: str | Path) -> Job:
    """Glob the iterations of a job directory (the output root with most files wins)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise InputError(directory, "not a directory")
    by_root: dict[str, dict[int, Iteration]] = {}
    for path in sorted(directory.iterdir()):
        m = _FILE_RE.match(path.name)
        if m is None or path.name.startswith("."):
            continue
        it = by_root.setdefault(m["root"], {}).setdefault(int(m["it"]), Iteration(int(m["it"])))
        if m["cls"]:
            it.classes[int(m["cls"])] = path
        else:
            it.stars[m["kind"]] = path
    initial = directory / "initial_model.mrc"
    sym = sorted(p for ext in ("star", "json") for p in directory.glob(f"*symmetry*.{ext}"))
    if not by_root and not initial.is_file():
        raise InputError(directory, "no run_itNNN_* files and no initial_model.mrc found")
    notes = []
    root = max(
        by_root,
        key=lambda r: sum(len(i.classes) + len(i.stars) for i in by_root[r].values()),
        default="run",
    )
    if len(by_root) > 1:
        notes.append(
            f"several output roots; showing {root!r}, ignoring {sorted(set(by_root) - {root})}"
        )
    iterations = [by_root.get(root, {})[k] for k in sorted(by_root.get(root, {}))]
    for kind in ("model", "data", "optimiser"):
        missing = [f"{i.number:03d}" for i in iterations if kind not in i.stars]
        if missing:
            notes.append(f"no {root}_itNNN_{kind}.star for iteration(s) {', '.join(missing)}")
    if not initial.is_file():
        notes.append("no initial_model.mrc (symmetry alignment not run yet)")
    return Job(directory, root, iterations, initial if initial.is_file() else None, sym, notes)


def read_blocks(path: Path | None, notes: list[str]) -> dict:
    """All blocks of a STAR file, or ``{}`` with a note when it is absent or unreadable."""
    if path is None:
        return {}
    try:
        return read_star(path)
    except InputError as exc:
        notes.append(str(exc))
        return {}


def pose_changes(before: pd.DataFrame, after: pd.DataFrame) -> tuple[float, float] | None:
    """Mean rotation angle (degrees) between two poses per particle and % changing class.

    Particles are matched by ``rlnTomoParticleName`` or ``rlnImageName`` when unique, else by row
    when both tables have the same length. ``None`` when they cannot be matched.
    """
    angles = ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]
    if not set(angles) <= set(before.columns) & set(after.columns):
        return None
    key = next(
        (k for k in ("rlnTomoParticleName", "rlnImageName") if k in before and k in after), None
    )
    if key and before[key].is_unique and after[key].is_unique:
        pair = before.merge(after, on=key, suffixes=("_a", "_b"))
    elif len(before) == len(after):
        pair = before.reset_index(drop=True).join(
            after.reset_index(drop=True), lsuffix="_a", rsuffix="_b"
        )
    else:
        return None
    if pair.empty:
        return None
    mats = [
        euler_to_matrix(*(torch.tensor(pair[f"{a}_{s}"].to_numpy(float)) for a in angles))
        for s in "ab"
    ]
    cos = ((mats[0] @ mats[1].transpose(-1, -2)).diagonal(dim1=-2, dim2=-1).sum(-1) - 1) / 2
    mean_deg = float(torch.rad2deg(torch.arccos(cos.clamp(-1, 1))).mean())
    cls = "rlnClassNumber"
    changed = (
        100.0 * float((pair[f"{cls}_a"] != pair[f"{cls}_b"]).mean()) if f"{cls}_a" in pair else 0.0
    )
    return mean_deg, changed


def _number(value: object) -> float | None:
    """``value`` as a finite float, or ``None`` (absent, text, NaN)."""
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def convergence_table(job: Job) -> pd.DataFrame:
    """One row per written iteration: resolution, class fractions, ⟨Pmax⟩, pose changes, step, T."""
    rows, previous = [], None
    for it in job.iterations:
        row: dict[str, float | None] = {"iteration": it.number}
        model = read_blocks(it.stars.get("model"), job.notes)
        general = model.get("model_general", {})
        for label, name in (
            ("rlnCurrentResolution", "resolution_a"),
            ("rlnAveragePmax", "pmax"),
            ("rlnTau2FudgeFactor", "tau2_fudge"),
        ):
            if isinstance(general, dict) and _number(general.get(label)) is not None:
                row[name] = _number(general[label])
        classes = model.get("model_classes")
        if isinstance(classes, pd.DataFrame):
            for k, rec in enumerate(classes.to_dict("records"), start=1):
                for label, name in (
                    ("rlnClassDistribution", "fraction"),
                    ("rlnEstimatedResolution", "resolution_a"),
                ):
                    if _number(rec.get(label)) is not None:
                        row[f"class{k}_{name}"] = _number(rec[label])
        opt = read_blocks(it.stars.get("optimiser"), job.notes).get("optimiser_general", {})
        for label, name in (
            ("rlnGradCurrentStepsize", "step_size"),
            ("rlnChangesOptimalOrientations", "relion_orientation_change_deg"),
        ):
            if isinstance(opt, dict) and _number(opt.get(label)) is not None:
                row[name] = _number(opt[label])
        data = read_blocks(it.stars.get("data"), job.notes).get("particles")
        if isinstance(data, pd.DataFrame):
            change = pose_changes(previous, data) if previous is not None else None
            if change is not None:
                row["orientation_change_deg"], row["class_change_pct"] = change
            previous = data
        rows.append(row)
    return pd.DataFrame(rows)
