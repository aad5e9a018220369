"""VDAM schedules against relion-vdam-notes §1.1 worked numbers, and the update's rules."""

from __future__ import annotations

import pytest
import torch

from denovo3d.config import RefineConfig, VdamSchedule
from denovo3d.engine.vdam import Moments, current_size_from_ssnr, vdam_update
from denovo3d.fourier import rfft_radius


def _schedule(n_iter: int = 100, n_particles: int = 10_000, K: int = 1) -> VdamSchedule:
    cfg = RefineConfig(input_path="x", output_root="o", n_iter=n_iter, n_classes=K)
    return VdamSchedule.build(cfg, n_particles)


def test_phases_and_batch_sizes() -> None:
    s = _schedule()
    assert (s.n_ini, s.n_mid, s.n_fin) == (30, 50, 20)
    assert (s.batch_ini, s.batch_fin) == (200, 1000)
    assert [s.batch_size(it) for it in (1, 29, 30, 55, 79, 80, 100)] == [
        200,
        200,
        200,
        600,
        984,
        1000,
        1000,
    ]
    assert (_schedule(n_particles=2_000_000).batch_ini, _schedule(200, 10**6).batch_fin) == (
        5000,
        50000,
    )
    assert _schedule(K=2).batch_size(100) == 10_000  # K > 1: the last iteration takes all
    assert _schedule(n_particles=500).batch_size(1) == 200


@pytest.mark.parametrize(("it", "step"), [(30, 0.896), (36, 0.864), (49, 0.536), (55, 0.504)])
def test_step_size_sigmoid(it: int, step: float) -> None:
    # the notes round the decade points 36.25 and 48.75 to whole iterations
    assert _schedule().step_size(it) == pytest.approx(step, abs=4e-3)


def test_step_size_midpoint_and_n200() -> None:
    s100, s200 = _schedule(), _schedule(200)
    assert (s100.step_size(42) + s100.step_size(43)) / 2 == pytest.approx(0.70, abs=0.02)
    assert s200.step_size(85) == pytest.approx(0.70, abs=1e-9)
    assert s200.step_size(60) == pytest.approx(0.896, abs=1e-3)


@pytest.mark.parametrize(
    ("it", "tau2"), [(30, 1.03), (33, 1.27), (36, 2.5), (39, 3.73), (42, 3.97)]
)
def test_tau2_sigmoid(it: int, tau2: float) -> None:
    assert _schedule().tau2(it) == pytest.approx(tau2, abs=0.01)


