"""Fourier layout conventions, checked against direct computations."""

from __future__ import annotations

import torch

from denovo3d.fourier import (
    centred_irfft,
    centred_rfft,
    fourier_crop,
    fourier_pad,
    phase_shift,
    rfft_coords,
    sample_rfft,
    splat_rfft,
)


def _blob(box: int, centre: tuple[float, float, float], sigma: float = 2.0) -> torch.Tensor:
    z, y, x = torch.meshgrid(*(torch.arange(box, dtype=torch.float64),) * 3, indexing="ij")
    cx, cy, cz = centre
    return torch.exp(-((x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2) / (2 * sigma**2))


def test_centred_transform_of_centred_delta_is_real_constant() -> None:
    vol = torch.zeros(16, 16, 16, dtype=torch.float64)
    vol[8, 8, 8] = 1.0
    ft = centred_rfft(vol)
    torch.testing.assert_close(ft, torch.ones_like(ft))
    torch.testing.assert_close(centred_irfft(ft), vol)


def test_central_section_is_projection_transform() -> None:
    vol = _blob(16, (7.0, 9.0, 8.5)) + _blob(16, (10.0, 6.0, 5.0), 1.5)
    ft = centred_rfft(vol)
    proj = vol.sum(dim=0)  # along z
    ft2 = torch.fft.rfftn(torch.fft.ifftshift(proj), dim=(-2, -1))
    torch.testing.assert_close(ft[0], ft2)


def test_phase_shift_moves_content_towards_plus_x() -> None:
    box = 24
    vol = _blob(box, (12.0, 12.0, 12.0), 1.2)
    coords = rfft_coords(box).reshape(-1, 3).double() / box
    ft = centred_rfft(vol).reshape(-1)
    shifted = phase_shift(ft, torch.tensor([2.0, -1.0, 3.0], dtype=torch.float64), coords)
    out = centred_irfft(shifted.reshape(box, box, box // 2 + 1))
    torch.testing.assert_close(out, _blob(box, (14.0, 11.0, 15.0), 1.2), atol=1e-9, rtol=0)


def test_crop_then_pad_keeps_low_frequencies() -> None:
    vol = _blob(32, (16.0, 15.0, 17.0), 3.0)
    ft = centred_rfft(vol)
    small = fourier_crop(ft, 16)
    assert small.shape == (16, 16, 9)
    back = fourier_pad(small, 32)
    k = rfft_coords(32)
    inside = k.norm(dim=-1) < 7
    torch.testing.assert_close(back[inside], ft[inside])
    assert float(back[k.abs().amax(dim=-1) >= 8].abs().max()) == 0.0


def test_crop_keeps_each_frequency_by_index_and_zeroes_nyquist() -> None:
    """Every frequency of the small box comes from the same signed frequency of the large one
    (checked by index, batched, into ``out`` or not); the small box's Nyquist planes are 0."""
    gen = torch.Generator().manual_seed(1)
    ft = torch.randn(3, 32, 32, 17, dtype=torch.complex64, generator=gen)
    for box in (16, 10, 32):
        out = torch.full((3, box, box, box // 2 + 1), float("nan"), dtype=ft.dtype)
        for got in (fourier_crop(ft, box), fourier_crop(ft, box, out=out)):
            for z in range(box):
                for y in range(box):
                    fz, fy = (z + box // 2) % box - box // 2, (y + box // 2) % box - box // 2
                    want = ft[:, fz % 32, fy % 32, : box // 2 + 1].clone()
                    if box // 2 in (z, y):
                        want.zero_()
                    want[:, box // 2] = 0
                    assert torch.equal(got[:, z, y], want)
        assert fourier_crop(ft, box, out=out) is out


def test_sample_on_grid_points_and_friedel() -> None:
    box = 16
    vol = _blob(box, (6.0, 9.0, 8.0)) + _blob(box, (10.0, 7.0, 9.0), 1.2)
    ft = centred_rfft(vol)
    full = torch.fft.fftn(torch.fft.ifftshift(vol))
    k = torch.tensor(
        [[3.0, -2.0, 5.0], [-3.0, 2.0, -5.0], [-4.0, -1.0, 0.0], [0.0, 7.0, -6.0]],
        dtype=torch.float64,
    )
    got = sample_rfft(ft, k)
    idx = k.long() % box
    expected = full[idx[:, 2], idx[:, 1], idx[:, 0]]
    torch.testing.assert_close(got, expected)


def test_sample_rotates_a_volume() -> None:
    # Rotating frequencies by R rotates the real-space map by R (about the centre).
    box = 24
    vol = _blob(box, (15.0, 12.0, 12.0), 1.5)  # off-centre along +x
    ft = centred_rfft(vol)
    R = torch.tensor([[0.0, -1, 0], [1, 0, 0], [0, 0, 1]], dtype=torch.float64)  # +90 deg about z
    coords = rfft_coords(box).double()
    rotated = sample_rfft(ft, coords @ R)  # F'(k) = F(Rᵀk): row-vector form k @ R
    out = centred_irfft(rotated)
    expected = _blob(box, (12.0, 15.0, 12.0), 1.5)  # x -> y
    assert torch.corrcoef(torch.stack([out.flatten(), expected.flatten()]))[0, 1] > 0.99


def test_samples_past_nyquist_read_zeros_and_splat_stays_adjoint() -> None:
    # Between the Nyquist plane (y = 8 of box 16) and beyond it, trilinear weights fall to
    # zero past the grid instead of wrapping to the opposite edge (y = -7).
    box = 16
    ft = centred_rfft(_blob(box, (7.0, 8.0, 8.5), 1.0)).to(torch.complex128)
    at_nyquist = sample_rfft(ft, torch.tensor([[1.0, 8.0, 2.0]], dtype=torch.float64))
    past = sample_rfft(ft, torch.tensor([[1.0, 8.5, 2.0]], dtype=torch.float64))
    torch.testing.assert_close(past, 0.5 * at_nyquist)
    far = torch.tensor([[2.0, 3.0, -9.25], [0.5, -9.5, 1.0]], dtype=torch.float64)
    assert sample_rfft(ft, far).abs().max() == 0
    g = torch.Generator().manual_seed(0)
    q = (torch.rand(200, 3, generator=g, dtype=torch.float64) - 0.5) * 2.4 * box / 2
    v = torch.randn(200, dtype=torch.complex128, generator=g)
    lhs = (sample_rfft(ft, q).conj() * v).real.sum()
    rhs = (ft.conj() * splat_rfft(v, q, box)).real.sum()
    torch.testing.assert_close(lhs, rhs)
