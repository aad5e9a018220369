"""Fourier shell correlation with RELION's binning, and the resolution where it crosses a level.

Binning as RELION's ``getFSC``: every voxel of the ``rfftn`` half grid (x = 0 plane included
once, no Friedel weighting) goes to shell ``round(|k|)``; shells ``0 .. s/2`` are returned and
voxels beyond ``s/2`` are ignored.
"""

from __future__ import annotations

import torch

from denovo3d.fourier import rfft_radius

__all__ = ["fsc", "fsc_volumes", "resolution_at", "shell_index"]


def shell_index(box: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Shell of every half-grid voxel, ``(s, s, s//2+1)`` int64, ``round(|k|)``."""
    return torch.round(rfft_radius(box, device)).long()


def fsc(a_ft: torch.Tensor, b_ft: torch.Tensor) -> torch.Tensor:
    """FSC of half-grid transforms ``(..., s, s, s//2+1)`` complex -> ``(..., s//2+1)`` float64.

    Leading dimensions are batch dimensions (broadcast). A shell with no power reads 0.
    """
    box = a_ft.shape[-2]
    n_shells = box // 2 + 1
    shells = shell_index(box, a_ft.device).reshape(-1)
    keep = shells < n_shells
    idx = shells[keep]
    a, b = torch.broadcast_tensors(a_ft, b_ft)
    batch = a.shape[:-3]
    a = a.reshape(*batch, -1)[..., keep].to(torch.complex128)
    b = b.reshape(*batch, -1)[..., keep].to(torch.complex128)

    def shell_sum(values: torch.Tensor) -> torch.Tensor:
        out = values.new_zeros((*batch, n_shells))
        return out.index_add_(-1, idx, values)

    num = shell_sum((a.conj() * b).real)
    den = torch.sqrt(shell_sum(a.abs() ** 2) * shell_sum(b.abs() ** 2))
    return torch.where(den > 0, num / den.clamp_min(1e-300), torch.zeros_like(num))


def fsc_volumes(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """FSC of real volumes ``(..., s, s, s)`` (same centre) -> ``(..., s//2+1)``."""
    dims = (-3, -2, -1)
    return fsc(torch.fft.rfftn(a.double(), dim=dims), torch.fft.rfftn(b.double(), dim=dims))


def resolution_at(curve: torch.Tensor, threshold: float, box: int, pixel_size_a: float) -> float:
    """Resolution in Å of the last shell before ``curve`` first drops below ``threshold``.

    As RELION reports it: scanning from shell 1, the answer is ``box·pixel/i`` for the last shell
    ``i`` with FSC ≥ threshold. Returns ``inf`` if shell 1 is already below, and Nyquist
    (``2·pixel``) if the curve never drops.
    """
    values = curve.detach().cpu().reshape(-1).tolist()
    last = 0
    for i in range(1, len(values)):
        if values[i] < threshold:
            break
        last = i
    return float("inf") if last == 0 else box * pixel_size_a / last
