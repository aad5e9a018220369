"""Synthetic pseudo-subtomograms made directly in Fourier space, for the engine's tests.

D = C·P_{A,t}(V) + noise with Var = C·σ² per real component, C = ΣCTF² of a ±60° tilt series
about y (a missing wedge fixed in the tomogram frame) with a per-particle defocus-like ripple.
"""

from __future__ import annotations

import math

import torch

from denovo3d.engine.projector import full_centred, gather
from denovo3d.fourier import centred_rfft, rfft_coords, sample_rfft
from denovo3d.geometry.euler import matrix_to_euler, random_rotations


def wedge_ctf2(box: int, defocus_scale: torch.Tensor, max_tilt_deg: float = 60.0) -> torch.Tensor:
    """``(b, s, s, s//2+1)`` ΣCTF²-like weights: a ±max_tilt wedge about y times a CTF ripple."""
    k = rfft_coords(box)
    kx, _, kz = k.unbind(-1)
    angle = torch.rad2deg(torch.atan2(kx.abs(), kz.abs()))  # tilt plane containing k
    in_wedge = (angle <= max_tilt_deg + 1e-3) | ((kx == 0) & (kz == 0))
    r2 = (k**2).sum(-1) / box**2
    ctf = torch.sin(defocus_scale[:, None, None, None] * 400.0 * r2 + 0.1)
    radius = k.norm(dim=-1)
    density = 41.0 / (1.0 + radius * math.radians(3.0) * 2)  # slices per voxel thin out
    return (in_wedge * (ctf**2) * density).float()


def make_particles(
    volume: torch.Tensor,
    n: int,
    noise_sigma2: float,
    offset_px: float = 0.0,
    seed: int = 1,
    fast: bool = False,
) -> dict:
    """Particles of ``volume (s, s, s)`` at random poses: data, ctf2, multiplicity, matrices,
    angles, offsets (px) and the noise level (σ² per real component per unit C)."""
    g = torch.Generator().manual_seed(seed)
    box = volume.shape[-1]
    ft = centred_rfft(volume.double())
    A = random_rotations(n, g)
    offsets = (torch.rand(n, 3, generator=g, dtype=torch.float64) * 2 - 1) * offset_px
    ctf2 = wedge_ctf2(box, 0.5 + torch.rand(n, generator=g)).double()
    k = rfft_coords(box).double()
    kf = k.reshape(-1, 3)
    data = torch.empty((n, *ctf2.shape[1:]), dtype=torch.complex64)
    shape = ctf2.shape[1:]
    full = full_centred(ft[None].to(torch.complex64))[0] if fast else None
    for s in range(0, n, 16):
        e = min(n, s + 16)
        if fast:  # the engine's grid_sample projector (benchmarks); tests use sample_rfft
            proj = gather(full, (kf @ A[s:e]).float()).to(torch.complex128).reshape(e - s, *shape)
        else:
            proj = sample_rfft(ft, kf @ A[s:e]).reshape(e - s, *shape)
        phase = -2 * math.pi * (offsets[s:e] @ kf.T).reshape(e - s, *shape) / box
        clean = ctf2[s:e] * proj * torch.polar(torch.ones_like(phase), phase)
        noise = torch.randn(*clean.shape, 2, generator=g, dtype=torch.float64)
        noise = torch.view_as_complex(noise) * torch.sqrt(ctf2[s:e] * noise_sigma2)
        data[s:e] = (clean + noise).to(torch.complex64)
    mult = (ctf2 > 0).float()
    rot, tilt, psi = matrix_to_euler(A)
    return {
        "data": data,
        "ctf2": ctf2.float(),
        "multiplicity": mult,
        "rotations": A,
        "angles": torch.stack([rot, tilt, psi], 1),
        "offsets_px": offsets,
    }


