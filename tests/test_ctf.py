"""CTF and dose weighting against independent formulas (zeros, astigmatism, limits)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from denovo3d.ctf import (
    critical_exposure,
    ctf_2d,
    dose_weight,
    electron_wavelength_a,
    rfft2_frequencies,
)


def _zeros_inv_a(defocus_a: float, voltage_kv: float, cs_mm: float, q0: float) -> np.ndarray:
    """Frequencies of CTF zeros from the textbook phase χ(k) = πλΔf k² − π/2 Cs λ³ k⁴.

    CTF = −sin(−χ − asin(q0)) = sin(χ + asin(q0)) vanishes where χ + asin(q0) = nπ; solved as a
    quadratic in k² (numpy, independent of the code under test).
    """
    lam = 12.398 / math.sqrt(voltage_kv * (1022.0 + voltage_kv)) * 1.0  # Å, textbook form
    cs = cs_mm * 1e7
    out = []
    for n in range(1, 8):
        # (π/2) Cs λ³ u² − π λ Δf u + (nπ − asin q0) = 0, u = k²
        roots = np.roots(
            [0.5 * math.pi * cs * lam**3, -math.pi * lam * defocus_a, n * math.pi - math.asin(q0)]
        )
        u = roots[np.isreal(roots)].real
        out.append(math.sqrt(u[u > 0].min()))
    return np.array(out)


def test_wavelength_matches_textbook() -> None:
    assert electron_wavelength_a(300.0) == pytest.approx(0.019687, abs=2e-6)
    assert electron_wavelength_a(200.0) == pytest.approx(0.025079, abs=2e-6)


@pytest.mark.parametrize("defocus_a", [15000.0, 30000.0, 50000.0])
def test_ctf_zeros_at_textbook_frequencies(defocus_a: float) -> None:
    zeros = _zeros_inv_a(defocus_a, 300.0, 2.7, 0.07)
    k = torch.tensor(zeros, dtype=torch.float64)
    freq = torch.stack([k, torch.zeros_like(k)], -1)
    assert ctf_2d(freq, defocus_a, defocus_a, 0.0).abs().max() < 2e-3
    # and the sign flips across each zero
    eps = 1e-5
    before = ctf_2d(torch.stack([k - eps, 0 * k], -1), defocus_a, defocus_a, 0.0)
    after = ctf_2d(torch.stack([k + eps, 0 * k], -1), defocus_a, defocus_a, 0.0)
    assert bool((before * after < 0).all())


def test_ctf_low_frequency_is_amplitude_contrast_and_positive() -> None:
    freq = torch.tensor([[0.0, 0.0], [0.002, 0.0]], dtype=torch.float64)
    ctf = ctf_2d(freq, 30000.0, 30000.0, 0.0, amplitude_contrast=0.07)
    assert float(ctf[0]) == pytest.approx(0.07, abs=1e-9)
    assert float(ctf[1]) > 0.07  # underfocus: white particles stay white


def test_astigmatism_direction_follows_defocus_angle() -> None:
    angle = 30.0
    k = torch.linspace(0.005, 0.1, 50, dtype=torch.float64)
    rad = math.radians(angle)
    direction_u = torch.tensor([math.cos(rad), math.sin(rad)], dtype=torch.float64)
    direction_v = torch.tensor([-direction_u[1], direction_u[0]])
    along_u = ctf_2d(k[:, None] * direction_u, 20000.0, 26000.0, angle)
    along_v = ctf_2d(k[:, None] * direction_v, 20000.0, 26000.0, angle)
    iso_u = ctf_2d(torch.stack([k, 0 * k], -1), 20000.0, 20000.0, 0.0)
    iso_v = ctf_2d(torch.stack([k, 0 * k], -1), 26000.0, 26000.0, 0.0)
    torch.testing.assert_close(along_u, iso_u)
    torch.testing.assert_close(along_v, iso_v)


def test_b_factor_and_scale_and_batching() -> None:
    freq = rfft2_frequencies(32, 4.0)  # (32, 17, 2)
    defocus = torch.tensor([20000.0, 30000.0]).double()[:, None, None]
    plain = ctf_2d(freq, defocus, defocus, 0.0)
    assert plain.shape == (2, 32, 17)
    damped = ctf_2d(freq, defocus, defocus, 0.0, b_factor_a2=100.0, scale=0.5)
    k2 = (freq**2).sum(-1)
    torch.testing.assert_close(damped, 0.5 * plain * torch.exp(-100.0 * k2 / 4))


def test_rfft2_frequencies_layout() -> None:
    freq = rfft2_frequencies(8, 2.0)
    assert freq.shape == (8, 5, 2)
    assert float(freq[0, 4, 0]) == pytest.approx(0.25)  # Nyquist in x: 1/(2·2 Å)
    assert float(freq[7, 0, 1]) == pytest.approx(-1 / 16)  # last row: ky = -1 cycle/box


def test_dose_weight_grant_grigorieff() -> None:
    k = torch.tensor([0.0, 0.1, 0.05], dtype=torch.float64)  # 1/Å
    ne = critical_exposure(k)
    assert math.isinf(float(ne[0]))
    assert float(ne[1]) == pytest.approx(0.245 * 10**1.665 + 2.81, rel=1e-9)
    w = dose_weight(k, 20.0)
    assert float(w[0]) == 1.0
    assert float(w[1]) == pytest.approx(math.exp(-20.0 / (2 * (0.245 * 10**1.665 + 2.81))))
    # more exposure, less weight; higher frequency, less weight
    assert float(dose_weight(k[1:2], 40.0)) < float(w[1]) < float(w[2])
