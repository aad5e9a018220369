"""Pictures and plots of a run: one self-contained HTML page (images inline) plus its PNGs.

Reads what RELION's VDAM and ``denovo3d refine`` write in a job directory (``_job``), draws the
pictures with matplotlib's Agg canvas (``_figures``) and writes the page (``_page``): the final
``initial_model.mrc`` in three orthogonal views, every class at every written iteration, the
convergence plots, the angular distribution of the final poses, the FSC between successive
iterations, and the symmetry scores.
"""

from denovo3d.report._figures import views
from denovo3d.report._job import Iteration, Job, convergence_table, find_job, pose_changes
from denovo3d.report._page import write_report

__all__ = [
    "Iteration",
    "Job",
    "convergence_table",
    "find_job",
    "pose_changes",
    "views",
    "write_report",
]
