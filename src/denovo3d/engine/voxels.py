"""The Fourier voxels the engine works on: half-grid voxels inside the current radius.

A :class:`VoxelSet` lists the voxels of a ``box`` half grid with ``|k| < radius``: their flat
index in that grid, integer frequencies ``k`` (xyz, cycles per box), shell ``round(|k|)`` and the
Friedel weight (2 for ``kx > 0``: the voxel stands for itself and its mate ``-k``; 1 on the
``kx = 0`` plane, where both mates are listed). Sums over a VoxelSet with these weights are sums
over the full Fourier space.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from denovo3d.fourier import rfft_coords

__all__ = ["VoxelSet", "hermitian_complete", "shell_means"]


@dataclass(frozen=True)
class VoxelSet:
    """Voxels of a ``box`` half grid with ``|k| < radius`` (see the module docstring).

    ``index (V,)`` int64 into the flattened ``(s, s, s//2+1)`` grid; ``coords (V, 3)`` float;
    ``shell (V,)`` int64; ``friedel (V,)`` float (1 or 2).
    """

    box: int
    radius: float
    index: torch.Tensor
    coords: torch.Tensor
    shell: torch.Tensor
    friedel: torch.Tensor

    @classmethod
    def build(
        cls,
        box: int,
        radius: float,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> VoxelSet:
        k = rfft_coords(box, device).reshape(-1, 3)
        r = k.norm(dim=1)
        keep = r < min(radius, box / 2)
        index = torch.nonzero(keep).squeeze(1)
        coords = k[index].to(dtype)
        friedel = torch.where(coords[:, 0] > 0, 2.0, 1.0).to(dtype)
        return cls(box, float(radius), index, coords, torch.round(r[index]).long(), friedel)

    def __len__(self) -> int:
        return int(self.index.numel())

    def take(self, volumes: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``(..., s, s, s//2+1)`` -> ``(..., V)`` (the volumes must be at ``box``; into ``out``
        if given)."""
        flat = volumes.reshape(*volumes.shape[:-3], -1)
        if (
            volumes.dtype == torch.complex64
            and flat.dim() == 2
            and flat.stride(-1) == 1
            and (out is None or out.is_contiguous())
        ):
            # the same copy as index_select, 1.6x faster: a gather of 8-byte words
            if out is None:
                out = flat.new_empty((flat.shape[0], len(self)))
            index = self.index.expand(flat.shape[0], -1)
            torch.gather(flat.view(torch.float64), 1, index, out=out.view(torch.float64))
            return out
        return torch.index_select(flat, -1, self.index, out=out)

    def phases(
        self, offsets_px: torch.Tensor, box: int, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``exp(+2πi k·t/box)`` for offsets ``(T, 3)`` px -> ``(T, V)`` complex (into ``out``, a
        contiguous complex ``(T, V)``, if given): multiplying a particle's transform by it moves
        the content by ``-t`` (back to the centre)."""
        # one cos over (φ, φ - π/2) interleaved writes (cos φ, sin φ) as the complex table: 2x
        # faster than cos, sin and torch.complex (3x faster than torch.polar)
        t = offsets_px.to(self.coords) * (2.0 * torch.pi / box)
        t = torch.cat([t, torch.ones_like(t[:, :1])], 1)  # (T, 4): the last column takes -π/2
        k = torch.cat([self.coords.T, self.coords.new_zeros(1, len(self))]).repeat_interleave(2, 1)
        k[3, 1::2] = -0.5 * torch.pi
        if out is None:
            complex_dtype = self.coords.dtype.to_complex()
            out = torch.empty((t.shape[0], len(self)), dtype=complex_dtype, device=t.device)
        phase = torch.view_as_real(out).view(t.shape[0], -1)  # (T, 2V): re, im interleaved
        torch.matmul(t, k, out=phase).cos_()
        return out


def shell_means(values: torch.Tensor, shell: torch.Tensor, n_shells: int) -> torch.Tensor:
    """Mean of ``values (..., V)`` per shell -> ``(..., n_shells)`` (0 for an empty shell)."""
    keep = shell < n_shells
    idx = shell[keep]
    vals = values[..., keep]
    total = vals.new_zeros((*vals.shape[:-1], n_shells)).index_add_(-1, idx, vals)
    count = torch.zeros(n_shells, dtype=vals.dtype, device=vals.device)
    count.index_add_(0, idx, torch.ones_like(idx, dtype=vals.dtype))
    return total / count.clamp_min(1)


def hermitian_complete(acc: torch.Tensor) -> torch.Tensor:
    """Add to the ``kx = 0`` plane of a half grid ``(..., s, s, s//2+1)`` its Friedel mates.

    After a trilinear splat, the ``kx = 0`` entries hold only what landed on them directly; the
    mates ``(0, -ky, -kz)`` of the full-space accumulator add ``conj`` of each other.
    """
    plane = acc[..., 0]
    mate = torch.roll(torch.flip(plane, dims=(-2, -1)), shifts=(1, 1), dims=(-2, -1))
    out = acc.clone()
    out[..., 0] = plane + (mate.conj() if acc.is_complex() else mate)
    return out
