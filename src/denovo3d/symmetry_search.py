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
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from denovo3d.fourier import centred_irfft, centred_rfft, fourier_crop, rfft_coords, rfft_radius
from denovo3d.geometry.euler import euler_to_matrix, random_rotations
from denovo3d.geometry.symmetry import PointGroup, _close, _rot, axis_rotation, default_pad

__all__ = [
    "AngleTables",
    "FourierBand",
    "cyclic_order",
    "full_grid",
    "keep_shells",
    "local_power",
    "maximise_turn",
    "normaliser",
    "operator_directions",
    "operator_pairs",
    "operator_shell_correlations",
    "orientation_error_deg",
    "pair_correlations",
    "pair_residuals",
    "prepare_band",
    "remove_spherical_average",
    "sample_band",
    "sample_power",
    "search_rotations",
    "shell_correlations",
    "spherical_mask",
    "turn_excess",
]


@dataclass(frozen=True)
class FourierBand:
    """A map's transform ready for scoring: padded full grid, the band's frequencies and values.

    ``grid (1, 2, S, S, S)`` real and imaginary parts of the centred full transform of the small
    map zero-padded ``pad`` times (index ``S // 2`` is frequency 0; ``(z, y, x)``), for
    :func:`sample_band`; ``coords (V, 3)`` xyz frequencies (cycles per small box) with
    ``low <= |k| <= high``, ``values (V,)`` ``F(k)``, ``weights (V,)`` (2: each kept k stands
    for k and -k; half the kx = 0 plane is kept), ``box`` of the input map, ``shells (V,)``;
    ``power (1, 1, S, S, S)`` the local power ``|F|²`` smoothed over neighbouring frequencies
    (:func:`local_power`; only where the residual score is wanted) and ``power_values (V,)``
    its samples at ``coords`` (fixed, like ``values``: sampled once).
    """

    grid: torch.Tensor
    pad: int
    coords: torch.Tensor
    values: torch.Tensor
    weights: torch.Tensor
    box: int
    shells: torch.Tensor
    power: torch.Tensor | None = None
    power_values: torch.Tensor | None = None


def full_grid(volume: torch.Tensor, pad: int) -> torch.Tensor:
    """``(s, s, s)`` map -> ``(1, 2, S, S, S)`` real/imaginary parts of the centred full transform
    of the map zero-padded to ``S = pad * s``: ``F[S//2 + k]``, unnormalised."""
    s = volume.shape[-1]
    big = pad * s
    padded = volume.new_zeros(big, big, big)
    lo = big // 2 - s // 2
    padded[lo : lo + s, lo : lo + s, lo : lo + s] = volume
    ft = torch.fft.fftshift(torch.fft.fftn(torch.fft.ifftshift(padded)))
    return torch.stack([ft.real, ft.imag])[None].contiguous()


def sample_band(band: FourierBand, coords: torch.Tensor) -> torch.Tensor:
    """Trilinear samples ``(...)`` complex of the band's padded transform at ``coords (..., 3)``
    (xyz, cycles per small box; zero beyond the grid). One fused ``grid_sample`` call, which is
    differentiable with respect to ``coords``."""
    size = band.grid.shape[-1]
    index = coords * band.pad + size // 2
    norm = (index * (2.0 / (size - 1)) - 1.0).to(band.grid.dtype)
    out = torch.nn.functional.grid_sample(
        band.grid,
        norm.reshape(1, -1, 1, 1, 3),
        mode="bilinear",
        padding_mode="zeros",
        align_corners=True,
    )
    out = out.reshape(2, *coords.shape[:-1])
    return torch.complex(out[0], out[1])


