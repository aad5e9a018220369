"""Superpose a map onto a reference map (rotation, shift, hand), to compare a de novo result with
the truth. Reuses the E-step: the map is a "particle" with C = 1 searched against the reference,
then refined locally by random small rotations and shifts.
"""

from __future__ import annotations

import math

import torch

from denovo3d.engine.expectation import PassGrid, Search, align
from denovo3d.engine.projector import full_centred
from denovo3d.engine.voxels import VoxelSet
from denovo3d.fourier import centred_irfft, centred_rfft, sample_rfft
from denovo3d.geometry.sampling import (
    OrientationGrid,
    offset_children,
    offset_grid,
    orientation_children,
)

__all__ = ["superpose"]


def _transform(ft: torch.Tensor, rotation: torch.Tensor, shift_px: torch.Tensor) -> torch.Tensor:
    """``out(q) = ft(A q)·exp(+2πi (A q)·t / s)`` on the whole half grid (undoes a pose)."""
    box = ft.shape[-2]
    vox = VoxelSet.build(box, box / 2, ft.device, torch.float64)
    q = vox.coords @ rotation.T.double()
    phase = 2 * math.pi * (q @ shift_px.double()) / box
    values = sample_rfft(ft.to(torch.complex128), q) * torch.polar(torch.ones_like(phase), phase)
    out = torch.zeros(box * box * (box // 2 + 1), dtype=torch.complex128, device=ft.device)
    out[vox.index] = values
    return out.reshape(box, box, box // 2 + 1)


def _score(ref: torch.Tensor, ft: torch.Tensor, rot: torch.Tensor, shift: torch.Tensor, vox):
    q = vox.coords.double() @ rot.transpose(-1, -2).double()  # (n, V, 3)
    phase = 2 * math.pi * (q @ shift.double()[..., None]).squeeze(-1) / ft.shape[-2]
    vals = sample_rfft(ft, q) * torch.polar(torch.ones_like(phase), phase)
    r = vox.take(ref)
    return ((vals.conj() * r).real * vox.friedel).sum(-1) / (
        ((vals.abs() ** 2) * vox.friedel).sum(-1).sqrt()
        * ((r.abs() ** 2) * vox.friedel).sum().sqrt()
    )


def _global(ft: torch.Tensor, ref_ft: torch.Tensor, radius: float):
    box = ft.shape[-2]
    vox = VoxelSet.build(box, radius, ft.device)
    coarse = OrientationGrid.build(2)
    fine = orientation_children(coarse)
    t_c = offset_grid(4.0, 2.0)
    norm = ref_ft.abs().max()
    one = torch.ones_like(vox.friedel)
    grid_c = PassGrid(coarse.matrices().float(), t_c.float(), vox, one, box)
    grid_f = PassGrid(fine.matrices().float(), offset_children(t_c, 2.0).float(), vox, one, box)
    search = Search(grid_c, grid_f, torch.zeros(1), 1e6, 0.999, 50)
    ctf = torch.ones((1, *ft.shape), device=ft.device)
    data = (ft / norm)[None].to(torch.complex64)
    al = align(data, ctf, full_centred((ref_ft / norm)[None].to(torch.complex64)), search)
    rot = fine.matrices()[al.best_ko[0]]
    shift = grid_f.offsets_px[al.best_offset[0]].double()
    return rot, shift


def superpose(
    volume: torch.Tensor, reference: torch.Tensor, radius: float | None = None, seed: int = 0
) -> tuple[torch.Tensor, float]:
    """Turn, shift and (if better) mirror ``volume (s, s, s)`` onto ``reference``; returns the
    superposed map and its correlation with the reference up to ``radius`` (frequency px)."""
    box = volume.shape[-1]
    radius = radius if radius is not None else box / 4
    ref_ft = centred_rfft(reference.double())
    vox = VoxelSet.build(box, radius, volume.device, torch.float64)
    g = torch.Generator().manual_seed(seed)
    best = None
    for mirrored in (False, True):
        vol = torch.flip(volume, dims=(-1,)) if mirrored else volume
        if mirrored and box % 2 == 0:
            vol = torch.roll(vol, 1, dims=-1)  # keep the centre voxel s//2 in place
        ft = centred_rfft(vol.double())
        rot, shift = _global(ft, ref_ft, radius)
        score = float(_score(ref_ft, ft, rot[None], shift[None], vox)[0])
        for size_deg, size_px in ((4.0, 0.7), (2.0, 0.35), (1.0, 0.2), (0.5, 0.1)):
            for _ in range(2):
                n = 64
                axis = torch.randn(n, 3, generator=g, dtype=torch.float64)
                axis = axis / axis.norm(dim=1, keepdim=True)
                ang = math.radians(size_deg) * torch.rand(n, 1, generator=g, dtype=torch.float64)
                small = _axis_angle(axis * ang)
                rots = torch.cat([rot[None], rot[None] @ small])
                shifts = torch.cat(
                    [
                        shift[None],
                        shift + size_px * torch.randn(n, 3, generator=g, dtype=torch.float64),
                    ]
                )
                scores = _score(ref_ft, ft, rots, shifts, vox)
                i = int(scores.argmax())
                rot, shift, score = rots[i], shifts[i], float(scores[i])
        if best is None or score > best[0]:
            best = (score, _transform(ft, rot, shift))
    assert best is not None
    return centred_irfft(best[1], box).to(volume.dtype), best[0]


def _axis_angle(v: torch.Tensor) -> torch.Tensor:
    """Rotation vectors ``(n, 3)`` -> matrices ``(n, 3, 3)``."""
    angle = v.norm(dim=1).clamp_min(1e-12)
    k = v / angle[:, None]
    K = torch.zeros(v.shape[0], 3, 3, dtype=v.dtype)
    K[:, 0, 1], K[:, 0, 2], K[:, 1, 2] = -k[:, 2], k[:, 1], -k[:, 0]
    K = K - K.transpose(1, 2)
    s, c = angle.sin()[:, None, None], angle.cos()[:, None, None]
    return torch.eye(3, dtype=v.dtype) + s * K + (1 - c) * K @ K
