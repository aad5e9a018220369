"""RELION's search grids: HEALPix orientations (NEST) with psi, 3D offsets, and their children.

- Directions: HEALPix order ``n`` in NEST numbering, ``12·4ⁿ`` pixels; (rot, tilt) = (φ, θ) of the
  pixel centre in degrees. Angular step ``360 / (6·2ⁿ)`` (n=1: 30°, n=2: 15°); the psi step is the
  same, psi = ``i·step``. Orientation index = ``direction·n_psi + psi`` (RELION's order).
- Adaptive oversampling by one order: a coarse orientation has 8 children (the 4 NEST children of
  its direction × psi ± step/4), child index ``8·coarse + 2·direction_child + psi_child``;
  a coarse offset has 8 children ``t ± step/4`` per axis, index ``8·coarse + child``.
- Offsets: every point of a cubic grid of ``offset_step_px`` inside a sphere of ``offset_range_px``
  (6/2 px -> 123 points), xyz in pixels.

Counts as RELION: 576 orientations at 30°, 4608 at 15° (= 8 × 576).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from denovo3d.geometry.euler import euler_to_matrix

__all__ = [
    "OrientationGrid",
    "angular_step_deg",
    "healpix_nest_pix2ang",
    "offset_children",
    "offset_grid",
    "orientation_children",
    "perturbation_rotation",
]

_JRLL = (2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4)
_JPLL = (1, 3, 5, 7, 0, 2, 4, 6, 1, 3, 5, 7)


def angular_step_deg(healpix_order: int) -> float:
    """RELION's angular step of HEALPix order ``n``: ``360 / (6·2ⁿ)`` degrees."""
    return 360.0 / (6 * 2**healpix_order)


def _compress_bits(v: torch.Tensor) -> torch.Tensor:
    """Keep the even bits of ``v`` packed together (de-interleave a Morton code)."""
    out = torch.zeros_like(v)
    for bit in range(16):
        out |= ((v >> (2 * bit)) & 1) << bit
    return out


