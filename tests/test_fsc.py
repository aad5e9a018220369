"""FSC with RELION's binning against a plain re-implementation of RELION's getFSC loop."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from denovo3d.fsc import fsc, fsc_volumes, resolution_at


def _relion_get_fsc(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """RELION's ``getFSC``: loop over the FFTW half grid, shell ``round(|k|)``, skip ≥ s/2+1."""
    s = a.shape[0]
    fa, fb = np.fft.rfftn(a), np.fft.rfftn(b)
    n = s // 2 + 1
    num, d1, d2 = np.zeros(n), np.zeros(n), np.zeros(n)
    for z in range(s):
        kz = z if z < s // 2 else z - s  # Xmipp logical index: [-s/2, s/2)
        for y in range(s):
            ky = y if y < s // 2 else y - s
            for x in range(s // 2 + 1):
                idx = round(math.sqrt(x * x + ky * ky + kz * kz))
                if idx >= n:
                    continue
                z1, z2 = fa[z, y, x], fb[z, y, x]
                num[idx] += (np.conj(z1) * z2).real
                d1[idx] += abs(z1) ** 2
                d2[idx] += abs(z2) ** 2
    return num / np.sqrt(d1 * d2)


def test_matches_relion_loop() -> None:
    gen = np.random.default_rng(0)
    a = gen.normal(size=(12, 12, 12))
    b = a + 2.0 * gen.normal(size=a.shape)
    expected = _relion_get_fsc(a, b)
    got = fsc_volumes(torch.from_numpy(a), torch.from_numpy(b))
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-10, atol=1e-12)


def test_identical_is_one_and_batched() -> None:
    a = torch.randn(3, 16, 16, 16)
    curves = fsc_volumes(a, a)
    assert curves.shape == (3, 9)
    torch.testing.assert_close(curves, torch.ones(3, 9, dtype=torch.float64))
    ft = torch.fft.rfftn(a, dim=(-3, -2, -1))
    assert fsc(ft, ft[0]).shape == (3, 9)  # broadcasts


def test_resolution_at_threshold() -> None:
    curve = torch.tensor([1.0, 0.99, 0.9, 0.6, 0.4, 0.2, 0.6, 0.1])
    assert resolution_at(curve, 0.5, 14, 2.0) == pytest.approx(14 * 2.0 / 3)
    assert resolution_at(curve, 0.143, 14, 2.0) == pytest.approx(14 * 2.0 / 6)
    assert resolution_at(torch.ones(8), 0.5, 14, 2.0) == pytest.approx(4.0)
    assert math.isinf(resolution_at(torch.tensor([1.0, 0.1, 0.9]), 0.5, 4, 1.0))
