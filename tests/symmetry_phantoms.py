"""Symmetric test phantoms for the symmetry tests and benchmark (analytic Gaussian blobs).

An asymmetric subunit of Gaussian blobs is replicated by a group's operators in the standard
orientation, then optionally turned by ``Q`` and moved by ``shift``: ``V(x) = P(Qᵀ(x - shift))``,
evaluated analytically on the grid (no interpolation). ``degrade`` adds a missing-wedge-like
anisotropic blur and white noise.
"""

from __future__ import annotations

import math

import torch

from denovo3d.fourier import centred_irfft, centred_rfft, rfft_coords
from denovo3d.geometry.euler import random_rotations
from denovo3d.geometry.symmetry import point_group

RECOVERY_GROUPS = ("C2", "C6", "C7", "D2", "D7", "T", "O", "I")
# the recovery phantoms' assemblies fit in a radius of 20 px (phantom's max_radius_px): the
# particle diameter a user would give the de novo job, whose maps are flattened with it
PARTICLE_DIAMETER_PX = 40.0


def subunit(
    generator: torch.Generator, n_blobs: int = 6
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Blob centres ``(b, 3)`` (px, xyz, off every axis), widths ``(b,)``, amplitudes ``(b,)``."""
    base = torch.tensor([9.0, 3.0, 5.0], dtype=torch.float64)
    centres = base + 4.0 * torch.randn(n_blobs, 3, generator=generator, dtype=torch.float64)
    sigmas = 1.5 + 1.5 * torch.rand(n_blobs, generator=generator, dtype=torch.float64)
    amps = 0.5 + torch.rand(n_blobs, generator=generator, dtype=torch.float64)
    return centres, sigmas, amps


def phantom(
    group: str,
    box: int = 64,
    seed: int = 0,
    rotation: torch.Tensor | None = None,
    shift_px: torch.Tensor | None = None,
    max_radius_px: float = 20.0,
) -> torch.Tensor:
    """``(box, box, box)`` float64 map with ``group`` symmetry, turned by ``rotation`` (3, 3) about
    the centre and moved by ``shift_px`` (xyz). The assembly fits in ``max_radius_px``."""
    gen = torch.Generator().manual_seed(seed)
    centres, sigmas, amps = subunit(gen)
    ops = point_group(group).operators
    all_centres = torch.einsum("gij,bj->gbi", ops, centres).reshape(-1, 3)
    scale = min(1.0, (max_radius_px - 3.0) / float(all_centres.norm(dim=-1).max()))
    all_centres = all_centres * scale
    if rotation is not None:
        all_centres = all_centres @ rotation.T.to(torch.float64)
    if shift_px is not None:
        all_centres = all_centres + shift_px.to(torch.float64)
    sig = sigmas.repeat(ops.shape[0])
    amp = amps.repeat(ops.shape[0])
    r = torch.arange(box, dtype=torch.float64) - box // 2
    zz, yy, xx = torch.meshgrid(r, r, r, indexing="ij")
    grid = torch.stack([xx, yy, zz], -1).reshape(-1, 3)
    out = torch.zeros(grid.shape[0], dtype=torch.float64)
    for c, s, a in zip(all_centres, sig, amp, strict=True):
        out += a * torch.exp(-((grid - c) ** 2).sum(-1) / (2 * s * s))
    return out.reshape(box, box, box)


def degrade_filter(
    box: int,
    wedge_deg: float = 30.0,
    wedge_keep: float = 0.5,
    blur_px: float = 1.0,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """The Fourier filter ``(box, box, box//2+1)`` of :func:`degrade` (centred rfft layout)."""
    k = rfft_coords(box).to(dtype)
    kx, kz = k[..., 0], k[..., 2]
    angle_from_z = torch.atan2(kx.abs(), kz.abs())  # 0 on the z axis
    soft = torch.sigmoid((angle_from_z - math.radians(wedge_deg)) / math.radians(3.0))
    wedge = wedge_keep + (1 - wedge_keep) * soft
    radius2 = (k**2).sum(-1) / box**2
    return wedge * torch.exp(-2 * math.pi**2 * blur_px**2 * radius2)


def degrade(
    volume: torch.Tensor,
    seed: int,
    noise_sd_rel: float = 0.25,
    wedge_deg: float = 30.0,
    wedge_keep: float = 0.5,
    blur_px: float = 1.0,
) -> torch.Tensor:
    """Missing-wedge-like blur (Fourier components within ``wedge_deg`` of the z axis in the
    x-z plane kept at ``wedge_keep``, tilt axis y), an isotropic Gaussian blur of ``blur_px`` and
    white noise of ``noise_sd_rel`` times the standard deviation of the map inside its support."""
    s = volume.shape[-1]
    filt = degrade_filter(s, wedge_deg, wedge_keep, blur_px, volume.dtype)
    out = centred_irfft(centred_rfft(volume) * filt, s)
    gen = torch.Generator().manual_seed(seed)
    support = volume > 0.05 * volume.max()
    sd = float(volume[support].std())
    return out + noise_sd_rel * sd * torch.randn(out.shape, generator=gen, dtype=out.dtype)


def recovery_clean(group: str, trial: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The clean float64 map of :func:`recovery_trial`, its ``truth (3, 3)`` and ``shift (3,)``
    (xyz px): the map is ``P(truthᵀ(x - shift))``."""
    gen = torch.Generator().manual_seed(10_000 + trial)
    truth = random_rotations(1, gen)[0]
    shift = (torch.rand(3, generator=gen, dtype=torch.float64) - 0.5) * 6
    return phantom(group, 64, seed=trial, rotation=truth, shift_px=shift), truth, shift


def recovery_trial(group: str, trial: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The recovery benchmark's input ``trial`` for ``group``: the box-64 phantom in the standard
    orientation turned by a random rotation ``truth (3, 3)``, moved by up to ±3 px, degraded with
    the defaults of :func:`degrade`. Returns the float32 map and ``truth`` (the map is
    ``P(truthᵀ(x - shift))``)."""
    clean, truth, _ = recovery_clean(group, trial)
    return degrade(clean, seed=trial).float(), truth
