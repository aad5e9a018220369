"""Search spaces and scores for aligning a map to a point group's standard axes.

A map ``V`` turned by ``R`` (``V_R(x) = V(Rᵀx)``) is ``G``-symmetric when ``V`` is symmetric under
every ``h = Rᵀ g R``. The score of ``R`` is the mean over ``g ≠ e`` of the normalised correlation
``ρ(h) = Re Σ_k conj(F(k)) F(hᵀk) / Σ_k |F(k)|²`` over a band of frequencies (RELION's
``Σ (V_R - S V_R)²`` is ``(1 - mean ρ)`` times a constant, so both rank rotations alike). The
score of ``R`` equals that of ``nR`` for ``n`` in the normaliser of ``G``, so the search covers one
cell of SO(3) per normaliser element (a hemisphere of axis directions for Cn).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from denovo3d.fourier import centred_irfft, centred_rfft, fourier_crop, rfft_coords, sample_rfft
from denovo3d.geometry.euler import euler_to_matrix, random_rotations
from denovo3d.geometry.symmetry import PointGroup, _close, _rot, default_pad, padded_rfft

__all__ = [
    "FourierBand",
    "cyclic_order",
    "keep_shells",
    "normaliser",
    "orientation_error_deg",
    "pair_correlations",
    "prepare_band",
    "search_rotations",
    "shell_correlations",
    "spherical_mask",
]


@dataclass(frozen=True)
class FourierBand:
    """A map's transform ready for scoring: padded half grid, the band's frequencies and values.

    ``ft_pad (S, S, S//2+1)`` complex (``S = pad * box``), ``coords (V, 3)`` xyz frequencies
    (cycles per box) with ``low <= |k| <= high``, ``values (V,)`` ``F(k)``, ``weights (V,)``
    (2: each kept k stands for k and -k; half the kx = 0 plane is kept), ``box`` of the input map.
    """

    ft_pad: torch.Tensor
    pad: int
    coords: torch.Tensor
    values: torch.Tensor
    weights: torch.Tensor
    box: int
    shells: torch.Tensor


def spherical_mask(box: int, like: torch.Tensor, edge_px: float = 4.0) -> torch.Tensor:
    """Soft sphere ``(s, s, s)`` touching the box faces (cosine edge of ``edge_px`` inside): the
    region that stays in the box under any rotation, so copies overlap the same way for all."""
    r = torch.arange(box, dtype=like.dtype, device=like.device) - box // 2
    rad = (r[:, None, None] ** 2 + r[None, :, None] ** 2 + r[None, None, :] ** 2).sqrt()
    inner = box // 2 - 1 - edge_px
    x = ((rad - inner) / edge_px).clamp(0.0, 1.0)
    return 0.5 * (1 + torch.cos(torch.pi * x))


def shell_rms(ft: torch.Tensor) -> torch.Tensor:
    """Root mean power of each integer shell, broadcast to the half grid ``(s, s, s//2+1)``."""
    s = ft.shape[-2]
    shell = rfft_coords(s, ft.device).norm(dim=-1).round().long()
    power = ft.abs() ** 2
    total = torch.zeros(int(shell.max()) + 1, dtype=power.dtype, device=power.device)
    count = torch.zeros_like(total)
    total.index_add_(0, shell.flatten(), power.flatten())
    count.index_add_(0, shell.flatten(), torch.ones_like(power.flatten()))
    mean = total / count.clamp(min=1)
    return mean[shell].clamp(min=torch.finfo(power.dtype).tiny).sqrt()


def prepare_band(
    volume: torch.Tensor, centre_px: torch.Tensor, low: float, high: float
) -> FourierBand:
    """Move ``centre_px`` (xyz offset from voxel s//2) of ``volume (s, s, s)`` to the centre, mask
    with a soft sphere, whiten, keep the frequencies up to ``high`` (Fourier crop to a small box)
    and pad for interpolation."""
    s = volume.shape[-1]
    k_full = rfft_coords(s, volume.device).to(volume.dtype)
    phase = 2 * torch.pi * (k_full @ centre_px.to(volume.dtype)) / s
    ft = centred_rfft(volume) * torch.polar(torch.ones_like(phase), phase)
    ft = centred_rfft(centred_irfft(ft, s) * spherical_mask(s, volume))
    rms = shell_rms(ft)
    ft = ft / rms.clamp(min=1e-4 * float(rms.max()))
    b = min(s - s % 2, 2 * (math.ceil(high) + 2))
    small = centred_irfft(fourier_crop(ft, b), b) if b < s else centred_irfft(ft, s)
    pad = default_pad(b)
    ft_pad = padded_rfft(small, pad)
    k = rfft_coords(b, volume.device).to(volume.dtype)
    r = k.norm(dim=-1)
    keep = (r >= low) & (r <= high) & ~((k[..., 0] == 0) & (_negative_half(k)))
    coords = k[keep]
    values = sample_rfft(ft_pad, coords * pad)
    weights = torch.full_like(coords[:, 0], 2.0)  # each kept k stands for k and -k
    return FourierBand(ft_pad, pad, coords, values, weights, s, r[keep].round().long())


def keep_shells(band: FourierBand, shell_weights: torch.Tensor, floor: float = 0.02) -> FourierBand:
    """The band restricted to the shells whose weight exceeds ``floor`` times the largest (the
    shells where the copies agree): the same scores for a fraction of the cost."""
    useful = shell_weights > floor * float(shell_weights.max())
    keep = useful[band.shells]
    return FourierBand(
        band.ft_pad,
        band.pad,
        band.coords[keep],
        band.values[keep],
        band.weights[keep],
        band.box,
        band.shells[keep],
    )


def _negative_half(k: torch.Tensor) -> torch.Tensor:
    """On the kx = 0 plane, the half of the points whose Friedel mates are kept instead."""
    return (k[..., 2] < 0) | ((k[..., 2] == 0) & (k[..., 1] < 0))


def _pair_terms(
    band: FourierBand,
    h: torch.Tensor,
    shift_px: torch.Tensor | None,
    noise_power: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-frequency numerator and denominator ``(..., V)`` of :func:`pair_correlations`."""
    q = torch.einsum("vi,...ij->...vj", band.coords, h.to(band.coords.dtype))
    sampled = sample_rfft(band.ft_pad, q * band.pad)
    prod = band.values.conj() * sampled
    if shift_px is not None:
        d = torch.einsum("...ij,j->...i", h.to(shift_px.dtype), shift_px) - shift_px
        phase = 2 * torch.pi * torch.einsum("vi,...i->...v", band.coords, d) / band.box
        prod = prod * torch.polar(torch.ones_like(phase), phase)
    pk, pq = band.values.abs() ** 2, sampled.abs() ** 2
    if noise_power is None:
        ak2, aq2 = pk, pq
    else:  # signal amplitude only: noise in weak (e.g. missing-wedge) voxels would bias the weights
        n = noise_power.to(pk.dtype)[band.shells]
        ak2, aq2 = (pk - n).clamp(min=0), (pq - n).clamp(min=0)
    num = band.weights * (ak2 * aq2 + 1e-20).sqrt() * prod.real
    return num, band.weights * 0.5 * (aq2 * pk + ak2 * pq)


def pair_correlations(
    band: FourierBand,
    h: torch.Tensor,
    shift_px: torch.Tensor | None = None,
    shell_weights: torch.Tensor | None = None,
    noise_power: torch.Tensor | None = None,
) -> torch.Tensor:
    """``ρ(h)`` for operators ``h (..., 3, 3)`` -> ``(...)``; with ``shift_px (3,)`` (input pixels)
    the map is first moved so that ``centre + shift`` is at the centre.

    Each copy is filtered by the other's amplitude (``|F(hᵀk)|·F(k)`` against ``|F(k)|·F(hᵀk)``)
    before the normalised correlation: the phase agreement weighted by ``|F(k)|²|F(hᵀk)|²``. A
    missing wedge or anisotropic blur, which does not turn with the map, then leaves the optimum
    in place (plain correlation is pulled towards overlapping wedges by several degrees).
    ``shell_weights (n_shells,)`` weight the (whitened) shells, e.g. by their signal-to-noise;
    with ``noise_power (n_shells,)`` the amplitudes are those of the signal, ``sqrt(|F|² - N²)``.
    """
    num, den = _pair_terms(band, h, shift_px, noise_power)
    if shell_weights is not None:
        w = shell_weights.to(num.dtype)[band.shells]
        num, den = num * w, den * w
    return num.sum(-1) / den.sum(-1).clamp(min=torch.finfo(num.dtype).tiny)


def shell_correlations(
    band: FourierBand, h: torch.Tensor, shift_px: torch.Tensor | None = None
) -> torch.Tensor:
    """``ρ`` per shell, averaged over operators ``h (g, 3, 3)`` -> ``(n_shells,)``."""
    num, den = _pair_terms(band, h, shift_px)
    n = int(band.shells.max()) + 1
    num_s = torch.zeros(n, dtype=num.dtype).index_add_(0, band.shells, num.sum(0))
    den_s = torch.zeros(n, dtype=num.dtype).index_add_(0, band.shells, den.sum(0))
    return num_s / den_s.clamp(min=torch.finfo(num.dtype).tiny)


def search_rotations(
    band: FourierBand,
    group: PointGroup,
    rotations: torch.Tensor,
    max_operators: int = 64,
    chunk_points: int = 2_000_000,
) -> torch.Tensor:
    """Mean ``ρ`` per candidate ``rotations (n, 3, 3)`` over the group's first ``max_operators``
    non-identity operators (the generators and their first products: enough to place the axes;
    the refinement uses them all)."""
    ops = group.operators[1 : 1 + max_operators].to(band.coords.dtype)
    per = max(1, chunk_points // (ops.shape[0] * band.coords.shape[0]))
    out = []
    for start in range(0, rotations.shape[0], per):
        r = rotations[start : start + per].to(band.coords.dtype)
        h = r.transpose(-1, -2)[:, None] @ ops[None] @ r[:, None]
        out.append(pair_correlations(band, h).mean(-1))
    return torch.cat(out)


def cyclic_order(group: PointGroup) -> int | None:
    """n when ``group`` is the proper cyclic group Cn (axis z), else None."""
    ops = group.operators
    if not group.is_proper or not torch.allclose(ops[:, 2, 2], torch.ones_like(ops[:, 2, 2])):
        return None
    return group.order


def normaliser(group: PointGroup) -> torch.Tensor:
    """Rotations ``(m, 3, 3)`` that map the group onto itself (a finite normaliser or, for groups
    with mirrors, the proper subgroup): candidates ``R`` and ``nR`` score the same."""
    name, ops = group.name, group.operators
    proper = ops[torch.linalg.det(ops) > 0]
    if name.startswith("D") and name[1:].isdigit():
        n = int(name[1:])
        if n == 2:
            return _close([_rot(3, (1, 1, 1)), _rot(4, (0, 0, 1))])
        return _close([_rot(2 * n, (0, 0, 1)), _rot(2, (1, 0, 0))])
    if name == "T":
        return _close([*list(ops), _rot(4, (0.0, 0.816496, 0.577350))])
    return proper


def so3_grid(n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` quasi-uniform rotations ``(n, 3, 3)`` (super-Fibonacci spiral, Alexa 2022), turned
    by one random rotation drawn from ``generator`` (a seeded perturbation of the grid)."""
    i = torch.arange(n, dtype=torch.float64) + 0.5
    s = i / n
    phi, psi = math.sqrt(2.0), 1.533751168755204288118041
    r, big_r = s.sqrt(), (1 - s).sqrt()
    alpha, beta = 2 * math.pi * i / phi, 2 * math.pi * i / psi
    q = torch.stack([r * alpha.sin(), r * alpha.cos(), big_r * beta.sin(), big_r * beta.cos()], -1)
    return _quaternion_to_matrix(q) @ random_rotations(1, generator)[0]


def hemisphere_axes(n: int, generator: torch.Generator) -> torch.Tensor:
    """Rotations ``(n, 3, 3)`` whose third rows (``Rᵀe_z``: the symmetry axis in the input map)
    cover the upper hemisphere quasi-uniformly (Fibonacci lattice), turned about z at random."""
    i = torch.arange(n, dtype=torch.float64) + 0.5
    cos_tilt = 1 - i / n
    rot = (2 * math.pi * i / ((1 + math.sqrt(5.0)) / 2)) % (2 * math.pi)
    rot = rot + 2 * math.pi * torch.rand(1, generator=generator, dtype=torch.float64)
    tilt = torch.arccos(cos_tilt)
    return euler_to_matrix(torch.rad2deg(rot), torch.rad2deg(tilt), torch.zeros_like(rot))


def reduce_to_cell(rotations: torch.Tensor, normaliser_ops: torch.Tensor) -> torch.Tensor:
    """Keep the rotations ``R`` for which ``R`` itself is the closest to identity of all ``nR``."""
    tr = torch.einsum("mij,nji->nm", normaliser_ops, rotations)  # trace(n_m R) per pair
    best = tr.argmax(-1)
    ident = int(
        ((normaliser_ops - torch.eye(3, dtype=normaliser_ops.dtype)).abs().sum((1, 2))).argmin()
    )
    return rotations[best == ident]


def orientation_error_deg(
    rotation: torch.Tensor, truth: torch.Tensor, group: PointGroup
) -> torch.Tensor:
    """Angle (degrees) by which ``rotation`` misses undoing ``truth`` (the map was ``P(truthᵀx)``),
    modulo what the group cannot tell apart: ``M = rotation @ truth`` should be in the normaliser.
    For Cn that is the angle between ``M e_z`` and ``± e_z``. ``(..., 3, 3)`` -> ``(...)``."""
    m = rotation.to(torch.float64) @ truth.to(torch.float64)
    if cyclic_order(group) is not None:
        cz = m[..., 2, 2].abs().clamp(max=1.0)
        return torch.rad2deg(torch.arccos(cz))
    ops = normaliser(group)
    tr = torch.einsum("mij,...ji->...m", ops, m)
    cos = ((tr.amax(-1) - 1) / 2).clamp(-1.0, 1.0)
    return torch.rad2deg(torch.arccos(cos))


def _quaternion_to_matrix(q: torch.Tensor) -> torch.Tensor:
    w, x, y, z = (q / q.norm(dim=-1, keepdim=True)).unbind(-1)
    return torch.stack(
        [
            torch.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
            torch.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
            torch.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1),
        ],
        -2,
    )
