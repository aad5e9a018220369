"""``<map>_symmetry.star``: what the symmetry step found, beside the map it wrote.

Blocks (read by ``denovo3d report``, which shows them as the symmetry scores tables, and by
``chimerax.py``, which takes the group's standard axes from ``rlnSymmetryGroup``):

- ``symmetry_general``: ``rlnSymmetryGroup`` (the group applied; C1 when detection was unclear),
  ``denovoSymmetryRequested`` (the ``--sym`` given, e.g. ``auto``), the rotation that put the
  map on the group's axes as RELION Euler angles ``rlnAngleRot/Tilt/Psi`` (degrees; the map
  written is ``V(Rᵀx + c)`` with ``R`` the matrix of these angles), the shift ``c`` of the
  symmetry centre from the box centre ``rlnOriginX/Y/ZAngst`` (Å), the mean correlation with the
  symmetry copies ``denovoSymmetryScore``; after detection also ``denovoDetectedGroup``,
  ``denovoSymmetryRunnerUp``, ``denovoSymmetryAlsoHolds`` (for a verdict Dn, Cn when it holds
  too: a ring of Cn subunits can look Dn at low resolution), ``denovoSymmetryEvidence`` (the
  verdict's significance) and the excess agreement of randomly turned copies
  ``denovoRandomTurnExcess`` (median) and ``denovoRandomTurnExcessSd``.
- ``symmetry_operators``: per non-identity operator of the group (standard orientation), its
  turn angle, direction and the map's correlation with its copy under it.
- ``symmetry_detection``: per candidate group, order, score and significance (when detection ran),
  for Dn whose Cn holds the flip test's ratio ``denovoGroupFlipRatio`` (-1 where not run), and
  the least over the group's elements of their best shell's agreement
  ``denovoGroupPeakAgreement`` (-1 where not measured).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch

from denovo3d.geometry.symmetry import point_group
from denovo3d.io.star import write_star
from denovo3d.symmetry_align import Detection, SymmetryAlignment
from denovo3d.symmetry_search import operator_directions

__all__ = ["symmetry_star_path", "write_symmetry_star"]


def symmetry_star_path(map_path: str | Path) -> Path:
    """``initial_model.mrc`` -> ``initial_model_symmetry.star`` (same directory)."""
    path = Path(map_path)
    return path.with_name(f"{path.stem}_symmetry.star")


def write_symmetry_star(
    path: str | Path,
    alignment: SymmetryAlignment,
    pixel_size_a: float,
    requested: str,
    detection: Detection | None = None,
) -> Path:
    """Write the blocks described in the module docstring; returns the path."""
    rot, tilt, psi = alignment.euler_deg
    cx, cy, cz = (alignment.centre_px * pixel_size_a).tolist()
    general: dict[str, object] = {
        "rlnSymmetryGroup": alignment.group,
        "denovoSymmetryRequested": requested,
        "rlnAngleRot": rot,
        "rlnAngleTilt": tilt,
        "rlnAnglePsi": psi,
        "rlnOriginXAngst": cx,
        "rlnOriginYAngst": cy,
        "rlnOriginZAngst": cz,
        "denovoSymmetryScore": alignment.score,
    }
    if detection is not None:
        general.update(
            {
                "denovoDetectedGroup": detection.verdict,
                "denovoSymmetryRunnerUp": detection.runner_up or "none",
                "denovoSymmetryAlsoHolds": detection.also_holds or "none",
                "denovoSymmetryEvidence": detection.evidence,
                "denovoRandomTurnExcess": detection.null,
                "denovoRandomTurnExcessSd": detection.null_sd,
            }
        )
    # key-value blocks are written with str(): the same 8 significant digits as the loops
    general = {k: float(f"{v:.8g}") if isinstance(v, float) else v for k, v in general.items()}
    blocks: dict[str, pd.DataFrame | dict] = {"symmetry_general": general}
    group = point_group(alignment.group)
    if group.order > 1:
        ops = group.operators[1:]
        dirs, angles = operator_directions(ops)
        blocks["symmetry_operators"] = pd.DataFrame(
            {
                "denovoOperator": list(range(2, group.order + 1)),
                "denovoOperatorProper": (torch.linalg.det(ops) > 0).int().tolist(),
                "denovoOperatorAngleDeg": torch.rad2deg(angles).tolist(),
                "denovoOperatorDirX": dirs[:, 0].tolist(),
                "denovoOperatorDirY": dirs[:, 1].tolist(),
                "denovoOperatorDirZ": dirs[:, 2].tolist(),
                "denovoOperatorCorrelation": alignment.correlations.tolist(),
            }
        )
    if detection is not None:
        blocks["symmetry_detection"] = pd.DataFrame(
            {
                "denovoGroup": [r.group for r in detection.rows],
                "denovoGroupOrder": [r.order for r in detection.rows],
                "denovoGroupScore": [r.score for r in detection.rows],
                "denovoGroupSignificance": [r.significance for r in detection.rows],
                # -1 where the flip test was not run (not Dn, or its Cn does not hold)
                "denovoGroupFlipRatio": [
                    -1.0 if r.flip_ratio is None else r.flip_ratio for r in detection.rows
                ],
                "denovoGroupPeakAgreement": [
                    -1.0 if r.peak_agreement is None else r.peak_agreement for r in detection.rows
                ],
            }
        )
    return write_star(path, blocks)
