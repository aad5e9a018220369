"""RELION's ZYZ Euler angles (rlnAngleRot, rlnAngleTilt, rlnAnglePsi) <-> rotation matrices.

``A = euler_to_matrix(rot, tilt, psi)`` is RELION's ``Euler_angles2matrix``: it maps volume
coordinates to particle (image) coordinates, ``x_particle = A @ x_volume`` in xyz order. The
particle's Fourier transform is then ``F_particle(k) = F_volume(Aᵀ k)``. (teamtomo functions and
``eulerangles`` use the transpose, ``Aᵀ``.)
"""

from __future__ import annotations

import math

import torch

__all__ = ["euler_to_matrix", "matrix_to_euler", "random_rotations"]


def euler_to_matrix(rot: torch.Tensor, tilt: torch.Tensor, psi: torch.Tensor) -> torch.Tensor:
    """RELION Euler angles in degrees, each ``(...)``, to matrices ``(..., 3, 3)`` (xyz)."""
    a, b, g = (torch.deg2rad(torch.as_tensor(t)) for t in (rot, tilt, psi))
    a, b, g = torch.broadcast_tensors(a, b, g)
    ca, sa, cb, sb, cg, sg = a.cos(), a.sin(), b.cos(), b.sin(), g.cos(), g.sin()
    cc, cs, sc, ss = cb * ca, cb * sa, sb * ca, sb * sa
    rows = [
        torch.stack([cg * cc - sg * sa, cg * cs + sg * ca, -cg * sb], -1),
        torch.stack([-sg * cc - cg * sa, -sg * cs + cg * ca, sg * sb], -1),
        torch.stack([sc, ss, cb], -1),
    ]
    return torch.stack(rows, -2)


def matrix_to_euler(A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Matrices ``(..., 3, 3)`` to RELION (rot, tilt, psi) in degrees, as ``Euler_matrix2angles``.

    Tilt is in [0, 180]; at tilt 0 or 180 (gimbal lock) rot is set to 0 and psi carries the
    in-plane angle, as RELION does.
    """
    A = torch.as_tensor(A)
    eps = 16 * torch.finfo(torch.float32).eps
    abs_sb = torch.sqrt(A[..., 0, 2] ** 2 + A[..., 1, 2] ** 2)
    regular = abs_sb > eps
    gamma = torch.atan2(A[..., 1, 2], -A[..., 0, 2])
    alpha = torch.atan2(A[..., 2, 1], A[..., 2, 0])
    beta = torch.atan2(abs_sb, A[..., 2, 2])  # sin(tilt) >= 0 with this (rot, psi) choice
    up = A[..., 2, 2] > 0
    gamma_lock = torch.where(
        up, torch.atan2(-A[..., 1, 0], A[..., 0, 0]), torch.atan2(A[..., 1, 0], -A[..., 0, 0])
    )
    beta_lock = torch.where(up, torch.zeros_like(beta), torch.full_like(beta, math.pi))
    rot = torch.where(regular, alpha, torch.zeros_like(alpha))
    tilt = torch.where(regular, beta, beta_lock)
    psi = torch.where(regular, gamma, gamma_lock)
    return torch.rad2deg(rot), torch.rad2deg(tilt), torch.rad2deg(psi)


def random_rotations(
    n: int, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """``n`` rotation matrices ``(n, 3, 3)`` uniform on SO(3) (normalised Gaussian quaternions)."""
    q = torch.randn(n, 4, generator=generator, dtype=dtype)
    q = q / q.norm(dim=-1, keepdim=True)
    w, x, y, z = q.unbind(-1)
    return torch.stack(
        [
            torch.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
            torch.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
            torch.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1),
        ],
        -2,
    )
