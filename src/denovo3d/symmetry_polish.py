"""Last refinement of a Cn or Dn alignment: a masked generalised-least-squares residual of the map
and its turned copies, each filtered by the other's gain.

Why: the Fourier-space score of :mod:`denovo3d.symmetry_search` masks the map once, before it is
compared with its turned copies. A filter that does not turn with the map (a missing wedge,
anisotropic resolution) smears density that the mask then cuts unevenly, and the local power
that stands in for the filter mixes directions across a wedge's edge at low frequencies. Both
move the optimum, by degrees on a dimer with few strong features (without this stage the C2
recovery phantoms miss 1° in 8 of 100 trials).

Here, for each operator ``h`` (lab frame, ``q = hᵀk``) and the map ``V`` centred on the trial
centre, the residual of the copies, each filtered by the other's gain ``g``, is taken after the
mask ``M``:

    D = F⁻¹[ω(|k|)·(g(q)·V(k) − g(k)·V(q)) / √(g(k)² + g(q)²)],   score = 1 − Σ M·D² / (2 Σ M·A²)

with ``A = F⁻¹[ω·V]`` at the start (a constant). ``g(k)`` is the map's power along the ray through
``k`` (over the band of shells, each whitened, its noise taken out): a filter that depends on
direction only is constant along a ray, and the map's own directional power is symmetric, so at
the true axes the signal cancels in ``D`` for any mask (applied after the filtering: the
particle's shape, :func:`shape_mask`, within the sphere of its diameter).

Without the mask this is (up to constants, each shell's ``ρ`` held fixed) the log-likelihood
of a symmetric map seen through the filter ``g`` with white noise, its signal marginalised with
a Gaussian prior: per frequency, the residual of the pair orthogonal to
``(g(k), g(q))`` is the generalised-least-squares residual (its noise has the same variance
wherever the axes are, so noisy directions cannot pull the optimum, which the correlation of
the cross-filtered copies allowed), and the prior weighs each shell by its signal's share
``ω² = ρ = SNR/(1+SNR)``, the agreement of the copies at the start, instead of a cut at
``ρ ≥ 2/3`` (to :attr:`PolishSettings.rho_min`, where ``ρ`` is small). On the recovery
phantoms (trials 0-99) this took C2 from 97 to 100 within 1° (the correlation missed trials 54,
56 and 69 by 1.03°, 2.8° and 1.33°; now 0.75°, 0.98°, 0.69°); C6 and C7 went from 100 to 99, D2
and D7 stayed at 99, each missing trial 14, whose subunit sits near the centre: from the true axes
both scores put C6 and C7 trial 14 1.1-1.6° off. Alignment costs a mean of 2.9-7.6 s of CPU
per map for these groups (1.6-4.8 s before): the taper reaches further out than the cut.

Cn and Dn only: on the icosahedral phantoms, polished from the true axes (every shell with
``ρ > 0``), it ends 0.6-1.3° off (trials 0, 1, 45, 86), no better than the Fourier-space score,
whose many operators already average their noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from denovo3d.fourier import (
    centred_irfft,
    centred_rfft,
    fourier_crop,
    gaussian_filter,
    rfft_coords,
)
from denovo3d.geometry.symmetry import PointGroup, default_pad
from denovo3d.symmetry_search import (
    full_grid,
    local_power,
    maximise_turn,
    operator_pairs,
    spherical_mask,
)

__all__ = ["PolishSettings", "applies", "polish", "shape_mask"]

_RAY_SIGMA_PX = 0.25  # smoothing of |F|² before the rays: a wedge's edge spans a few degrees
_RADIAL_STEP_PX = 0.5
_MASK_EDGE_PX = 2.0
_SHAPE_SOFT = 0.1  # the dilated support's level at which the mask reaches 1
_TABLE_RADIUS = 24  # px of the gain's table: 2.4° between its points


@dataclass(frozen=True)
class PolishSettings:
    """``rho_min``: the shells compared end at the last whose copies agree this well (beyond,
    the weight ``ρ`` is small and mostly its own noise, and the box it needs costs: from the
    true axes, 0.1 and 0.2 moved C2 trials 52, 54, 57 and 69 by at most 0.12° from where every
    shell with ``ρ > 0`` put them, trial 56 from 1.00° to 1.29° and 1.21°, at a half and a
    third of the CPU time); ``gain_floor``: the least gain (a direction with no signal);
    ``iterations`` of L-BFGS; ``low``: the first shell compared (cycles); the shape mask: the
    map low-passed by a Gaussian of ``shape_lowpass_px``, above ``shape_threshold`` of its
    maximum, dilated by a Gaussian of ``shape_dilate_px``."""

    rho_min: float = 0.1
    gain_floor: float = 0.05
    iterations: int = 25
    low: float = 2.0
    shape_lowpass_px: float = 2.0
    shape_threshold: float = 0.15
    shape_dilate_px: float = 1.5


def applies(group: PointGroup) -> bool:
    """Cyclic and dihedral groups (RELION's Cn, Dn) of order at least 2."""
    name = group.name.upper()
    return group.order > 1 and name[0] in "CD" and name[1:].isdigit()


def _sample(grid: torch.Tensor, pad: int, coords: torch.Tensor) -> torch.Tensor:
    """Trilinear samples ``(channels, ...)`` of a centred padded grid ``(1, c, S, S, S)`` at
    frequencies ``coords (..., 3)`` (xyz, cycles per box; zero beyond the grid)."""
    size = grid.shape[-1]
    index = coords * pad + size // 2
    norm = index * (2.0 / (size - 1)) - 1.0
    points = norm.reshape(1, -1, 1, 1, 3)
    out = torch.nn.functional.grid_sample(
        grid, points, mode="bilinear", padding_mode="zeros", align_corners=True
    )
    return out.reshape(grid.shape[1], *coords.shape[:-1])


def _shell_means(values: torch.Tensor, bins: torch.Tensor, n: int) -> torch.Tensor:
    total = values.new_zeros(n).index_add_(0, bins.flatten(), values.flatten())
    count = values.new_zeros(n).index_add_(0, bins.flatten(), torch.ones_like(values.flatten()))
    return total / count.clamp(min=1)


class _RayGain:
    """``g(k)``: the map's signal power along the ray through ``k``, each shell's over the shell's
    mean, averaged over the rays' shells weighted by ``(S/(S+N))²``, its square root.

    ``noise_power``: white noise power per frequency (that of the solvent, :func:`_solvent_noise`);
    the rays run from ``low`` to ``high`` cycles. ``g`` depends on the direction only, so it is
    tabulated once on a cube whose points stand for their directions and read back by one
    trilinear sample on a sphere of :data:`_TABLE_RADIUS` (a ray is ~60 samples)."""

    def __init__(
        self, ft: torch.Tensor, s: int, noise_power: float, low: float, high: float, floor: float
    ):
        high = _last_shell_with_signal(ft, s, noise_power, low, high)
        b = min(s - s % 2, 2 * (math.ceil(high) + 2))
        self.pad = default_pad(b)
        grid = full_grid(centred_irfft(fourier_crop(ft, b) if b < s else ft, b), self.pad)
        self.power = local_power(grid, self.pad, _RAY_SIGMA_PX)
        size = self.power.shape[-1]
        r = (torch.arange(size, dtype=ft.real.dtype) - size // 2) / self.pad
        radius = (r[:, None, None] ** 2 + r[None, :, None] ** 2 + r[None, None, :] ** 2).sqrt()
        bins = (radius / _RADIAL_STEP_PX).round().long()
        total = _shell_means(self.power[0, 0], bins, int(bins.max()) + 1)
        self.radii = torch.arange(low, high + 1e-9, _RADIAL_STEP_PX, dtype=ft.real.dtype)
        shell_total = total[(self.radii / _RADIAL_STEP_PX).round().long()]
        tiny = 1e-12 * float(shell_total.max())
        self.signal = (shell_total - noise_power).clamp(min=tiny)
        self.weights = (self.signal / (self.signal + noise_power)) ** 2
        self.noise_power, self.floor = noise_power, floor
        t = torch.arange(-_TABLE_RADIUS, _TABLE_RADIUS + 1, dtype=ft.real.dtype)
        cube = torch.stack(torch.meshgrid(t, t, t, indexing="ij")[::-1], -1)  # xyz, z slowest
        # a trilinear sample on the sphere reads points within √3 of it: only those are computed
        near = ((cube.norm(dim=-1) - _TABLE_RADIUS).abs() <= 2.0).nonzero(as_tuple=True)
        table = torch.full(cube.shape[:3], math.sqrt(floor), dtype=ft.real.dtype)
        table[near] = torch.cat([self.rays(c) for c in cube[near].split(8192)])
        self.table = table[None, None]

    def rays(self, coords: torch.Tensor) -> torch.Tensor:
        """The gain along each ray, computed: ``coords (..., 3)`` -> ``(...)``."""
        unit = coords / coords.norm(dim=-1, keepdim=True).clamp(min=1e-9)
        points = unit[..., None, :] * self.radii[:, None]  # (..., R, 3)
        p = (_sample(self.power, self.pad, points)[0] - self.noise_power) / self.signal
        d = (p * self.weights).sum(-1) / self.weights.sum().clamp(min=1e-30)
        return d.clamp(min=self.floor).sqrt()

    def __call__(self, coords: torch.Tensor) -> torch.Tensor:
        """The gain from the table: ``coords (..., 3)`` -> ``(...)``, differentiable in them."""
        unit = coords / coords.norm(dim=-1, keepdim=True).clamp(min=1e-9)
        return _sample(self.table, 1, unit * _TABLE_RADIUS)[0]


def _last_shell_with_signal(
    ft: torch.Tensor, s: int, noise_power: float, low: float, high: float
) -> float:
    """The last radius (cycles, ``low + 2`` to ``high``) whose shell's signal still weighs
    ``(S/(S+N))² >= 1%`` in the gain: beyond it the rays add nothing but cost."""
    radius = rfft_coords(s).to(ft.real.dtype).norm(dim=-1)
    bins = (radius / _RADIAL_STEP_PX).round().long()
    total = _shell_means(ft.abs() ** 2, bins, int(bins.max()) + 1)
    signal = (total - noise_power).clamp(min=0.0)
    weight = (signal / (signal + noise_power).clamp(min=1e-30)) ** 2
    radii = torch.arange(len(total), dtype=ft.real.dtype) * _RADIAL_STEP_PX
    kept = radii[(weight >= 0.01) & (radii <= high)]
    return max(float(kept.max()) if kept.numel() else 0.0, low + 2)


def _solvent_noise(centred: torch.Tensor) -> float:
    """White noise power per frequency of the unnormalised transform, from the map's variance
    beyond the inscribed sphere (less 4 px): the solvent of a particle centred in its box (0 for
    a map whose solvent is flattened)."""
    s = centred.shape[-1]
    r = torch.arange(s, dtype=centred.dtype) - s // 2
    radius = (r[:, None, None] ** 2 + r[None, :, None] ** 2 + r[None, None, :] ** 2).sqrt()
    return float(centred[radius > s // 2 - 4].var()) * s**3


def shape_mask(ft: torch.Tensor, s: int, b: int, settings: PolishSettings) -> torch.Tensor:
    """Soft mask ``(b, b, b)`` on the particle's own shape: where the map ``ft`` (centred rfft,
    box ``s``) low-passed is above a fraction of its maximum, dilated, at box ``b <= s``.

    Why: the correlation's noise comes from every voxel the mask keeps; solvent inside the
    sphere adds only noise. On the C2 recovery phantoms the sphere alone missed 1° in 4 of 100
    trials, with the shape 2-3 (it changes nothing at the true axes: there the filtered copies
    agree everywhere)."""
    low = centred_irfft(gaussian_filter(ft, s, settings.shape_lowpass_px), s)
    support = (low > settings.shape_threshold * low.max()).to(low.dtype)
    dilated = gaussian_filter(centred_rfft(support), s, settings.shape_dilate_px)
    small = centred_irfft(fourier_crop(dilated, b) if b < s else dilated, b) * (b / s) ** 3
    return (small / _SHAPE_SOFT).clamp(0.0, 1.0)


class _Copies:
    """The map centred on its trial centre, cut to the shells with signal, ready to score."""

    def __init__(
        self,
        volume: torch.Tensor,
        centre_px: torch.Tensor,
        rho: torch.Tensor,
        mask_radius_px: float | None,
        settings: PolishSettings,
    ):
        s = volume.shape[-1]
        v = volume.to(torch.float64)
        k_full = rfft_coords(s).to(v.dtype)
        phase = 2 * torch.pi * (k_full @ centre_px.to(v.dtype)) / s
        ft = centred_rfft(v) * torch.polar(torch.ones_like(phase), phase)
        agree = (rho >= settings.rho_min).nonzero()
        high = max(float(agree.max()) if agree.numel() else 0.0, settings.low + 2)
        b = min(s - s % 2, 2 * (math.ceil(high) + 2))
        self.s, self.b = s, b
        self.values = fourier_crop(ft, b) if b < s else ft
        self.pad = default_pad(b)
        small = centred_irfft(self.values, b)
        self.grid = full_grid(small, self.pad)
        self.k = rfft_coords(b).to(v.dtype)
        radius = self.k.norm(dim=-1)
        shell = radius.round().long().clamp(max=rho.numel() - 1)
        inside = (radius >= settings.low) & (radius <= high)
        self.omega = (rho.to(v.dtype).clamp(min=0.0)[shell] * inside).sqrt()
        edge = _MASK_EDGE_PX * b / s
        mask_radius = None if mask_radius_px is None else mask_radius_px * b / s
        sphere = spherical_mask(b, small, edge_px=edge, radius_px=mask_radius)
        self.mask = sphere * shape_mask(ft, s, b, settings)
        noise = _solvent_noise(centred_irfft(ft, s))
        ray_high = float(rho.numel() - 1)
        self.gain = _RayGain(ft, s, noise, settings.low, ray_high, settings.gain_floor)
        self.gain_k = self.gain(self.k)
        start = centred_irfft(self.omega * self.values, b)
        self.scale = 2 * float((self.mask * start * start).sum()) + 1e-30

    def score(self, h: torch.Tensor, shift_px: torch.Tensor) -> torch.Tensor:
        """Agreement ``(m,)``, ``1 −`` the masked residual of the copies by operators
        ``h (m, 3, 3)`` about the trial centre moved by ``shift_px (3,)`` (input pixels), over twice
        the map's masked power (a constant: 1 where they agree, about 0.5 where unrelated)."""
        q = torch.einsum("zyxi,mij->mzyxj", self.k, h)  # q = hᵀk
        sampled = _sample(self.grid, self.pad, q)
        v_q = torch.complex(sampled[0], sampled[1])
        phase_k = 2 * torch.pi * (self.k @ shift_px) / self.s
        phase_q = 2 * torch.pi * (q @ shift_px) / self.s
        v_k = self.values * torch.polar(torch.ones_like(phase_k), phase_k)
        v_q = v_q * torch.polar(torch.ones_like(phase_q), phase_q)
        g_q = self.gain(q)
        norm = (g_q**2 + self.gain_k**2).sqrt()
        d = centred_irfft(self.omega * (g_q * v_k - self.gain_k * v_q) / norm, self.b)
        return 1 - (self.mask * d * d).sum((-3, -2, -1)) / self.scale


def polish(
    volume: torch.Tensor,
    group: PointGroup,
    rotation: torch.Tensor,
    centre_px: torch.Tensor,
    rho: torch.Tensor,
    mask_radius_px: float | None = None,
    settings: PolishSettings | None = None,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Refine ``rotation (3, 3)`` (onto the standard axes) and the centre ``centre_px (3,)`` (xyz
    offset from voxel s//2) of ``volume (s, s, s)`` by L-BFGS on the cross-filtered residual.

    ``rho (n_shells,)``: how well each shell agrees with its copies at the start (the shell
    model of the Fourier-space refinement), which weighs the shells. Returns the rotation, the
    centre and the mean agreement (1 at a perfect symmetry)."""
    settings = settings or PolishSettings()
    copies = _Copies(volume, centre_px, rho, mask_radius_px, settings)
    ops, mult = operator_pairs(group)
    ops = ops.to(torch.float64)
    mult = (mult / mult.sum()).to(torch.float64)

    def score(r: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        return (copies.score(r.T @ ops @ r, shift) * mult).sum()

    r, shift, value = maximise_turn(score, rotation, settings.iterations)
    return r, centre_px.to(torch.float64) + shift, value
