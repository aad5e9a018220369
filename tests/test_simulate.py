"""The simulator against physics: rotated/shifted truth, wedge, SNR, RELION file layout."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import torch
import torch.nn.functional as nnf

from denovo3d.cli import main as cli_main
from denovo3d.fourier import centred_irfft, centred_rfft, rfft_radius
from denovo3d.geometry.euler import euler_to_matrix
from denovo3d.io.star import read_star
from denovo3d.particles import load_particle_set
from denovo3d.phantoms import make_phantom
from denovo3d.simulate import SimulationConfig, Simulator, draw_particles, simulate_project
from denovo3d.tilt_series import TiltScheme, dose_symmetric_order

BOX, PIXEL = 32, 12.0


def _smooth_truth(box: int = BOX, pixel: float = PIXEL) -> torch.Tensor:
    """The asymmetric phantom, low-passed so that real-space trilinear rotation is accurate."""
    volume = make_phantom("asymmetric", box, pixel).double()
    ft = torch.fft.rfftn(torch.fft.ifftshift(volume)) * torch.exp(
        -((rfft_radius(box) / (box / 5)) ** 2)
    )
    return torch.fft.fftshift(torch.fft.irfftn(ft, s=(box,) * 3)).float()


def _rotate_shift(volume: torch.Tensor, A: torch.Tensor, origin_px: torch.Tensor) -> torch.Tensor:
    """Independent real-space model of a particle: ``p(x) = truth(Aᵀ (x + o))`` (grid_sample)."""
    s = volume.shape[-1]
    c = torch.arange(s, dtype=torch.float64) - s // 2
    zz, yy, xx = torch.meshgrid(c, c, c, indexing="ij")
    x = torch.stack([xx, yy, zz], -1) + origin_px.double()
    source = x @ A.double()  # (Aᵀ x)ᵀ = xᵀ A
    grid = (source + s // 2) / (s - 1) * 2 - 1
    out = nnf.grid_sample(volume[None, None].double(), grid[None], align_corners=True)
    return out[0, 0]


def _correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.to(torch.complex128), b.to(torch.complex128)
    return float((a.conj() * b).real.sum() / (a.abs().pow(2).sum() * b.abs().pow(2).sum()).sqrt())


def _config(**kw) -> SimulationConfig:
    base = dict(n_particles=4, box=BOX, pixel_size_a=PIXEL, chunk_size=3, n_tomograms=2)
    return SimulationConfig(**(base | kw))


def test_dose_symmetric_order_and_exposure() -> None:
    assert dose_symmetric_order(4, 4) == [0, 1, -1, -2, 2, 3, -3, -4, 4]
    assert dose_symmetric_order(1, 3) == [0, 1, -1, 2, 3]
    scheme = TiltScheme.dose_symmetric(-60, 60, 3, 3.0)
    assert scheme.n_tilts == 41
    assert torch.equal(scheme.tilt_angles_deg, torch.arange(-60, 61, 3).double())
    exposure = dict(
        zip(scheme.tilt_angles_deg.tolist(), scheme.pre_exposure_e_per_a2.tolist(), strict=True)
    )
    assert exposure[0.0] == 0 and exposure[3.0] == 3 and exposure[-3.0] == 6 and exposure[-6.0] == 9
    assert sorted(exposure.values()) == [3.0 * i for i in range(41)]


def test_noise_free_data_is_the_rotated_shifted_truth_inside_the_wedge() -> None:
    truth = _smooth_truth()
    config = _config(snr=None, apply_ctf=False, dose_weighting=False, circle_crop=False)
    sim = Simulator(truth, config)
    draws = draw_particles(config)
    chunk = sim.simulate(draws, torch.arange(4))
    m = chunk.multiplicity
    inside = (m > 0.5) & (rfft_radius(BOX) < 0.7 * BOX / 2)
    for i in range(4):
        A = euler_to_matrix(*draws.angles_deg[i])
        origin = draws.origins_a[i] / PIXEL
        assert float(origin.norm()) > 0.3  # offsets are really there
        estimate = (chunk.data[i] / m.clamp_min(1e-6))[inside]
        right = centred_rfft(_rotate_shift(truth, A, origin))[inside]
        assert _correlation(estimate, right) > 0.98
        # the other origin sign and the transposed rotation are clearly worse
        wrong_sign = centred_rfft(_rotate_shift(truth, A, -origin))[inside]
        transposed = centred_rfft(_rotate_shift(truth, A.T, origin))[inside]
        assert _correlation(estimate, wrong_sign) < 0.9
        assert _correlation(estimate, transposed) < 0.9


def test_multiplicity_counts_tilts_and_is_zero_in_the_missing_wedge() -> None:
    sim = Simulator(torch.zeros(BOX, BOX, BOX), _config(snr=None))
    m = sim.insertion.multiplicity
    n_tilts = sim.scheme.n_tilts
    ky_axis = m[0, 1 : BOX // 2, 0]  # every tilt plane contains the y axis
    assert bool((ky_axis >= n_tilts).all()) and bool((ky_axis < 1.3 * n_tilts).all())
    kz_axis = m[3 : BOX // 2, 0, 0]  # the beam direction at 0° lies in the missing wedge
    assert float(kz_axis.abs().max()) == 0.0
    # a direction 80° from x in the xz plane is missing beyond the first shells, 30° is not
    for angle, covered in ((80.0, False), (30.0, True)):
        r = torch.arange(4, BOX // 2 - 1, dtype=torch.float64)
        x = (r * math.cos(math.radians(angle))).round().long()
        z = (r * math.sin(math.radians(angle))).round().long() % BOX
        assert bool((m[z, 0, x] > 0.5).all()) == covered
    # Friedel symmetry on the x = 0 plane
    mirror = m[:, :, 0].flip(0, 1).roll((1, 1), (0, 1))
    torch.testing.assert_close(m[:, :, 0], mirror)


def test_classic_volume_is_ctf3d_times_particle() -> None:
    truth = _smooth_truth()
    config = _config(snr=None, classic=True, circle_crop=False)
    sim = Simulator(truth, config)
    draws = draw_particles(config)
    chunk = sim.simulate(draws, torch.arange(2))
    inside = (chunk.multiplicity > 1) & (rfft_radius(BOX) < 0.7 * BOX / 2)
    for i in range(2):
        A = euler_to_matrix(*draws.angles_deg[i])
        particle = centred_rfft(_rotate_shift(truth, A, draws.origins_a[i] / PIXEL))
        model = chunk.classic_ctf[i] * particle
        assert _correlation(chunk.classic_data[i][inside], model[inside]) > 0.97
        # and the pseudo-subtomogram follows D = C·P
        assert _correlation(chunk.data[i][inside], (chunk.ctf2[i] * particle)[inside]) > 0.97


def test_snr_is_signal_variance_over_noise_variance_per_tilt_image() -> None:
    truth = make_phantom("asymmetric", BOX, PIXEL)
    config = _config(n_particles=48, snr=0.5, circle_crop=False)
    sim = Simulator(truth, config)
    draws = draw_particles(config)
    rows = torch.arange(48)
    c = sim.ctf(draws.defocus_a[rows], draws.depth_a[rows])
    images = torch.fft.irfft2(c * sim.particle_slices(draws.angles_deg, draws.origins_a))
    signal_var = float(images.var(dim=(-2, -1)).mean())
    assert signal_var / sim.noise_sigma**2 == pytest.approx(0.5, rel=0.2)
    noise = torch.fft.irfft2(sim.noise(draws.noise_seeds[:4]))
    assert float(noise.std()) == pytest.approx(sim.noise_sigma, rel=0.02)


def test_deterministic_for_a_seed_and_independent_of_chunking() -> None:
    truth = make_phantom("asymmetric", BOX, PIXEL)
    a = Simulator(truth, _config(n_particles=5, chunk_size=2))
    b = Simulator(truth, _config(n_particles=5, chunk_size=5))
    draws = draw_particles(a.config)
    data_a = torch.cat([ch.data for ch in a.chunks(draws)])
    data_b = torch.cat([ch.data for ch in b.chunks(draw_particles(b.config))])
    torch.testing.assert_close(data_a, data_b, rtol=1e-5, atol=1e-3)
    other = draw_particles(_config(n_particles=5, seed=1))
    assert not torch.allclose(other.angles_deg, draws.angles_deg)


def test_project_files_layout_and_round_trip(tmp_path: Path) -> None:
    truth = make_phantom("asymmetric", BOX, PIXEL)
    config = _config(n_particles=5, classic=True)
    paths = simulate_project(tmp_path, truth, config, source="asymmetric")
    s, h = BOX, BOX // 2 + 1
    particles = read_star(paths["particles"])
    table = particles["particles"]
    assert len(table) == 5 and not any(c.startswith("rlnAngle") for c in table.columns)
    assert (table[["rlnOriginXAngst", "rlnOriginYAngst", "rlnOriginZAngst"]] == 0).all().all()
    optics = particles["optics"].iloc[0]
    assert optics["rlnCtfDataAreCtfPremultiplied"] == 1 and optics["rlnImageDimensionality"] == 3
    assert optics["rlnImageSize"] == s and optics["rlnImagePixelSize"] == PIXEL
    with mrcfile.open(tmp_path / table["rlnCtfImage"].iloc[0]) as mrc:
        assert (int(mrc.header.nx), int(mrc.header.ny), int(mrc.header.nz)) == (h, s, 2 * s)
        assert float(mrc.voxel_size.x) == pytest.approx(1 / PIXEL, rel=1e-5)
        weights = np.asarray(mrc.data)
    ctf2, mult = weights[:s], weights[s:]
    assert (mult >= 0).all() and np.all(ctf2[mult == 0] == 0)
    with mrcfile.open(tmp_path / table["rlnImageName"].iloc[0]) as mrc:
        assert mrc.data.shape == (s, s, s) and float(mrc.voxel_size.x) == pytest.approx(PIXEL)
    # the reader gets back exactly what the simulator made
    sim = Simulator(truth, config)
    chunk = sim.simulate(draw_particles(config), torch.arange(5))
    loaded = load_particle_set(paths["optimisation_set"])
    batch = loaded.load(torch.arange(5))
    keep = chunk.multiplicity >= 0.01
    torch.testing.assert_close(batch.ctf2, chunk.ctf2 * keep, rtol=1e-5, atol=1e-4)
    scale = float(chunk.data.abs().max())
    torch.testing.assert_close(batch.data / scale, chunk.data * keep / scale, rtol=0, atol=1e-5)
    # true poses in their own file, matching the draws
    truth_table = read_star(paths["truth_particles"])["particles"]
    draws = draw_particles(config)
    angles = truth_table[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy()
    np.testing.assert_allclose(angles, draws.angles_deg.numpy(), atol=1e-5)
    tomograms = read_star(paths["tomograms"])
    assert list(tomograms) == ["global", "TS_01", "TS_02"] and len(tomograms["TS_01"]) == 41
    opt = read_star(paths["optimisation_set"])
    entry = next(iter(opt.values()))
    assert Path(tmp_path / _first(entry, "rlnTomoParticlesFile")) == paths["particles"]
    classic = load_particle_set(paths["particles_classic"])
    assert classic.kind == "classic" and classic.n == 5


def _first(block, label: str) -> str:
    return str(block[label].iloc[0] if hasattr(block, "iloc") else block[label])


def test_cli_simulate_float16_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "sim"
    argv = ["simulate", "--o", str(out), "--phantom", "asymmetric", "--n", "3"]
    argv += ["--box", str(BOX), "--pixel_size", str(PIXEL), "--float16", "--tomograms", "1"]
    assert cli_main(argv) == 0
    with mrcfile.open(out / "Subtomograms/TS_01/1_data.mrc") as mrc:
        assert int(mrc.header.mode) == 12
    assert load_particle_set(out / "particles.star").n == 3
    assert cli_main(["simulate", "--o", str(out), "--phantom", "c6_hexamer", "--box", "16"]) == 2
    assert "box" in capsys.readouterr().err
    bad_map = tmp_path / "map.mrc"
    with mrcfile.new(bad_map) as mrc:
        mrc.set_data(np.zeros((8, 8, 8), np.float32))
    assert cli_main(["simulate", "--o", str(out), "--map", str(bad_map), "--box", "16"]) == 2
    err = capsys.readouterr().err
    assert str(bad_map) in err and "expected a cube of --box 16" in err


def test_particle_sits_at_box_centre_minus_origin() -> None:
    """RELION's origin convention in real space: the particle centre is at ``s/2 − o``."""
    config = SimulationConfig(n_particles=1, box=BOX, pixel_size_a=PIXEL, snr=None)
    draws = draw_particles(config)
    point = torch.zeros(BOX, BOX, BOX)
    point[BOX // 2, BOX // 2, BOX // 2] = 1.0
    sim = Simulator(point, dataclasses.replace(config, apply_ctf=False))
    data = centred_irfft(sim.simulate(draws, torch.arange(1)).data)[0]
    peak = torch.tensor(np.unravel_index(int(data.argmax()), data.shape)[::-1])
    expected = BOX // 2 - draws.origins_a[0] / PIXEL
    assert float((peak.double() - expected).abs().max()) <= 0.75
    wrong = BOX // 2 + draws.origins_a[0] / PIXEL
    assert float((peak.double() - wrong).norm()) > 1.5
