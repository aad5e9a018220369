"""RELION's ZYZ convention, pinned against eulerangles (which returns RELION's A transposed)."""

from __future__ import annotations

import numpy as np
import torch
from eulerangles import euler2matrix

from denovo3d.geometry.euler import euler_to_matrix, matrix_to_euler, random_rotations


def test_matrix_matches_eulerangles_transposed() -> None:
    rng = np.random.default_rng(1)
    eul = np.column_stack(
        [rng.uniform(-180, 180, 50), rng.uniform(0, 180, 50), rng.uniform(-180, 180, 50)]
    )
    ours = euler_to_matrix(*torch.tensor(eul).T).numpy()
    oracle = euler2matrix(eul, axes="zyz", intrinsic=True, right_handed_rotation=True)
    np.testing.assert_allclose(ours, np.transpose(oracle, (0, 2, 1)), atol=1e-12)


def test_known_matrix_rot90() -> None:
    # rot = 90 alone: RELION's A rotates the frame, so x_particle = (y, -x, z)
    A = euler_to_matrix(torch.tensor(90.0), torch.tensor(0.0), torch.tensor(0.0))
    expected = torch.tensor([[0.0, 1, 0], [-1, 0, 0], [0, 0, 1]])
    torch.testing.assert_close(A, expected, atol=1e-6, rtol=0)


def test_round_trip_including_gimbal_lock() -> None:
    R = random_rotations(200, torch.Generator().manual_seed(3))
    special = euler_to_matrix(
        torch.tensor([30.0, 0.0, 10.0]),
        torch.tensor([0.0, 180.0, 90.0]),
        torch.tensor([20.0, 45.0, 0.0]),
    )
    R = torch.cat([R, special.double()])
    back = euler_to_matrix(*matrix_to_euler(R))
    torch.testing.assert_close(back, R, atol=1e-5, rtol=0)
    tilt = matrix_to_euler(R)[1]
    assert bool((tilt >= 0).all() and (tilt <= 180).all())


def test_random_rotations_are_uniform() -> None:
    R = random_rotations(20000, torch.Generator().manual_seed(0))
    torch.testing.assert_close(
        R @ R.transpose(-1, -2), torch.eye(3, dtype=R.dtype).expand_as(R), atol=1e-10, rtol=0
    )
    assert torch.allclose(torch.linalg.det(R), torch.ones(len(R), dtype=R.dtype))
    # The rotated z axis is uniform on the sphere: cos(tilt) uniform on [-1, 1], mean 0, var 1/3
    z = R[:, 2, 2]
    assert abs(z.mean().item()) < 0.02 and abs(z.var().item() - 1 / 3) < 0.02
