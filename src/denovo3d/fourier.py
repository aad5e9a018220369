"""Fourier-space helpers on ``torch.fft.rfftn`` half grids.

Layout (pinned by tests): a real volume ``(z, y, x)`` of even box ``s`` with its centre at voxel
``s // 2`` (RELION's convention) is transformed by :func:`centred_rfft` into ``(s, s, s // 2 + 1)``
complex with the zero frequency at index 0 (``fftfreq`` order in z and y, ``kx = 0..s/2``). The
forward transform is unnormalised (``norm="backward"``), so a central section of a 3D transform
equals the 2D transform of the projection (sum along z), with no scale factor.

Frequencies are in "pixels of frequency" (cycles per box); coordinates are passed as ``(..., 3)``
in xyz order.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

__all__ = [
    "centred_irfft",
    "centred_rfft",
    "fourier_crop",
    "fourier_pad",
    "gaussian_filter",
    "phase_shift",
    "rfft_coords",
    "rfft_radius",
    "sample_rfft",
    "splat_rfft",
]


def centred_rfft(volume: torch.Tensor) -> torch.Tensor:
    """``(.., s, s, s)`` real, centre at ``s//2`` -> ``(.., s, s, s//2+1)`` complex, origin at 0."""
    shifted = torch.fft.ifftshift(volume, dim=(-3, -2, -1))
    return torch.fft.rfftn(shifted, dim=(-3, -2, -1))


def centred_irfft(ft: torch.Tensor, box: int | None = None) -> torch.Tensor:
    """Inverse of :func:`centred_rfft`; ``box`` defaults to the y size of ``ft``."""
    s = ft.shape[-2] if box is None else box
    volume = torch.fft.irfftn(ft, s=(s, s, s), dim=(-3, -2, -1))
    return torch.fft.fftshift(volume, dim=(-3, -2, -1))


