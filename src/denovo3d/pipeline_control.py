"""RELION's job protocol: exit marker files, the GUI's abort trigger, and output nodes.

A RELION pipeline (the GUI, ``relion_schemer``) follows a job through files in its directory:
the program writes ``RELION_JOB_EXIT_SUCCESS``, ``RELION_JOB_EXIT_FAILURE`` or
``RELION_JOB_EXIT_ABORTED`` when it ends, and the GUI's abort button creates
``RELION_JOB_ABORT_NOW``, which the program polls at safe points. An External job also lists
its results in ``RELION_OUTPUT_NODES.star`` so that later jobs can pick them as inputs.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from denovo3d.io.star import write_star

__all__ = [
    "ABORT_NOW",
    "EXIT_ABORTED",
    "EXIT_FAILURE",
    "EXIT_SUCCESS",
    "NODE_MAP",
    "NODE_OPTIMISATION_SET",
    "NODE_PARTICLES",
    "JobAbortedError",
    "PipelineControl",
    "write_output_nodes",
]

EXIT_SUCCESS = "RELION_JOB_EXIT_SUCCESS"
EXIT_FAILURE = "RELION_JOB_EXIT_FAILURE"
EXIT_ABORTED = "RELION_JOB_EXIT_ABORTED"
ABORT_NOW = "RELION_JOB_ABORT_NOW"

# node type labels as RELION 4/5's pipeline names them (pipeline_jobs.h)
NODE_MAP = "DensityMap.mrc"
NODE_PARTICLES = "ParticleGroupMetadata.star.relion"
NODE_OPTIMISATION_SET = "TomoOptimisationSet.star.relion"


class JobAbortedError(Exception):
    """The user asked the job to stop (``RELION_JOB_ABORT_NOW``); the last finished iteration
    stays on disc for ``--continue``."""


class PipelineControl:
    """Marker files and the abort trigger of one job directory.

    ``start()`` clears the markers of an earlier try; ``abort_requested()`` is cheap enough to
    call between sub-batches (:class:`denovo3d.progress.JobMonitor` does); ``succeeded()``,
    ``failed()`` and ``aborted()`` write the marker (``aborted`` also removes the trigger, so
    that ``--continue`` does not stop at once).
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    def start(self) -> None:
        for name in (EXIT_SUCCESS, EXIT_FAILURE, EXIT_ABORTED):
            (self.directory / name).unlink(missing_ok=True)

    def abort_requested(self) -> bool:
        return (self.directory / ABORT_NOW).exists()

    def _mark(self, name: str) -> Path:
        path = self.directory / name
        path.touch()
        return path

    def succeeded(self) -> Path:
        return self._mark(EXIT_SUCCESS)

    def failed(self) -> Path:
        return self._mark(EXIT_FAILURE)

    def aborted(self) -> Path:
        (self.directory / ABORT_NOW).unlink(missing_ok=True)
        return self._mark(EXIT_ABORTED)


def write_output_nodes(directory: str | Path, nodes: list[tuple[str, str]]) -> Path:
    """``RELION_OUTPUT_NODES.star``: ``(path as the project sees it, node type label)`` pairs."""
    path = Path(directory) / "RELION_OUTPUT_NODES.star"
    table = pd.DataFrame(
        {
            "rlnPipeLineNodeName": [name for name, _ in nodes],
            "rlnPipeLineNodeTypeLabel": [label for _, label in nodes],
        }
    )
    write_star(path, {"output_nodes": table})
    return path
