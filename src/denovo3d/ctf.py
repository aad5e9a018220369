"""The contrast transfer function (RELION's formula) and dose weighting, batched in torch.

CTF, as RELION's ``CTF::getCTF`` (``ctf.h``/``ctf.cpp``), for a spatial frequency ``(kx, ky)`` in
1/Å::

    λ      = 12.2643247 / sqrt(V · (1 + 0.978466e-6 · V))         (Å, V in volts)
    Δf(θ)  = ΔfU cos²(θ − θ_ast) + ΔfV sin²(θ − θ_ast)            (Å, underfocus positive)
    γ      = −π λ Δf(θ) |k|² + (π/2) Cs λ³ |k|⁴ − φ − atan(Q0 / sqrt(1 − Q0²))
    CTF    = −scale · sin(γ) · exp(−B |k|² / 4)

so CTF(0) = Q0 > 0 and an underfocused CTF is positive at low frequency: a white (positive)
density times the CTF gives a white particle, as RELION's references and contrast-inverted
particles are. ``θ_ast`` (rlnDefocusAngle) is the direction of ΔfU measured from +x.

Dose weighting, Grant & Grigorieff (2015) critical exposure as RELION's ``Damage``:
``w = exp(−N / (2 · Ne(k)))`` with ``Ne(k) = 0.245 · k^−1.665 + 2.81`` e/Å², k in 1/Å and N the
exposure received before the image (rlnMicrographPreExposure).
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "critical_exposure",
    "ctf_2d",
    "dose_weight",
    "electron_wavelength_a",
    "rfft2_frequencies",
]


def electron_wavelength_a(voltage_kv: float) -> float:
    """Relativistic electron wavelength in Å (RELION's constants)."""
    volts = voltage_kv * 1e3
    return 12.2643247 / math.sqrt(volts * (1.0 + volts * 0.978466e-6))


def rfft2_frequencies(
    box: int, pixel_size_a: float, device: torch.device | str | None = None
) -> torch.Tensor:
    """Frequencies ``(s, s//2+1, 2)`` (kx, ky) in 1/Å of a ``torch.fft.rfft2`` half grid."""
    ky = torch.fft.fftfreq(box, pixel_size_a, device=device, dtype=torch.float64)
    kx = torch.fft.rfftfreq(box, pixel_size_a, device=device, dtype=torch.float64)
    yy, xx = torch.meshgrid(ky, kx, indexing="ij")
    return torch.stack([xx, yy], dim=-1)


def ctf_2d(
    freq_inv_a: torch.Tensor,
    defocus_u_a: torch.Tensor | float,
    defocus_v_a: torch.Tensor | float,
    defocus_angle_deg: torch.Tensor | float,
    voltage_kv: float = 300.0,
    cs_mm: float = 2.7,
    amplitude_contrast: float = 0.07,
    b_factor_a2: torch.Tensor | float = 0.0,
    scale: torch.Tensor | float = 1.0,
    phase_shift_deg: float = 0.0,
) -> torch.Tensor:
    """RELION's CTF (module docstring) at frequencies ``freq_inv_a`` ``(..., 2)`` (kx, ky, 1/Å).

    The defocus, B-factor and scale arguments are floats or tensors that broadcast against
    ``freq_inv_a[..., 0]``, e.g. ``(b, f, 1, 1)`` against a ``(s, s//2+1, 2)`` grid gives
    ``(b, f, s, s//2+1)``. Returns the CTF in the dtype of ``freq_inv_a``.
    """
    if not 0.0 <= amplitude_contrast < 1.0:
        raise ValueError(f"amplitude contrast must be in [0, 1), got {amplitude_contrast}")
    dtype = freq_inv_a.dtype
    kx, ky = freq_inv_a[..., 0], freq_inv_a[..., 1]
    k2 = kx * kx + ky * ky
    as_t = lambda v: torch.as_tensor(v, dtype=dtype, device=freq_inv_a.device)  # noqa: E731
    du, dv, angle = as_t(defocus_u_a), as_t(defocus_v_a), torch.deg2rad(as_t(defocus_angle_deg))
    cos_a, sin_a = torch.cos(angle), torch.sin(angle)
    along_u = kx * cos_a + ky * sin_a  # component of k along the ΔfU direction
    along_v = -kx * sin_a + ky * cos_a
    defocus_k2 = du * along_u**2 + dv * along_v**2  # Δf(θ)·|k|²
    lam = electron_wavelength_a(voltage_kv)
    cs_a = cs_mm * 1e7
    k3 = math.atan(amplitude_contrast / math.sqrt(1.0 - amplitude_contrast**2))
    gamma = (
        -math.pi * lam * defocus_k2
        + 0.5 * math.pi * cs_a * lam**3 * k2 * k2
        - math.radians(phase_shift_deg)
        - k3
    )
    return -as_t(scale) * torch.sin(gamma) * torch.exp(-as_t(b_factor_a2) * k2 / 4.0)


def critical_exposure(freq_inv_a: torch.Tensor) -> torch.Tensor:
    """Grant & Grigorieff critical exposure ``Ne(k)`` in e/Å² (``inf`` at k = 0), same shape."""
    k = freq_inv_a.abs()
    safe = torch.where(k > 0, k, torch.ones_like(k))
    ne = 0.245 * safe.pow(-1.665) + 2.81
    return torch.where(k > 0, ne, torch.full_like(k, math.inf))


def dose_weight(freq_inv_a: torch.Tensor, exposure_e_per_a2: torch.Tensor | float) -> torch.Tensor:
    """``exp(−N / (2 Ne(|k|)))``; ``freq_inv_a`` holds |k| in 1/Å, ``N`` broadcasts against it."""
    exposure = torch.as_tensor(exposure_e_per_a2, dtype=freq_inv_a.dtype, device=freq_inv_a.device)
    return torch.exp(-exposure / (2.0 * critical_exposure(freq_inv_a)))
