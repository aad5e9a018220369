"""Write an HTML report of a job: maps at every iteration, convergence, poses, FSC, symmetry.

Reads the RELION-named outputs of a job directory (run_itNNN_classKKK.mrc, run_itNNN_model.star,
run_itNNN_data.star, run_itNNN_optimiser.star, initial_model.mrc, *symmetry*.star/json) and
writes one self-contained HTML page (images inline, works offline) with its PNGs beside it, and
view.cxc, a ChimeraX script that opens the final maps at a sensible threshold with the symmetry
axes. Missing files or labels become notes on the page.

Example:
    denovo3d report InitialModel/job012 --o InitialModel/job012/report.html
"""

from __future__ import annotations

import argparse
from pathlib import Path

from denovo3d.chimerax import symmetry_axes_from_files, write_view_cxc
from denovo3d.errors import InputError
from denovo3d.io.mrc import read_mrc
from denovo3d.report import Job, find_job, write_report

__all__ = ["add_args", "main", "write_job_view"]


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("job_dir", type=Path, help="job directory with run_itNNN_* outputs")
    parser.add_argument(
        "--o", dest="out", type=Path, default=None, help="HTML file (default JOB_DIR/report.html)"
    )


def write_job_view(job: Job) -> Path | None:
    """Write ``view.cxc`` in the job directory for initial_model.mrc and the last classes."""
    files = ([job.initial_model] if job.initial_model else []) + (
        [job.iterations[-1].classes[k] for k in sorted(job.iterations[-1].classes)]
        if job.iterations
        else []
    )
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
        from denovo3d.io.star import read_star

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
    return write_view_cxc(job.directory / "view.cxc", maps, diameter, axes, source)


def main(args: argparse.Namespace) -> int:
    job = find_job(args.job_dir)
    cxc = write_job_view(job)
    out = write_report(job, args.out, view_cxc=cxc)
    print(f"Report: {out.resolve()}")
    if cxc is not None:
        print(f"ChimeraX: chimerax {cxc.resolve()}")
    return 0
