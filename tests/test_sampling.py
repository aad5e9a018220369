"""RELION's search grids: HEALPix (NEST) vs astropy-healpix, RELION's counts and directions."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from denovo3d.geometry.euler import euler_to_matrix
from denovo3d.geometry.sampling import (
    OrientationGrid,
    angular_step_deg,
    healpix_nest_pix2ang,
    offset_children,
    offset_grid,
    orientation_children,
)
from denovo3d.io.star import read_star

EXAMPLES = Path("/work/shared/reference/star-examples")


@pytest.mark.parametrize("order", [0, 1, 2, 3])
def test_healpix_nest_matches_astropy(order: int) -> None:
    astropy_healpix = pytest.importorskip("astropy_healpix")
    from astropy import units

    theta, phi = healpix_nest_pix2ang(order)
    hp = astropy_healpix.HEALPix(nside=2**order, order="nested")
    lon, lat = hp.healpix_to_lonlat(np.arange(12 * 4**order))
    np.testing.assert_allclose(phi.numpy(), lon.to_value(units.rad), atol=1e-12)
    np.testing.assert_allclose(theta.numpy(), np.pi / 2 - lat.to_value(units.rad), atol=1e-12)


def test_relion_counts_and_steps() -> None:
    assert [angular_step_deg(n) for n in (0, 1, 2, 3)] == [60.0, 30.0, 15.0, 7.5]
    assert len(OrientationGrid.build(1)) == 576
    assert len(OrientationGrid.build(2)) == 4608
    assert len(orientation_children(OrientationGrid.build(1))) == 4608
    assert offset_grid(6, 2).shape == (123, 3)


@pytest.mark.skipif(not (EXAMPLES / "relion5_vdam_sampling.star").is_file(), reason="no example")
def test_order1_directions_are_relions() -> None:
    table = read_star(EXAMPLES / "relion5_vdam_sampling.star")["sampling_directions"]
    grid = OrientationGrid.build(1)
    n_psi = 12
    rot, tilt = grid.rot[::n_psi].numpy(), grid.tilt[::n_psi].numpy()
    d_rot = (rot - table["rlnAngleRot"].to_numpy() + 180) % 360 - 180
    np.testing.assert_allclose(d_rot, 0, atol=1e-4)
    np.testing.assert_allclose(tilt, table["rlnAngleTilt"].to_numpy(), atol=1e-4)


def _angle_deg(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    cos = ((torch.einsum("...ij,...ij->...", a, b) - 1) / 2).clamp(-1, 1)
    return torch.rad2deg(torch.arccos(cos))


def test_children_lie_around_their_parent() -> None:
    coarse = OrientationGrid.build(1)
    fine = orientation_children(coarse)
    parent = coarse.matrices().repeat_interleave(8, dim=0)
    dist = _angle_deg(fine.matrices(), parent)
    assert float(dist.max()) < coarse.step_deg
    # the children are the order-2 grid's directions with psi between the coarse psi values
    assert set(fine.direction.tolist()) == set(range(192))
    assert torch.allclose(fine.tilt, fine.tilt)  # no NaN


def test_offset_grid_is_a_sphere_of_steps_and_children_split_cells() -> None:
    grid = offset_grid(6, 2)
    assert float(grid.norm(dim=1).max()) <= 6 + 1e-9
    assert torch.all(torch.remainder(grid, 2) == 0)
    kids = offset_children(grid, 2.0)
    assert kids.shape == (123 * 8, 3)
    np.testing.assert_allclose((kids.reshape(-1, 8, 3) - grid[:, None]).abs().numpy(), 0.5)


def test_matrices_follow_relion_euler() -> None:
    grid = OrientationGrid.build(0)
    A = grid.matrices(torch.tensor([5]))
    expected = euler_to_matrix(grid.rot[5], grid.tilt[5], grid.psi[5])
    torch.testing.assert_close(A[0], expected)
    assert math.isclose(float(grid.psi[1] - grid.psi[0]), 60.0)