def rfft_coords(box: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Integer frequencies ``(s, s, s//2+1, 3)`` (kx, ky, kz) of the half grid, float32."""
    k = torch.fft.fftfreq(box, 1.0 / box, device=device)
    kx = torch.arange(box // 2 + 1, device=device, dtype=k.dtype)
    kz, ky, kxx = torch.meshgrid(k, k, kx, indexing="ij")
    return torch.stack([kxx, ky, kz], dim=-1)


def rfft_radius(box: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Radius ``|k|`` in frequency pixels on the half grid, ``(s, s, s//2+1)`` float32."""
    return rfft_coords(box, device).norm(dim=-1)


def _wrapped_window(box_from: int, box_to: int, device: torch.device) -> torch.Tensor:
    """Indices into an fftfreq axis of ``box_from`` for the frequencies of ``box_to`` (smaller)."""
    k = torch.fft.fftfreq(box_to, 1.0 / box_to, device=device).long()
    return k % box_from


def fourier_crop(ft: torch.Tensor, box: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Keep the frequencies of a smaller even box: ``(.., S, S, S//2+1)`` -> ``(.., s, s, s//2+1)``
    (into ``out`` if given).

    The values are kept as they are (no rescaling), so cropped transforms of data and reference
    stay on the same scale; the Nyquist planes of the small box are zeroed to keep Friedel symmetry.
    Four block copies (the non-negative and negative halves of z and y): one pass over the output.
    """
    big = ft.shape[-2]
    if box > big or box % 2:
        raise ValueError(f"cannot crop a box of {big} to {box}")
    h = box // 2
    if out is None:
        out = ft.new_empty((*ft.shape[:-3], box, box, h + 1))
    halves = ((slice(0, h), slice(0, h)), (slice(h, box), slice(big - h, big)))
    for z_out, z_in in halves:
        for y_out, y_in in halves:
            out[..., z_out, y_out, :] = ft[..., z_in, y_in, : h + 1]
    out[..., h, :, :] = 0
    out[..., :, h, :] = 0
    out[..., :, :, h] = 0
    return out


def fourier_pad(ft: torch.Tensor, box: int) -> torch.Tensor:
    """Inverse of :func:`fourier_crop`: place a small half grid into a larger one (zeros around)."""
    small = ft.shape[-2]
    if box < small:
        raise ValueError(f"cannot pad a box of {small} to {box}")
    out = ft.new_zeros((*ft.shape[:-3], box, box, box // 2 + 1))
    idx = _wrapped_window(box, small, ft.device)
    zz, yy = torch.meshgrid(idx, idx, indexing="ij")
    out[..., zz, yy, : small // 2 + 1] = ft
    return out


def gaussian_filter(ft: torch.Tensor, box: int, sigma_px: float) -> torch.Tensor:
    """``ft`` (centred rfft of a box-``box`` map) times the transform of a Gaussian of
    ``sigma_px`` (real-space pixels): the map blurred, in Fourier space."""
    k2 = (rfft_coords(box, ft.device).to(ft.real.dtype) ** 2).sum(-1) / box**2
    return ft * torch.exp(-2 * torch.pi**2 * sigma_px**2 * k2)


def phase_shift(ft: torch.Tensor, shifts_px: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Translate real-space content by ``shifts_px`` (xyz, pixels) in Fourier space.

    ``ft`` is ``(..., V)`` complex sampled at frequencies ``coords`` ``(V, 3)`` in cycles per
    pixel (integer frequencies divided by the box). ``shifts_px`` is ``(..., 3)``. A positive
    shift moves the content towards +x: ``F'(k) = F(k) exp(-2πi k·t)``.
    """
    phase = -2.0 * torch.pi * (shifts_px.to(coords.dtype) @ coords.T)
    return ft * torch.polar(torch.ones_like(phase), phase)


def _in_band(index: torch.Tensor, s: int, dtype: torch.dtype) -> torch.Tensor:
    """1 where an integer frequency lies in ``[-s/2, s/2]`` (the grid), 0 beyond (no wrap)."""
    return ((index >= -(s // 2)) & (index <= s // 2)).to(dtype)


def _trilinear_corners(k: torch.Tensor, s: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The 8 corners around frequencies ``k (..., 3)`` (``kx >= 0``) on an ``s`` half grid
    padded with one zero plane at ``kx = s/2 + 1``: ``(flat index, trilinear weight)`` each.
    Corners past Nyquist in y or z get weight 0 (no wrap to the opposite edge); in x they land
    on the zero plane."""
    half = s // 2 + 1
    k0 = torch.floor(k)
    frac = k - k0
    k0 = k0.long()
    for dz in (0, 1):
        kz = k0[..., 2] + dz
        wz = (frac[..., 2] if dz else 1 - frac[..., 2]) * _in_band(kz, s, frac.dtype)
        for dy in (0, 1):
            ky = k0[..., 1] + dy
            wy = (frac[..., 1] if dy else 1 - frac[..., 1]) * _in_band(ky, s, frac.dtype)
            for dx in (0, 1):
                wx = frac[..., 0] if dx else 1 - frac[..., 0]
                ix = (k0[..., 0] + dx).clamp(max=half)
                yield ((kz % s) * s + ky % s) * (half + 1) + ix, wz * wy * wx


def sample_rfft(ft: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Trilinear samples of a half-grid transform at arbitrary frequencies, Friedel-aware.

    ``ft``: ``(s, s, s//2+1)`` complex (or real, e.g. a CTF² volume). ``coords``: ``(..., 3)``
    xyz frequencies in pixels of frequency, any sign. Points with ``kx < 0`` read ``conj(F(-k))``.
    Samples whose neighbourhood reaches past Nyquist read zeros there. Returns ``(...)``.
    """
    s = ft.shape[-2]
    flip = coords[..., 0] < 0
    k = torch.where(flip.unsqueeze(-1), -coords, coords)
    padded = torch.cat([ft, ft.new_zeros(s, s, 1)], dim=-1).reshape(-1)
    out = sum(padded[index] * weight for index, weight in _trilinear_corners(k, s))
    if out.is_complex():
        out = torch.where(flip, out.conj(), out)
    return out


def splat_rfft(values: torch.Tensor, coords: torch.Tensor, box: int) -> torch.Tensor:
    """Trilinear scatter onto a half grid: the exact adjoint of :func:`sample_rfft`.

    ``values``: ``(...)`` complex or real, placed at frequencies ``coords (..., 3)`` (xyz, any
    sign; points with ``kx < 0`` put ``conj(value)`` at ``-k``). Returns ``(s, s, s//2+1)`` with
    the same dtype as ``values``. Half-grid entries are treated as independent (no Hermitian
    completion of the ``kx = 0`` plane: the caller does that where it needs a transform).
    Under the real inner product ``Re Σ conj(a)·b``:
    ``<sample_rfft(F, k), v> = <F, splat_rfft(v, k)>``.
    """
    s, half = box, box // 2 + 1
    flip = coords[..., 0] < 0
    k = torch.where(flip.unsqueeze(-1), -coords, coords)
    if values.is_complex():
        values = torch.where(flip, values.conj(), values)
    out = values.new_zeros(s * s * (half + 1))
    for index, weight in _trilinear_corners(k, s):
        out.index_add_(0, index.reshape(-1), (values * weight.to(values.dtype)).reshape(-1))
    return out.reshape(s, s, half + 1)[..., :half].clone()