def _setup(box: int = 12, K: int = 1):
    g = torch.Generator().manual_seed(0)
    shape = (K, box, box, box // 2 + 1)
    refs = torch.randn(*shape, dtype=torch.complex128, generator=g)
    data = torch.randn(K, 2, *shape[1:], dtype=torch.complex128, generator=g)
    weight = torch.rand(K, 2, *shape[1:], dtype=torch.float64, generator=g) + 0.5
    return refs, data, weight, Moments.initial(K, box, torch.complex128, "cpu")


def test_first_update_follows_the_notes_formulas() -> None:
    refs, data, weight, mom = _setup()
    box, radius, T, step = 12, 4.5, 2.0, 0.7
    new, fsc = vdam_update(refs, data, weight, mom, torch.tensor([step]), T, radius)
    inside = rfft_radius(box) < radius
    g = data / weight * inside
    torch.testing.assert_close(mom.m1, g)  # first use: m = g
    ratio = (g[:, 1] - g[:, 0]).abs() ** 2 / (((g[:, 0] + g[:, 1]) / 2).abs() ** 2)
    expected_v = torch.where(inside, 0.999 + 0.001 * ratio, torch.ones_like(ratio))
    torch.testing.assert_close(mom.m2, expected_v, rtol=1e-6, atol=1e-9)
    shell = torch.round(rfft_radius(box)).long()
    s1 = shell == 2
    noise = (g[0, 0] - g[0, 1]).abs()[s1].mean()
    amp = refs[0].abs()[s1].mean()
    snr = 2 * T * amp / noise
    assert float(fsc[0, 2]) == pytest.approx(float(snr / (1 + snr)))
    direction = ((g[:, 0] + g[:, 1]) / 2) / expected_v.sqrt()
    f = fsc[0, 2]
    expected = refs + step * (f * direction - (1 - f) * refs)
    torch.testing.assert_close(new[0][s1 & inside], expected[0][s1 & inside])
    assert float(new[0][~inside].abs().max()) == 0.0


def test_second_update_uses_momentum() -> None:
    refs, data, weight, mom = _setup()
    vdam_update(refs, data, weight, mom, torch.tensor([0.5]), 1.0, 4.5)
    m_before = mom.m1.clone()
    vdam_update(refs, 2 * data, weight, mom, torch.tensor([0.5]), 1.0, 4.5)
    inside = rfft_radius(12) < 4.5
    torch.testing.assert_close(mom.m1, (0.9 * m_before + 0.1 * 2 * data / weight) * inside)


def test_current_size_from_ssnr() -> None:
    ssnr = torch.tensor([[100.0, 50, 20, 9, 5, 3, 2, 1.5, 0.5, 2, 2]])
    assert current_size_from_ssnr(ssnr, 64) == 2 * (7 + 10)
    assert current_size_from_ssnr(ssnr, 20) == 20
    assert current_size_from_ssnr(torch.zeros(1, 11), 64) == 2 * (5 + 10)


def test_reseed_copies_the_largest_class_into_an_empty_one() -> None:
    from denovo3d.engine.vdam import reseed_empty_class

    refs = torch.stack([torch.full((4, 4, 4), float(k)) for k in range(3)])
    mom = Moments.initial(3, 4, torch.complex64, "cpu")
    mom.m1 += 1.0
    pdf = torch.tensor([0.6, 0.39, 0.01], dtype=torch.float64)
    assert reseed_empty_class(refs, mom, pdf, 0.02) is None  # 0.01 >= 0.02 / 3: kept
    pdf = torch.tensor([0.6, 0.39, 0.01], dtype=torch.float64)
    assert reseed_empty_class(refs, mom, pdf, 0.5) == 2
    assert float(refs[2].mean()) == 0.0  # the copy of class 1 (index 0)
    assert pdf.tolist() == pytest.approx([0.3 / 0.99, 0.39 / 0.99, 0.3 / 0.99])
    assert float(mom.m1[2, 0].real.mean()) == pytest.approx(0.9)


@pytest.mark.parametrize("box", [24, 25])
def test_mask_particles_is_relions_soft_mask_outside_on_the_centred_map(box: int) -> None:
    """The Fourier-frame shortcut of ``mask_particles`` equals the plain definition: the centred
    map, outside a soft sphere set to its edge zone's mean (``softMaskOutsideMap``), transformed
    back. The particle's density is off-centre so that a wrong frame of the mask would show."""
    from denovo3d.engine.references import mask_particles, soft_mask_outside
    from denovo3d.fourier import centred_irfft, centred_rfft

    gen = torch.Generator().manual_seed(3)
    vol = torch.randn(2, box, box, box, generator=gen, dtype=torch.float64)
    vol[:, : box // 3] += 2.0
    data = centred_rfft(vol)
    expected = centred_rfft(soft_mask_outside(centred_irfft(data, box), box / 4, 3.0))
    got = mask_particles(data, box / 2, 3.0)
    assert torch.allclose(got, expected, rtol=0, atol=1e-9 * float(expected.abs().max()))


def test_mask_particles_does_not_depend_on_the_batch() -> None:
    """A particle's masked data are the same whatever batch it is masked with (the edge mean was
    a GEMV whose sums changed with the number of rows)."""
    from denovo3d.engine.references import mask_particles

    gen = torch.Generator().manual_seed(5)
    data = torch.fft.rfftn(torch.randn(40, 34, 34, 34, generator=gen), dim=(-3, -2, -1))
    whole = mask_particles(data, 24.0, 3.0)
    for rows in (slice(0, 1), slice(3, 17), slice(29, 40)):
        assert torch.equal(mask_particles(data[rows], 24.0, 3.0), whole[rows])


def test_mask_particles_reuses_heap_memory_from_call_to_call() -> None:
    """Its per-chunk temporaries stay under glibc's mmap threshold, so a repeated call at box 64
    faults in (almost) no new pages: chunks sized on the real volume made the inverse FFT's
    complex copy 8% larger than the threshold, mapped afresh at every chunk (~17,000 faults
    each, most of a job's system time)."""
    import resource

    from denovo3d import memory
    from denovo3d.engine.references import mask_particles

    if not memory.keep_freed_memory():
        pytest.skip("not glibc: no mmap threshold to set")
    data = torch.zeros(40, 64, 64, 33, dtype=torch.complex64)
    out = torch.empty_like(data)
    for _ in range(2):
        mask_particles(data, 40.0, 5.0, out=out)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    mask_particles(data, 40.0, 5.0, out=out)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before < 10_000  # was 43,000
