"""Fast trilinear rotation (gather) and back-projection (scatter) through ``grid_sample``.

References are held as full, centred Fourier volumes with re/im as two channels,
``(K, 2, S, S, S)`` float, index ``k + S/2`` (z, y, x). Gathering at ``k @ A`` is one
``grid_sample`` call (trilinear, zeros outside); back-projection is its adjoint
(``grid_sampler_3d_backward``) followed by a Friedel fold to the ``rfftn`` half grid. Both match
:func:`denovo3d.fourier.sample_rfft` / :func:`~denovo3d.fourier.splat_rfft` (+ the ``kx = 0``
completion) inside the Nyquist sphere, at a fraction of the cost.
"""

from __future__ import annotations

import torch
from torch.nn import functional

from denovo3d.fourier import rfft_coords

__all__ = ["backproject", "full_centred", "gather"]


def _full_coords(box: int, device) -> torch.Tensor:
    axis = torch.arange(box, device=device) - box // 2
    kz, ky, kx = torch.meshgrid(axis, axis, axis, indexing="ij")
    return torch.stack([kx, ky, kz], -1)  # (S, S, S, 3) xyz


def full_centred(half: torch.Tensor) -> torch.Tensor:
    """Half grids ``(K, S, S, S//2+1)`` complex -> full centred ``(K, 2, S, S, S)`` real."""
    box = half.shape[-2]
    k = _full_coords(box, half.device)
    flip = k[..., 0] < 0
    src = torch.where(flip[..., None], -k, k) % box
    flat = (src[..., 2] * box + src[..., 1]) * (box // 2 + 1) + src[..., 0]
    values = half.reshape(half.shape[0], -1)[:, flat.reshape(-1)].reshape(-1, box, box, box)
    values = torch.where(flip, values.conj(), values)
    return torch.view_as_real(values).permute(0, 4, 1, 2, 3).contiguous()


def _grid(coords: torch.Tensor, box: int, dtype: torch.dtype) -> torch.Tensor:
    """Frequencies ``(..., 3)`` -> grid_sample's normalised coordinates (align_corners)."""
    return ((coords + box // 2) * (2.0 / (box - 1)) - 1.0).to(dtype)


def gather(full: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Samples of one full centred volume ``(C, S, S, S)`` at ``coords (O, V, 3)`` ->
    ``(O, V)`` complex (C = 2) or real (C = 1)."""
    box = full.shape[-1]
    grid = _grid(coords, box, full.dtype)[None, :, :, None, :]  # (1, O, V, 1, 3)
    out = functional.grid_sample(
        full[None], grid, mode="bilinear", padding_mode="zeros", align_corners=True
    )
    out = out[0, :, :, :, 0]  # (C, O, V)
    if full.shape[0] == 2:
        return torch.complex(out[0], out[1])
    return out[0]


def backproject(values: torch.Tensor, coords: torch.Tensor, box: int) -> torch.Tensor:
    """Adjoint of :func:`gather`, folded onto the half grid: ``values (O, V)`` at ``coords
    (O, V, 3)`` -> ``(S, S, S//2+1)`` with ``H(k) = Full(k) + conj(Full(-k))``.

    A voxel of the particle's half grid stands for itself and its Friedel mate, so the caller
    scales values by half the Friedel weight (1 for ``kx > 0``, ½ on ``kx = 0``).
    """
    if values.is_complex():
        grad = torch.stack([values.real, values.imag])[None, :, :, :, None]
    else:
        grad = values[None, None, :, :, None]
    dtype = grad.dtype
    channels = grad.shape[1]
    grid = _grid(coords, box, dtype)[None, :, :, None, :]
    shape = (1, channels, box, box, box)
    dummy = torch.zeros(shape, dtype=dtype, device=values.device)
    full, _ = torch.ops.aten.grid_sampler_3d_backward(
        grad.contiguous(), dummy, grid, 0, 0, True, [True, False]
    )
    full = full[0]
    vol = torch.complex(full[0], full[1]) if channels == 2 else full[0]
    return _fold(vol)


def _fold(full: torch.Tensor) -> torch.Tensor:
    """Full centred ``(S, S, S)`` -> half grid with the Friedel mates added."""
    box = full.shape[-1]
    k = rfft_coords(box, full.device).long()  # (S, S, H, 3)
    pos = (k + box // 2) % box  # index of +k in the centred grid (wraps -S/2)
    neg = (-k + box // 2) % box
    a = full[pos[..., 2], pos[..., 1], pos[..., 0]]
    b = full[neg[..., 2], neg[..., 1], neg[..., 0]]
    return a + (b.conj() if full.is_complex() else b)