def local_power(grid: torch.Tensor, pad: int, sigma_px: float = 1.5) -> torch.Tensor:
    """``(1, 1, S, S, S)`` power ``|F|²`` of a padded transform ``grid (1, 2, S, S, S)`` smoothed
    by a Gaussian of ``sigma_px`` frequency steps of the unpadded box: an estimate of the signal
    power around each frequency that a wedge or a blur (which vary slowly in Fourier space)
    scales like the signal itself, and that noise at one frequency barely moves."""
    power = grid[0, 0] ** 2 + grid[0, 1] ** 2
    size = power.shape[-1]
    sigma = sigma_px * pad
    r = torch.arange(size, dtype=power.dtype, device=power.device) - size // 2
    line = torch.fft.ifftshift(torch.exp(-(r**2) / (2 * sigma * sigma)))
    line_ft = torch.fft.fft(line / line.sum()).real  # even kernel: real transform
    half = line_ft[: size // 2 + 1]
    kernel_ft = line_ft[:, None, None] * line_ft[None, :, None] * half[None, None, :]
    smooth = torch.fft.irfftn(torch.fft.rfftn(power) * kernel_ft, s=power.shape)
    return smooth[None, None].contiguous()


def sample_power(band: FourierBand, coords: torch.Tensor) -> torch.Tensor:
    """Trilinear samples ``(...)`` of the band's local power at ``coords (..., 3)``."""
    assert band.power is not None, "the band has no local power: prepare_band(..., with_power=True)"
    size = band.power.shape[-1]
    index = coords * band.pad + size // 2
    norm = (index * (2.0 / (size - 1)) - 1.0).to(band.power.dtype)
    out = torch.nn.functional.grid_sample(
        band.power, norm.reshape(1, -1, 1, 1, 3), mode="bilinear", align_corners=True
    )
    return out.reshape(coords.shape[:-1])


def spherical_mask(
    box: int, like: torch.Tensor, edge_px: float = 4.0, radius_px: float | None = None
) -> torch.Tensor:
    """Soft sphere ``(s, s, s)``: 1 within ``radius_px`` (default, and at most: touching the box
    faces with the cosine edge of ``edge_px`` inside), the region that stays in the box under
    any rotation, so copies overlap the same way for all. A sphere about the particle keeps out
    the noise of the solvent around it."""
    r = torch.arange(box, dtype=like.dtype, device=like.device) - box // 2
    rad = (r[:, None, None] ** 2 + r[None, :, None] ** 2 + r[None, None, :] ** 2).sqrt()
    inner = box // 2 - 1 - edge_px
    inner = inner if radius_px is None else min(inner, radius_px)
    x = ((rad - inner) / edge_px).clamp(0.0, 1.0)
    return 0.5 * (1 + torch.cos(torch.pi * x))


def remove_spherical_average(volume: torch.Tensor, centre_px: torch.Tensor) -> torch.Tensor:
    """``volume (s, s, s)`` less its spherical average about ``centre_px`` (xyz offset from voxel
    ``s // 2``; means over half-pixel shells, linear in the radius between them). That part is
    unchanged by every rotation about the centre, so it agrees with any turn and tells nothing
    about the group; at low resolution it is most of a compact assembly's power (an O
    or I phantom correlates 0.8 with randomly turned copies of itself)."""
    s = volume.shape[-1]
    r = torch.arange(s, dtype=volume.dtype, device=volume.device) - s // 2
    c = centre_px.to(volume)
    dist = (
        (r[None, None, :] - c[0]) ** 2
        + (r[None, :, None] - c[1]) ** 2
        + (r[:, None, None] - c[2]) ** 2
    ).sqrt()
    bins = (2 * dist).floor().long().flatten()
    n = int(bins.max()) + 1
    count = volume.new_zeros(n).index_add_(0, bins, torch.ones_like(dist).flatten())
    used = count > 0  # the innermost half-pixel shells can hold no voxel
    radius = (volume.new_zeros(n).index_add_(0, bins, dist.flatten()) / count.clamp(min=1))[used]
    mean = (volume.new_zeros(n).index_add_(0, bins, volume.flatten()) / count.clamp(min=1))[used]
    # linear in the distance between the shells' mean radii
    j = torch.searchsorted(radius, dist.flatten()).clamp(1, radius.numel() - 1)
    w = ((dist.flatten() - radius[j - 1]) / (radius[j] - radius[j - 1])).clamp(0.0, 1.0)
    return volume - (mean[j - 1] * (1 - w) + mean[j] * w).reshape(volume.shape)


def shell_rms(ft: torch.Tensor, smooth: bool = False) -> torch.Tensor:
    """Root mean power of each integer shell, broadcast to the half grid ``(s, s, s//2+1)``.

    ``smooth``: interpolated between the shells, linear in ``log`` power over ``|k|``, instead
    of a staircase. Why: whitening by a staircase scales neighbouring grid points of different
    shells unevenly, so the whitened transform no longer turns with the map, and a copy sampled
    between grid points differs from the map even at the true axes. On an icosahedral phantom
    (I trial 45 of the recovery benchmark, without noise and wedge, shells 2-12) the refinement's
    residual score at the true axes was 0.70 (1 for equal copies) and its optimum 1.13° off;
    smooth, 0.997 and 0.01°."""
    s = ft.shape[-2]
    radius = rfft_radius(s, ft.device)
    shell = radius.round().long()
    power = ft.abs() ** 2
    total = torch.zeros(int(shell.max()) + 1, dtype=power.dtype, device=power.device)
    count = torch.zeros_like(total)
    total.index_add_(0, shell.flatten(), power.flatten())
    count.index_add_(0, shell.flatten(), torch.ones_like(power.flatten()))
    mean = (total / count.clamp(min=1)).clamp(min=torch.finfo(power.dtype).tiny)
    if not smooth:
        return mean[shell].sqrt()
    below = radius.floor().long().clamp(max=mean.numel() - 2)
    t = (radius - below).to(power.dtype)
    log_mean = mean.log()
    return (0.5 * ((1 - t) * log_mean[below] + t * log_mean[below + 1])).exp()


def prepare_band(
    volume: torch.Tensor,
    centre_px: torch.Tensor,
    low: float,
    high: float,
    with_power: bool = False,
    mask_radius_px: float | None = None,
    smooth_whitening: bool = False,
) -> FourierBand:
    """Move ``centre_px`` (xyz offset from voxel s//2) of ``volume (s, s, s)`` to the centre, mask
    with a soft sphere (of ``mask_radius_px``, default the largest in the box), whiten (per
    shell, or ``smooth_whitening``: see :func:`shell_rms`), keep the frequencies up to ``high``
    (Fourier crop to a small box) and pad for interpolation; ``with_power`` adds the local power
    (:func:`pair_residuals`)."""
    s = volume.shape[-1]
    k_full = rfft_coords(s, volume.device).to(volume.dtype)
    phase = 2 * torch.pi * (k_full @ centre_px.to(volume.dtype)) / s
    ft = centred_rfft(volume) * torch.polar(torch.ones_like(phase), phase)
    ft = centred_rfft(centred_irfft(ft, s) * spherical_mask(s, volume, radius_px=mask_radius_px))
    rms = shell_rms(ft, smooth_whitening)
    ft = ft / rms.clamp(min=1e-4 * float(rms.max()))
    b = min(s - s % 2, 2 * (math.ceil(high) + 2))
    small = centred_irfft(fourier_crop(ft, b), b) if b < s else centred_irfft(ft, s)
    pad = default_pad(b)
    grid = full_grid(small, pad)
    k = rfft_coords(b, volume.device).to(volume.dtype)
    r = k.norm(dim=-1)
    keep = (r >= low) & (r <= high) & ~((k[..., 0] == 0) & (_negative_half(k)))
    coords = k[keep]
    power = local_power(grid, pad) if with_power else None
    shells = r[keep].round().long()
    band = FourierBand(grid, pad, coords, coords[:, 0], coords[:, 0], s, shells, power)
    values = sample_band(band, coords)
    weights = torch.full_like(coords[:, 0], 2.0)  # each kept k stands for k and -k
    power_values = sample_power(band, coords) if with_power else None
    return replace(band, values=values, weights=weights, power_values=power_values)


def keep_shells(band: FourierBand, shell_weights: torch.Tensor, floor: float = 0.02) -> FourierBand:
    """The band restricted to the shells whose weight exceeds ``floor`` times the largest (the
    shells where the copies agree): the same scores for a fraction of the cost."""
    useful = shell_weights > floor * float(shell_weights.max())
    keep = useful[band.shells]
    return replace(
        band,
        coords=band.coords[keep],
        values=band.values[keep],
        weights=band.weights[keep],
        shells=band.shells[keep],
        power_values=None if band.power_values is None else band.power_values[keep],
    )


def _negative_half(k: torch.Tensor) -> torch.Tensor:
    """On the kx = 0 plane, the half of the points whose Friedel mates are kept instead."""
    return (k[..., 2] < 0) | ((k[..., 2] == 0) & (k[..., 1] < 0))


def _copy(
    band: FourierBand, h: torch.Tensor, shift_px: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The frequencies ``q = hᵀk`` ``(..., V, 3)`` and the copy's values ``F(q)`` ``(..., V)``
    with the phase that moves ``centre + shift_px`` to the centre of both copies."""
    q = torch.einsum("vi,...ij->...vj", band.coords, h.to(band.coords.dtype))
    sampled = sample_band(band, q)
    if shift_px is not None:
        d = torch.einsum("...ij,j->...i", h.to(shift_px.dtype), shift_px) - shift_px
        phase = 2 * torch.pi * torch.einsum("vi,...i->...v", band.coords, d) / band.box
        sampled = sampled * torch.polar(torch.ones_like(phase), phase)
    return q, sampled


def _pair_terms(
    band: FourierBand,
    h: torch.Tensor,
    shift_px: torch.Tensor | None,
    noise_power: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-frequency numerator and denominator ``(..., V)`` of :func:`pair_correlations`."""
    _, sampled = _copy(band, h, shift_px)
    prod = band.values.conj() * sampled
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


def pair_residuals(
    band: FourierBand,
    h: torch.Tensor,
    shift_px: torch.Tensor,
    noise_power: torch.Tensor,
    shell_weights: torch.Tensor | None = None,
    floor: float = 0.05,
) -> torch.Tensor:
    """Agreement ``1 - ½·mean_k r_k`` of the map with its copies by ``h (..., 3, 3)`` -> ``(...)``
    from the noise-normalised residuals (generalised least squares)

        r_k = |√s_q·F(k) - √s_k·F(q)|² / ((s_k + s_q)·σ²),   q = hᵀk,

    ``s`` the local signal power (the band's smoothed ``|F|²`` less the shell's ``noise_power``,
    at least ``floor``) and ``σ²`` the shell's noise power. Each copy is filtered by the other's
    local amplitude, so a filter that does not turn with the map (wedge, anisotropic blur)
    cancels at the true axes, and every residual has an expected value of about 1 there:
    unlike the normalised correlation, whose denominator moves with ``h``, noisy frequencies
    cannot pull the optimum. Needs ``prepare_band(..., with_power=True)``; ``shell_weights``
    weight shells.
    """
    q, sampled = _copy(band, h, shift_px)
    noise = noise_power.to(sampled.real.dtype)[band.shells]
    assert band.power_values is not None, "prepare_band(..., with_power=True) samples the power"
    s_k = (band.power_values - noise).clamp(min=floor)
    s_q = (sample_power(band, q) - noise).clamp(min=floor)
    diff = s_q.sqrt() * band.values - s_k.sqrt() * sampled
    residual = (diff.real**2 + diff.imag**2) / ((s_k + s_q) * noise.clamp(min=floor))
    w = band.weights if shell_weights is None else band.weights * shell_weights[band.shells]
    w = w.to(residual.dtype)
    return 1 - 0.5 * (residual * w).sum(-1) / w.sum().clamp(min=torch.finfo(w.dtype).tiny)


def shell_correlations(
    band: FourierBand, h: torch.Tensor, shift_px: torch.Tensor | None = None
) -> torch.Tensor:
    """``ρ`` per shell, averaged over operators ``h (g, 3, 3)`` -> ``(n_shells,)``."""
    num, den = _pair_terms(band, h, shift_px)
    n = int(band.shells.max()) + 1
    num_s = torch.zeros(n, dtype=num.dtype).index_add_(0, band.shells, num.sum(0))
    den_s = torch.zeros(n, dtype=num.dtype).index_add_(0, band.shells, den.sum(0))
    return num_s / den_s.clamp(min=torch.finfo(num.dtype).tiny)


def operator_shell_correlations(
    band: FourierBand, h: torch.Tensor, shift_px: torch.Tensor | None = None
) -> torch.Tensor:
    """``ρ`` per operator and shell: ``h (g, 3, 3)`` -> ``(g, n_shells)`` (0 for shells outside
    the band)."""
    num, den = _pair_terms(band, h, shift_px)
    n = int(band.shells.max()) + 1
    num_s = num.new_zeros(h.shape[0], n).index_add_(1, band.shells, num)
    den_s = den.new_zeros(h.shape[0], n).index_add_(1, band.shells, den)
    return num_s / den_s.clamp(min=torch.finfo(num.dtype).tiny)


def turn_excess(
    band: FourierBand,
    h: torch.Tensor,
    shift_px: torch.Tensor | None = None,
    n_turns: int = 12,
    skip_deg: float = 20.0,
) -> torch.Tensor:
    """How far the map agrees with its copy by each proper rotation ``h (m, 3, 3)`` beyond what
    any turn about the same axis gives -> ``(m,)``: ``(ρ(h) - ρ̄) / (1 - ρ̄)``, ``ρ̄`` the mean
    ``ρ`` of ``n_turns`` turns about ``h``'s axis by angles from ``skip_deg`` to ``360 -
    skip_deg``. The part of a map that is cylindrical about an axis agrees with every turn about
    it (a compact blob at low resolution with any Cn about its long axis): only the rest, the
    fraction of it that agrees, is evidence that ``h`` is a symmetry. About 1 for a symmetry
    (less with noise), about 0 for a wrong turn."""
    axes, _ = _axis_angle(h.to(torch.float64))
    angles = torch.linspace(
        math.radians(skip_deg), 2 * math.pi - math.radians(skip_deg), n_turns, dtype=torch.float64
    )
    turns = axis_rotation(
        axes[:, None, :].expand(-1, n_turns, -1), angles.expand(axes.shape[0], -1)
    )
    dtype = band.coords.dtype
    rho = pair_correlations(band, h.to(dtype), shift_px)
    mean = pair_correlations(band, turns.to(dtype), shift_px).mean(-1)
    return (rho - mean) / (1 - mean).clamp(min=1e-3)


def operator_pairs(group: PointGroup) -> tuple[torch.Tensor, torch.Tensor]:
    """The non-identity operators up to inversion, ``(m, 3, 3)``, and their multiplicities
    ``(m,)`` (2 where ``g ≠ g⁻¹``): ``ρ(h) = ρ(hᵀ)``, so each pair is scored once."""
    ops = group.operators[1:]
    keep, weight, seen = [], [], {}
    for i, g in enumerate(ops):
        key_t = tuple(torch.round(g.T.flatten() * 1e4).long().tolist())
        if key_t in seen:
            weight[seen[key_t]] = 2.0
            continue
        seen[tuple(torch.round(g.flatten() * 1e4).long().tolist())] = len(keep)
        keep.append(i)
        weight.append(1.0)
    return ops[keep], torch.tensor(weight, dtype=torch.float64)


def _axis_angle(ops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit axes ``(m, 3)`` and angles ``(m,)`` in ``(0, π]`` of proper rotations ``(m, 3, 3)``."""
    cos = ((ops.diagonal(dim1=-2, dim2=-1).sum(-1) - 1) / 2).clamp(-1.0, 1.0)
    angle = torch.arccos(cos)
    skew = torch.stack(
        [ops[:, 2, 1] - ops[:, 1, 2], ops[:, 0, 2] - ops[:, 2, 0], ops[:, 1, 0] - ops[:, 0, 1]], -1
    )
    # near π the skew part vanishes: (M + Mᵀ)/2 - cos θ I = (1 - cos θ) a aᵀ (sign irrelevant)
    eye = torch.eye(3, dtype=ops.dtype)
    sym = (ops + ops.transpose(-1, -2)) / 2 - cos[:, None, None] * eye
    column = sym.diagonal(dim1=-2, dim2=-1).argmax(-1)
    from_sym = sym[torch.arange(ops.shape[0]), :, column]
    axis = torch.where((angle > 2.5)[:, None], from_sym, skew)
    axis = torch.where((angle < 1e-6)[:, None], torch.zeros_like(axis), axis)  # identity: none
    return axis / axis.norm(dim=-1, keepdim=True).clamp(min=1e-12), angle


def operator_directions(ops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Directions ``(m, 3)`` and angles ``(m,)`` (radians) of operators ``(m, 3, 3)``: the axis
    and turn of a rotation; of an improper operator ``g``, those of the rotation ``-g`` (a mirror
    gives its plane's normal and π, the inversion the angle 0)."""
    proper = torch.linalg.det(ops) > 0
    rotations = torch.where(proper[:, None, None], ops, -ops)
    return _axis_angle(rotations)


class AngleTables:
    """``ρ`` of turns by fixed angles about every direction of a latitude-longitude grid of the
    upper hemisphere (``ρ(a, θ) = ρ(-a, θ)``), computed once per angle and then interpolated: the
    global search of any proper group costs a few tables instead of candidates × operators, and
    groups sharing angles (detection) share tables."""

    def __init__(self, band: FourierBand, step_deg: float = 2.5, chunk_points: int = 2_000_000):
        self.band = band
        self.n_tilt = math.ceil(90.0 / step_deg) + 1
        self.n_rot = math.ceil(360.0 / step_deg)
        tilt = torch.linspace(0.0, math.pi / 2, self.n_tilt, dtype=torch.float64)
        rot = torch.arange(self.n_rot, dtype=torch.float64) * (2 * math.pi / self.n_rot)
        t, r = torch.meshgrid(tilt, rot, indexing="ij")
        self.directions = torch.stack([t.sin() * r.cos(), t.sin() * r.sin(), t.cos()], -1)
        self.chunk_points = chunk_points
        self._tables: dict[int, torch.Tensor] = {}

    def table(self, angle_rad: float) -> torch.Tensor:
        """``(n_tilt, n_rot)`` correlations for turns by ``angle_rad`` about the grid directions."""
        key = round(angle_rad * 1e6)
        if key not in self._tables:
            dirs = self.directions.reshape(-1, 3)
            h = axis_rotation(dirs, torch.full_like(dirs[:, 0], angle_rad))
            per = max(1, self.chunk_points // self.band.coords.shape[0])
            rho = [
                pair_correlations(self.band, h[i : i + per].to(self.band.coords.dtype))
                for i in range(0, h.shape[0], per)
            ]
            self._tables[key] = torch.cat(rho).double().reshape(self.n_tilt, self.n_rot)
        return self._tables[key]

    def lookup(self, angle_rad: float, axes: torch.Tensor) -> torch.Tensor:
        """Bilinear interpolation of the table of ``angle_rad`` at unit ``axes (..., 3)``."""
        tab = self.table(angle_rad)
        a = torch.where(axes[..., 2:3] < 0, -axes, axes)
        ti = torch.arccos(a[..., 2].clamp(-1.0, 1.0)) / (math.pi / 2) * (self.n_tilt - 1)
        ri = torch.atan2(a[..., 1], a[..., 0]) % (2 * math.pi) / (2 * math.pi) * self.n_rot
        t0 = ti.floor().long().clamp(max=self.n_tilt - 2)
        r0 = ri.floor().long()
        ft, fr = ti - t0, ri - r0
        r0, r1 = r0 % self.n_rot, (r0 + 1) % self.n_rot
        top = tab[t0, r0] * (1 - fr) + tab[t0, r1] * fr
        bottom = tab[t0 + 1, r0] * (1 - fr) + tab[t0 + 1, r1] * fr
        return top * (1 - ft) + bottom * ft


def search_rotations(
    band: FourierBand,
    group: PointGroup,
    rotations: torch.Tensor,
    tables: AngleTables | None = None,
    chunk_points: int = 2_000_000,
) -> torch.Tensor:
    """Mean ``ρ`` over the group's operators per candidate ``rotations (n, 3, 3)``.

    A proper group is scored from :class:`AngleTables` (``RᵀgR`` turns by g's angle about
    ``Rᵀa_g``); other groups directly, one operator of each pair ``g, g⁻¹``."""
    ops, mult = operator_pairs(group)
    if group.is_proper:
        tables = tables if tables is not None else AngleTables(band)
        axes, angles = _axis_angle(ops)
        total = torch.zeros(rotations.shape[0], dtype=torch.float64)
        for a, angle, m in zip(axes, angles.tolist(), mult.tolist(), strict=True):
            total += m * tables.lookup(angle, rotations.transpose(-1, -2) @ a)
        return total / mult.sum()
    ops = ops.to(band.coords.dtype)
    w = mult.to(band.coords.dtype)
    per = max(1, chunk_points // (ops.shape[0] * band.coords.shape[0]))
    out = []
    for start in range(0, rotations.shape[0], per):
        r = rotations[start : start + per].to(band.coords.dtype)
        h = r.transpose(-1, -2)[:, None] @ ops[None] @ r[:, None]
        out.append((pair_correlations(band, h) * w).sum(-1) / w.sum())
    return torch.cat(out).double()


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


def _skew_exp(omega: torch.Tensor) -> torch.Tensor:
    zero = omega.new_zeros(())
    wx, wy, wz = omega.unbind()
    k = torch.stack(
        [torch.stack([zero, -wz, wy]), torch.stack([wz, zero, -wx]), torch.stack([-wy, wx, zero])]
    )
    return torch.linalg.matrix_exp(k)


def maximise_turn(
    score: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    start: torch.Tensor,
    iterations: int,
    start_shift: torch.Tensor | None = None,
    refine_shift: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """L-BFGS on a rotation vector (left perturbation of ``start (3, 3)``) and a shift (input
    pixels, from ``start_shift``; kept when not ``refine_shift``) maximising ``score(r, shift)``
    (a scalar tensor, differentiable in both), with a weak prior ``1e-4·|shift|²``. Returns the
    rotation, the shift and the score there. Float64 throughout; ``score`` casts as it needs."""
    omega = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    shift0 = torch.zeros(3, dtype=torch.float64) if start_shift is None else start_shift
    shift = shift0.clone().double().requires_grad_(refine_shift)
    r0 = start.to(torch.float64)
    variables = [omega, shift] if refine_shift else [omega]
    opt = torch.optim.LBFGS(variables, lr=1, max_iter=iterations, line_search_fn="strong_wolfe")

    def loss_fn() -> torch.Tensor:
        opt.zero_grad()
        loss = -score(_skew_exp(omega) @ r0, shift) + 1e-4 * (shift**2).sum()
        loss.backward()
        return loss

    opt.step(loss_fn)
    with torch.no_grad():
        r = _skew_exp(omega) @ r0
        value = score(r, shift)
    return r.detach(), shift.detach(), float(value)