def healpix_nest_pix2ang(order: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Centres of all NEST pixels of ``order``: ``theta, phi (12·4ⁿ,)`` float64 radians."""
    nside = 2**order
    npface = nside * nside
    npix = 12 * npface
    pix = torch.arange(npix, dtype=torch.int64)
    face = pix // npface
    ipf = pix % npface
    ix, iy = _compress_bits(ipf), _compress_bits(ipf >> 1)
    jr = torch.tensor(_JRLL)[face] * nside - ix - iy - 1
    fact2 = 4.0 / npix
    fact1 = 2 * nside * fact2
    north, south = jr < nside, jr > 3 * nside
    nr = torch.where(north, jr, torch.where(south, 4 * nside - jr, torch.full_like(jr, nside)))
    z_polar = 1.0 - nr.double() ** 2 * fact2
    z = torch.where(north, z_polar, torch.where(south, -z_polar, (2 * nside - jr).double() * fact1))
    kshift = torch.where(north | south, torch.zeros_like(jr), (jr - nside) & 1)
    jp = (torch.tensor(_JPLL)[face] * nr + ix - iy + 1 + kshift) // 2
    jp = torch.where(jp > 4 * nside, jp - 4 * nside, jp)
    jp = torch.where(jp < 1, jp + 4 * nside, jp)
    phi = (jp.double() - (kshift.double() + 1) * 0.5) * (math.pi / 2 / nr.double())
    return torch.arccos(z.clamp(-1, 1)), phi


@dataclass(frozen=True)
class OrientationGrid:
    """All orientations of one HEALPix order: angles ``(O,)`` in degrees and matrices ``(O,3,3)``.

    ``direction (O,)`` is the HEALPix pixel of each orientation (for a per-direction prior).
    """

    healpix_order: int
    rot: torch.Tensor
    tilt: torch.Tensor
    psi: torch.Tensor
    direction: torch.Tensor

    @classmethod
    def build(cls, healpix_order: int) -> OrientationGrid:
        theta, phi = healpix_nest_pix2ang(healpix_order)
        step = angular_step_deg(healpix_order)
        n_psi = round(360.0 / step)
        psi = torch.arange(n_psi, dtype=torch.float64) * step
        n_dir = theta.numel()
        rot = torch.rad2deg(phi).repeat_interleave(n_psi)
        rot = torch.where(rot > 180.0, rot - 360.0, rot)
        tilt = torch.rad2deg(theta).repeat_interleave(n_psi)
        direction = torch.arange(n_dir).repeat_interleave(n_psi)
        return cls(healpix_order, rot, tilt, psi.repeat(n_dir), direction)

    @property
    def step_deg(self) -> float:
        return angular_step_deg(self.healpix_order)

    def __len__(self) -> int:
        return int(self.rot.numel())

    def matrices(self, index: torch.Tensor | None = None) -> torch.Tensor:
        """RELION matrices ``A (O, 3, 3)`` float64 (``x_particle = A x_volume``)."""
        if index is None:
            return euler_to_matrix(self.rot, self.tilt, self.psi)
        return euler_to_matrix(self.rot[index], self.tilt[index], self.psi[index])


def orientation_children(coarse: OrientationGrid) -> OrientationGrid:
    """The grid one order finer, ordered as children: ``8·coarse + 2·direction_child + psi_child``.

    Directions are the NEST children ``4p..4p+3`` (order n+1); psi is ``psi_c ∓ step_c/4``.
    """
    fine_order = coarse.healpix_order + 1
    theta, phi = healpix_nest_pix2ang(fine_order)
    dir_c = coarse.direction  # (O_c,)
    child_dir = (4 * dir_c[:, None] + torch.arange(4)[None, :]).repeat_interleave(2, dim=1)
    psi = coarse.psi[:, None] + coarse.step_deg * torch.tensor([-0.25, 0.25]).double().repeat(4)
    rot = torch.rad2deg(phi)[child_dir]
    rot = torch.where(rot > 180.0, rot - 360.0, rot)
    return OrientationGrid(
        fine_order,
        rot.reshape(-1),
        torch.rad2deg(theta)[child_dir].reshape(-1),
        psi.reshape(-1),
        child_dir.reshape(-1),
    )


def offset_grid(offset_range_px: float, offset_step_px: float) -> torch.Tensor:
    """Grid points ``(T, 3)`` xyz (pixels, float64) of ``step`` inside a sphere of ``range``."""
    n = math.floor(offset_range_px / offset_step_px + 1e-9)
    axis = torch.arange(-n, n + 1, dtype=torch.float64) * offset_step_px
    z, y, x = torch.meshgrid(axis, axis, axis, indexing="ij")
    points = torch.stack([x, y, z], -1).reshape(-1, 3)
    keep = points.norm(dim=1) <= offset_range_px + 1e-9
    return points[keep]


def offset_children(coarse: torch.Tensor, offset_step_px: float) -> torch.Tensor:
    """Children ``(8·T, 3)`` of offsets ``(T, 3)``: ``t ± step/4`` per axis, index ``8t + c``."""
    signs = torch.tensor(
        [[sx, sy, sz] for sz in (-1, 1) for sy in (-1, 1) for sx in (-1, 1)], dtype=coarse.dtype
    )
    return (coarse[:, None, :] + 0.25 * offset_step_px * signs[None]).reshape(-1, 3)


def perturbation_rotation(
    step_deg: float, factor: float, generator: torch.Generator
) -> torch.Tensor:
    """A random rotation ``(3, 3)`` float64 of angle ``≤ factor·step`` about a random axis.

    Applied to the whole grid each iteration (RELION's ``--perturb``), so successive mini-batches
    see different grid points.
    """
    axis = torch.randn(3, generator=generator, dtype=torch.float64)
    x, y, z = (axis / axis.norm()).tolist()
    angle = math.radians(step_deg * factor) * float(torch.rand(1, generator=generator))
    k = torch.tensor(
        [[0.0, -z, y], [z, 0.0, -x], [-y, x, 0.0]],
        dtype=torch.float64,
    )
    return torch.eye(3, dtype=torch.float64) + math.sin(angle) * k + (1 - math.cos(angle)) * k @ k
