"""Does a map with Cn symmetry also have the 2-fold flips of Dn? Tested about the Cn axis.

Why: detection scores each element of a group by its excess over other turns about the same
axis (:func:`~denovo3d.symmetry_search.turn_excess`). About a flip's axis, which lies across a
ring of Cn subunits, the ring itself is the map's non-cylindrical part, and a flip maps the ring
onto itself whether or not the subunits match: the benchmark's C6 and C7 rings (trials 0-39)
were called D6 or D7 in 17 of 80. Here the flips are compared with the turns instead, at the
axis the Cn alignment found (the Dn alignment would tilt it to favour the flips):

    ratio = (1 - ρ_flips) / (1 - ρ_turns)

``ρ`` the mean normalised correlation of the map with its copies (the band's whitened,
cross-filtered correlation, :func:`~denovo3d.symmetry_search.pair_correlations`). Where both are
true symmetries, the copies differ by noise alone and the ratio is about 1; where the flips only
match the ring, their disagreement adds the subunits' own. On trials 0-19 of the recovery
phantoms: true D2 and D7 0.92-1.75 (median 1.1), C6 and C7 rings whose Cn holds 2.1-36 (median
7); held out, trials 20-39: true D 0.93-1.56, rings 2.8-15 but for trial 33 (1.50, 1.70).

The flips' axes lie in the plane normal to the Cn axis; their angle about it and the plane's
height along the axis (the centre of mass, where the alignment starts, moves along the axis
with a missing wedge) are searched on a grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from denovo3d.geometry.symmetry import axis_rotation, point_group
from denovo3d.symmetry_search import FourierBand, pair_correlations

__all__ = ["FlipTest", "dihedral_flips"]


@dataclass(frozen=True)
class FlipTest:
    """``turn_rho``: mean correlation of the map with its Cn turns; ``flip_rho``: with its n
    flips at the best angle ``flip_angle_deg`` (of the first flip's axis from the standard x
    axis, about z) and ``height_px`` (of their plane above the alignment's centre); ``ratio``:
    ``(1 - flip_rho) / max(1 - turn_rho, floor)``."""

    turn_rho: float
    flip_rho: float
    flip_angle_deg: float
    height_px: float
    ratio: float


def _flips(phi: torch.Tensor) -> torch.Tensor:
    """Half turns ``(..., 3, 3)`` about the axes at angles ``phi (...)`` from x in the xy plane."""
    axes = torch.stack([phi.cos(), phi.sin(), torch.zeros_like(phi)], -1)
    return axis_rotation(axes, torch.full_like(phi, math.pi))


def dihedral_flips(
    band: FourierBand,
    rotation: torch.Tensor,
    shift_px: torch.Tensor,
    n: int,
    angle_step_deg: float = 1.0,
    max_height_px: float = 2.0,
    height_step_px: float = 0.25,
    floor: float = 0.01,
) -> FlipTest:
    """The flip test of Dn about a Cn alignment: ``rotation (3, 3)`` onto the standard axes (z
    the n-fold axis) and the centre ``shift_px (3,)`` (input pixels, from the band's centre), as
    :func:`~denovo3d.symmetry_align.refine` returns them for Cn. ``floor`` keeps a nearly
    noiseless map's flips from failing on interpolation error alone."""
    r = rotation.to(torch.float64)
    dtype = band.coords.dtype
    z = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    turns = point_group(f"C{n}").operators[1:].to(torch.float64)  # about z, standard axes
    shift = shift_px.to(dtype)
    turn_rho = float(pair_correlations(band, (r.T @ turns @ r).to(dtype), shift).mean())
    # one flip of every set of n: angles in [0, π/n); the set is the angle plus multiples of π/n
    start = torch.arange(0.0, 180.0 / n, angle_step_deg, dtype=torch.float64)
    phi = torch.deg2rad(start[:, None] + torch.arange(n, dtype=torch.float64) * (180.0 / n))
    flips = (r.T @ _flips(phi) @ r).to(dtype)  # (angles, n, 3, 3)
    axis = (r.T @ z).to(dtype)
    steps = round(max_height_px / height_step_px)
    best = (-math.inf, 0.0, 0.0)
    for height in (torch.arange(-steps, steps + 1, dtype=torch.float64) * height_step_px).tolist():
        rho = pair_correlations(band, flips, shift + height * axis).mean(-1)
        i = int(rho.argmax())
        if float(rho[i]) > best[0]:
            best = (float(rho[i]), float(start[i]), height)
    flip_rho, angle, height = best
    ratio = (1 - flip_rho) / max(1 - turn_rho, floor)
    return FlipTest(turn_rho, flip_rho, angle, height, ratio)
