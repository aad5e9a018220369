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

__all__ = ["add_args", "main"]


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("job_dir", type=Path, help="job directory with run_itNNN_* outputs")
    parser.add_argument(
        "--o", dest="out", type=Path, default=None, help="HTML file (default JOB_DIR/report.html)"
    )


def main(args: argparse.Namespace) -> int:
    from denovo3d.chimerax import write_job_view  # matplotlib only when a report is asked for
    from denovo3d.report import find_job, write_report

    job = find_job(args.job_dir)
    cxc = write_job_view(job)
    out = write_report(job, args.out, view_cxc=cxc)
    print(f"Report: {out.resolve()}")
    if cxc is not None:
        print(f"ChimeraX: chimerax {cxc.resolve()}")
    return 0
