"""The last refinement of Cn and Dn alignments (denovo3d.symmetry_polish) on wedged phantoms."""

from __future__ import annotations

import math

import pytest
import torch

from denovo3d.geometry.symmetry import axis_rotation, point_group
from denovo3d.symmetry_polish import applies, polish
from denovo3d.symmetry_search import orientation_error_deg
from tests.symmetry_phantoms import degrade, recovery_clean


def _shells_agreeing(n_agree: int, n_shells: int = 33) -> torch.Tensor:
    """A shell model's agreement ``ρ``: good to shell ``n_agree``, poor (below the polish's
    ``rho_min``) beyond."""
    return torch.where(torch.arange(n_shells) <= n_agree, 0.9, 0.05).double()


def test_applies_to_cyclic_and_dihedral_groups_only() -> None:
    assert [applies(point_group(n)) for n in ("C2", "C7", "D2", "D7")] == [True] * 4
    assert [applies(point_group(n)) for n in ("C1", "T", "O", "I", "C2v", "D2h")] == [False] * 6


@pytest.mark.parametrize(("group", "trial"), [("C2", 3), ("D2", 5)])
def test_returns_to_the_axes_from_two_degrees_off_through_a_missing_wedge(
    group: str, trial: int
) -> None:
    """Noise-free but wedged and blurred (the filter does not turn with the map): from 2° off the
    axes and 0.8 px off the centre, the polish comes back to both."""
    torch.set_num_threads(min(2, torch.get_num_threads()))
    g = point_group(group)
    clean, truth, shift = recovery_clean(group, trial)
    volume = degrade(clean, seed=trial, noise_sd_rel=0.0).float()
    tilt = axis_rotation(torch.tensor([1.0, 1.0, 0.3], dtype=torch.float64), math.radians(2.0))
    start = tilt @ truth.T
    assert float(orientation_error_deg(start, truth, g)) > 1.5
    centre0 = shift + torch.tensor([0.5, -0.4, 0.5], dtype=torch.float64)
    r, centre, score = polish(volume, g, start, centre0, _shells_agreeing(10), 20.0)
    assert float(orientation_error_deg(r, truth, g)) < 0.3
    # the symmetry centre lies on the true axis (Cn) or at the true centre (Dn)
    miss = centre - shift
    axis = truth[:, 2]  # the symmetry axis in the map's frame
    off_axis = miss - (miss @ axis) * axis if group.startswith("C") else miss
    assert float(off_axis.norm()) < 0.3
    assert score > 0.9