class InMemoryParticles:
    """The part of :class:`denovo3d.particles.ParticleSet` the refine loop uses, in memory."""

    def __init__(self, parts: dict, pixel_size_a: float) -> None:
        import numpy as np
        import pandas as pd

        from denovo3d.fourier import fourier_crop
        from denovo3d.particles import ParticleBatch

        self._crop, self._batch = fourier_crop, ParticleBatch
        self.parts = parts
        self.n = parts["data"].shape[0]
        self.box = parts["data"].shape[-2]
        self.pixel_size_a = pixel_size_a
        self.random_subset = np.arange(self.n) % 2 + 1
        self.table = pd.DataFrame(
            {"rlnImageName": [f"p{i:04d}_data.mrc" for i in range(self.n)], "rlnOpticsGroup": 1}
        )
        self.optics = pd.DataFrame(
            {
                "rlnOpticsGroup": [1],
                "rlnOpticsGroupName": ["optics1"],
                "rlnImagePixelSize": [pixel_size_a],
                "rlnImageSize": [self.box],
                "rlnImageDimensionality": [3],
                "rlnCtfDataAreCtfPremultiplied": [1],
            }
        )

    zero_mask: tuple[float, float] | None = None

    def set_zero_mask(self, diameter_a: float | None, edge_px: float = 5.0) -> None:
        self.zero_mask = None if diameter_a is None else (diameter_a, edge_px)

    def load(self, indices, box=None, device="cpu", threads=1, workspace=None):
        from denovo3d.engine.references import mask_particles

        idx = torch.as_tensor(indices).reshape(-1).long()
        box = self.box if box is None else int(box)
        t = [self.parts[k][idx] for k in ("data", "ctf2", "multiplicity")]
        if self.zero_mask is not None:  # at the full box, then cropped, as ParticleSet does
            diameter_a, edge_px = self.zero_mask
            t.append(mask_particles(t[0], diameter_a / self.pixel_size_a, edge_px))
        if box < self.box:
            t = [self._crop(x, box) for x in t]
        return self._batch(idx.to(device), *(x.to(device) for x in t))


def true_pose_reconstruction(parts: dict, box: int) -> torch.Tensor:
    """Reconstruction ``Σ D·e^{+iφ} / Σ C`` (back-projected with the true poses), real space."""
    from denovo3d.engine.projector import backproject
    from denovo3d.engine.voxels import VoxelSet
    from denovo3d.fourier import centred_irfft

    vox = VoxelSet.build(box, box / 2)
    num = torch.zeros(box, box, box // 2 + 1, dtype=torch.complex64)
    den = torch.zeros(box, box, box // 2 + 1)
    w = 0.5 * vox.friedel
    for s in range(0, parts["data"].shape[0], 32):
        A = parts["rotations"][s : s + 32].float()
        d = vox.take(parts["data"][s : s + 32]) * vox.phases(parts["offsets_px"][s : s + 32], box)
        coords = vox.coords @ A
        num += backproject(d * w, coords, box)
        den += backproject(vox.take(parts["ctf2"][s : s + 32]) * w, coords, box)
    ft = num / den.clamp_min(1e-3 * float(den.mean()))
    return centred_irfft(ft, box)


def write_project(root, parts: dict, pixel_size_a: float):
    """Write ``parts`` as a RELION-4 pseudo-subtomogram set under ``root``; returns the
    particles.star path (data: real-space volumes; weights: ΣCTF² and multiplicity blocks)."""
    from pathlib import Path

    import numpy as np
    import pandas as pd

    from denovo3d.fourier import centred_irfft
    from denovo3d.io.mrc import write_mrc
    from denovo3d.io.star import write_star

    root = Path(root)
    (root / "Subtomograms").mkdir(parents=True, exist_ok=True)
    n, box = parts["data"].shape[0], parts["data"].shape[-2]
    rows = []
    for i in range(n):
        stem = f"Subtomograms/p{i:04d}"
        vol = centred_irfft(parts["data"][i].to(torch.complex128), box).float().numpy()
        weights = torch.cat([parts["ctf2"][i], parts["multiplicity"][i]]).numpy()
        write_mrc(root / f"{stem}_data.mrc", vol, pixel_size_a)
        write_mrc(root / f"{stem}_weights.mrc", np.ascontiguousarray(weights), 1 / pixel_size_a)
        rows.append(
            {
                "rlnTomoName": "TS_01",
                "rlnTomoParticleName": f"TS_01/{i + 1}",
                "rlnRandomSubset": i % 2 + 1,
                "rlnOpticsGroup": 1,
                "rlnOriginXAngst": 0.0,
                "rlnOriginYAngst": 0.0,
                "rlnOriginZAngst": 0.0,
                "rlnImageName": f"{stem}_data.mrc",
                "rlnCtfImage": f"{stem}_weights.mrc",
            }
        )
    optics = pd.DataFrame(
        {
            "rlnOpticsGroup": [1],
            "rlnOpticsGroupName": ["opticsGroup1"],
            "rlnSphericalAberration": [2.7],
            "rlnVoltage": [300.0],
            "rlnAmplitudeContrast": [0.07],
            "rlnCtfDataAreCtfPremultiplied": [1],
            "rlnImageDimensionality": [3],
            "rlnImagePixelSize": [pixel_size_a],
            "rlnImageSize": [box],
        }
    )
    path = root / "particles.star"
    write_star(path, {"optics": optics, "particles": pd.DataFrame(rows)})
    return path
