"""References in real space: initial references, soft spherical masks, solvent flattening,
non-negativity. Volumes are ``(..., s, s, s)`` ``(z, y, x)`` with the centre at voxel ``s // 2``."""

from __future__ import annotations

import math

import torch

from denovo3d.engine.voxels import VoxelSet, hermitian_complete
from denovo3d.fourier import centred_irfft, splat_rfft
from denovo3d.memory import WORKING_SET_BYTES

__all__ = [
    "initial_references",
    "mask_particles",
    "non_negative",
    "reconstruct",
    "soft_mask_outside",
    "soft_sphere",
    "solvent_flatten",
]


def soft_sphere(
    box: int, radius_px: float, edge_px: float, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """``(s, s, s)`` float32: 1 inside ``radius``, raised cosine to 0 over ``edge`` pixels."""
    axis = torch.arange(box, dtype=torch.float32, device=device) - box // 2
    z, y, x = torch.meshgrid(axis, axis, axis, indexing="ij")
    r = torch.sqrt(x * x + y * y + z * z)
    t = ((r - radius_px) / max(edge_px, 1e-6)).clamp(0, 1)
    return 0.5 + 0.5 * torch.cos(math.pi * t)


def soft_mask_outside(volume: torch.Tensor, radius_px: float, edge_px: float) -> torch.Tensor:
    """RELION's ``softMaskOutsideMap``: outside the soft sphere the map takes the mean value of
    its edge zone."""
    box = volume.shape[-1]
    m = soft_sphere(box, radius_px, edge_px, volume.device).to(volume.dtype)
    ring = (m < 1) & (m > 0)
    dims = (-3, -2, -1)
    bg = (volume * ring).sum(dim=dims, keepdim=True) / ring.sum().clamp_min(1)
    return volume * m + bg * (1 - m)


def solvent_flatten(volume: torch.Tensor, diameter_px: float, edge_px: float = 5.0) -> torch.Tensor:
    """Multiply by a soft sphere of the particle diameter (outside -> 0): ``--flatten_solvent``."""
    box = volume.shape[-1]
    return volume * soft_sphere(box, diameter_px / 2, edge_px, volume.device).to(volume.dtype)


def non_negative(volume: torch.Tensor) -> torch.Tensor:
    """Clamp negative densities to zero (real space)."""
    return volume.clamp_min(0)


def mask_particles(
    data: torch.Tensor, diameter_px: float, edge_px: float = 5.0, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``--zero_mask`` on Fourier data ``(b, s, s, s//2+1)``: soft sphere in real space, outside
    set to the edge mean; ``diameter_px`` in pixels of this box (into ``out`` if given)."""
    box = data.shape[-2]
    dims = (-3, -2, -1)
    # work in the transform's own frame (origin at voxel 0): the mask is shifted once instead of
    # every particle twice; vol·m + bg·(1 - m) in place as (vol - bg)·m + bg
    m = torch.fft.ifftshift(soft_sphere(box, diameter_px / 2, edge_px, data.device), dim=dims)
    m = m.to(data.real.dtype).reshape(-1)
    ring = torch.nonzero((m < 1) & (m > 0)).squeeze(1)  # the edge zone
    n_ring = max(1, ring.numel())
    out = torch.empty_like(data) if out is None else out
    # by chunks of particles under the working set: whole-batch volumes would be new mappings,
    # their pages faulted in at every sub-batch. The largest temporary is the complex half-grid
    # (the inverse FFT copies its input), 8% larger than the volume. The edge mean is a sum per
    # particle (a GEMV summed differently with the number of rows: a particle's result hung on
    # its sub-batch)
    step = max(1, WORKING_SET_BYTES // (data[:1].numel() * data.element_size()))
    for i in range(0, data.shape[0], step):
        vol = torch.fft.irfftn(data[i : i + step], s=(box, box, box), dim=dims)
        flat = vol.reshape(vol.shape[0], -1)
        bg = (flat.index_select(1, ring).sum(dim=1) / n_ring)[:, None]
        flat.sub_(bg).mul_(m).add_(bg)
        torch.fft.rfftn(vol, dim=dims, out=out[i : i + step])
    return out


def initial_references(
    data: torch.Tensor,
    ctf2: torch.Tensor,
    rotations: torch.Tensor,
    class_of: torch.Tensor,
    K: int,
    voxels: VoxelSet,
) -> torch.Tensor:
    """Back-projections of particles at given (random) orientations, one reference per class.

    ``data, ctf2 (n, s, s, s//2+1)``; ``rotations (n, 3, 3)`` RELION matrices; ``class_of (n,)``
    in ``0..K-1`` (different particles per class). Each class is ``Σ D / Σ C`` (floored) on the
    voxels of ``voxels`` (low-pass), returned in real space ``(K, s, s, s)``.
    """
    box = data.shape[-2]
    d = voxels.take(data) * (0.5 * voxels.friedel)
    c = voxels.take(ctf2) * (0.5 * voxels.friedel)
    coords = voxels.coords @ rotations.to(voxels.coords)  # (n, V, 3)
    out = []
    for k in range(K):
        mine = torch.nonzero(class_of == k).squeeze(1)
        num = hermitian_complete(splat_rfft(d[mine], coords[mine], box))
        den = hermitian_complete(splat_rfft(c[mine], coords[mine], box))
        floor = 1e-3 * float(den[den > 0].mean()) if bool((den > 0).any()) else 1.0
        ft = num / den.clamp_min(floor)
        keep = torch.zeros(box * box * (box // 2 + 1), dtype=torch.bool, device=data.device)
        keep[voxels.index] = True
        ft = ft * keep.reshape(ft.shape)
        out.append(centred_irfft(ft, box))
    return torch.stack(out)


def reconstruct(
    data: torch.Tensor,
    ctf2: torch.Tensor,
    rotations: torch.Tensor,
    offsets_px: torch.Tensor,
    box_px: int,
    chunk: int = 32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Back-projection sums with known poses: ``Σ D·e^{+2πi k·t/s}`` and ``Σ C`` on the half grid.

    ``data, ctf2 (n, s, s, s//2+1)``; ``rotations (n, 3, 3)``; ``offsets_px (n, 3)`` where the
    particles sit (``-rlnOrigin``). Returns ``(numerator complex, weight real)``, each
    ``(s, s, s//2+1)``; the map is ``numerator / weight`` (floored).
    """
    from denovo3d.engine.projector import backproject

    box = data.shape[-2]
    vox = VoxelSet.build(box, box / 2, data.device)
    half = 0.5 * vox.friedel
    num = torch.zeros(box, box, box // 2 + 1, dtype=torch.complex64, device=data.device)
    den = torch.zeros(box, box, box // 2 + 1, device=data.device)
    for s in range(0, data.shape[0], chunk):
        phases = vox.phases(offsets_px[s : s + chunk].float(), box_px)
        coords = vox.coords @ rotations[s : s + chunk].float()
        num += backproject(vox.take(data[s : s + chunk]) * phases * half, coords, box)
        den += backproject(vox.take(ctf2[s : s + chunk]) * half, coords, box)
    return num, den
