"""Reading RELION-format particle sets that our simulator did not write."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from denovo3d.cli import main
from denovo3d.fourier import centred_rfft, fourier_crop
from denovo3d.particles import load_particle_set
from tests.relion_layout import (
    make_classic_subtomo_project,
    make_pseudo_subtomo_project,
    write_volume,
)


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    monkeypatch.chdir(tmp_path)  # RELION resolves paths from the project directory
    return make_pseudo_subtomo_project(tmp_path)


@pytest.mark.parametrize("entry", ["particles", "optimisation_set"])
def test_reads_relion4_pseudo_subtomograms(project: dict, entry: str) -> None:
    ps = load_particle_set(project[entry])
    assert (ps.n, ps.box, ps.kind) == (6, 16, "pseudo")
    assert ps.pixel_size_a == pytest.approx(5.4)
    batch = ps.load([1, 4])
    data, ctf2, mult = project["volumes"][4]
    empty = mult < 0.01
    expected = centred_rfft(torch.from_numpy(data)).masked_fill(torch.from_numpy(empty), 0)
    torch.testing.assert_close(batch.data[1], expected.to(torch.complex64), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(batch.ctf2[1], torch.from_numpy(np.where(empty, 0, ctf2)))
    torch.testing.assert_close(batch.multiplicity[1], torch.from_numpy(np.where(empty, 0, mult)))
    assert batch.indices.tolist() == [1, 4]


def test_weights_layout_is_fftw_half_grid(project: dict) -> None:
    # a weights volume that is a pure function of |k| must come back as that function of |k|
    root = Path.cwd()
    box = 16
    k = torch.fft.fftfreq(box, 1 / box)
    kz, ky, kx = torch.meshgrid(k, k, torch.arange(box // 2 + 1.0), indexing="ij")
    radius = (kx**2 + ky**2 + kz**2).sqrt().numpy().astype(np.float32)
    name = project["job"] / "Subtomograms" / "TS_01" / "1_weights.mrc"
    write_volume(root / name, np.concatenate([radius, np.ones_like(radius)]), 1 / 5.4)
    batch = load_particle_set(project["particles"]).load([0])
    torch.testing.assert_close(batch.ctf2[0], torch.from_numpy(radius))


def test_float16_volumes_and_cropping(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    proj = make_pseudo_subtomo_project(tmp_path, n=2, float16=True)
    ps = load_particle_set(proj["particles"])
    full = ps.load([0])
    small = ps.load([0], box=8)
    assert small.data.shape == (1, 8, 8, 5) and small.data.dtype == torch.complex64
    torch.testing.assert_close(small.data, fourier_crop(full.data, 8))


def test_paths_resolve_from_a_parent_when_run_elsewhere(
    project: dict, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    ps = load_particle_set(project["particles"].resolve())
    assert ps.tables.project_dir == tmp_path
    assert ps.load([0]).data.shape == (1, 16, 16, 9)


def test_memory_budget_bounds_the_cache(project: dict) -> None:
    per = 16 * 16 * 9 * 16
    ps = load_particle_set(project["particles"], memory_budget_bytes=3 * per)
    for i in range(6):
        ps.load([i])
    assert len(ps._cache) == 3 and ps._cache_bytes <= 3 * per
    assert list(ps._cache) == [3, 4, 5]  # least recently used evicted
    fresh = load_particle_set(project["particles"], memory_budget_bytes=0)
    for rows in ([4, 0, 4], [1, 2, 3, 5], [5, 3], [0, 1, 2, 3, 4, 5]):  # hits, misses, both
        a, b = ps.load(rows), fresh.load(rows)
        for name in ("data", "ctf2", "multiplicity"):  # FFTs of other batch sizes: rounding
            torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=1e-5, atol=1e-4)
        assert len(ps._cache) == 3 and ps._slab[0].shape[0] == 3


def test_inspect_prints_summary(project: dict, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(project["optimisation_set"])]) == 0
    out = capsys.readouterr().out
    assert "Particles         6 in 2 tomogram(s)" in out
    assert "RELION-4 pseudo-subtomograms" in out
    assert "16 px at 5.400 Å" in out
    assert "TS_01: 3, TS_03: 3" in out
    # 2 of the 9 x-planes are empty in every particle: coverage is below 100 %
    assert "% of Fourier voxels inside Nyquist carry data" in out
    assert "Problems          none" in out


@pytest.mark.parametrize("layout", ["cube", "half", "none"])
def test_classic_subtomograms_become_premultiplied(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, layout: str
) -> None:
    monkeypatch.chdir(tmp_path)
    proj = make_classic_subtomo_project(tmp_path, ctf_layout=layout)
    ps = load_particle_set(proj["particles"])
    assert ps.kind == "classic"
    batch = ps.load([2])
    data, ctf = proj["volumes"][2]
    box = 16
    x = centred_rfft(torch.from_numpy(data).double())
    if layout == "none":
        ctf_half = torch.ones(box, box, box // 2 + 1, dtype=torch.float64)
    elif layout == "half":
        ctf_half = torch.from_numpy(ctf).double()
    else:
        # RELION reads a centred cube at -k: frequency (kz, ky, kx) sits at index s/2 - k
        k = np.fft.fftfreq(box, 1 / box).astype(int)
        ctf_half = torch.empty(box, box, box // 2 + 1, dtype=torch.float64)
        for iz, kz in enumerate(k):
            for iy, ky in enumerate(k):
                for kx in range(box // 2 + 1):
                    ctf_half[iz, iy, kx] = float(
                        ctf[(box // 2 - kz) % box, (box // 2 - ky) % box, (box // 2 - kx) % box]
                    )
    torch.testing.assert_close(batch.data[0].cdouble(), x * ctf_half, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(batch.ctf2[0].double(), ctf_half**2, rtol=1e-5, atol=1e-6)
    assert float(batch.multiplicity.min()) == 1.0


def test_scratch_copy_reads_the_same_particles_and_is_written_once(
    project: dict, tmp_path: Path
) -> None:
    direct = load_particle_set(project["particles"])
    ps = load_particle_set(project["particles"], memory_budget_bytes=0)  # every load reads
    path = ps.use_scratch(tmp_path / "scratch")
    assert path.stat().st_size == 6 * 16 * 16 * 9 * 16
    written = path.stat().st_mtime_ns
    for rows, box in (([4, 1], 16), ([0, 5, 2], 8)):
        a, b = direct.load(rows, box), ps.load(rows, box)
        for name in ("data", "ctf2", "multiplicity"):
            torch.testing.assert_close(getattr(b, name), getattr(a, name), rtol=0, atol=0)
    again = load_particle_set(project["particles"])
    assert again.use_scratch(tmp_path / "scratch") == path
    assert path.stat().st_mtime_ns == written  # found complete: not written again
    assert list((tmp_path / "scratch").iterdir()) == [path]  # no temporary left


def test_loads_into_a_workspace_equal_new_tensors(project: dict) -> None:
    """Batches loaded into a reused workspace (cached and fresh particles, cropped or not) are
    the same as new tensors, and a second load reuses the memory of the first."""
    from denovo3d.memory import Workspace

    ps, ws = load_particle_set(project["particles"]), Workspace()
    first = ps.load([0, 2], box=8, workspace=ws)
    assert torch.equal(first.data, load_particle_set(project["particles"]).load([0, 2], 8).data)
    for rows, box in (([2, 1, 0], 16), ([3, 0], 8)):
        a, b = ps.load(rows, box, workspace=ws), ps.load(rows, box)
        for name in ("data", "ctf2", "multiplicity"):
            assert torch.equal(getattr(a, name), getattr(b, name))
    assert ps.load([1], 8, workspace=ws).data.data_ptr() == a.data.data_ptr()


def test_zero_mask_copy_is_made_once_at_the_cache_box_and_cropped(
    project: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``set_zero_mask`` a batch's ``masked`` is the masked data of the cache box, cropped
    (RELION masks before windowing), for hits and misses alike; a particle is masked once per
    read, not per load; the cache counts its bytes; ``None`` drops it."""
    from denovo3d import particles
    from denovo3d.engine.references import mask_particles

    calls = []

    def counting(data, *args, **kwargs):
        calls.append(data.shape[0])
        return mask_particles(data, *args, **kwargs)

    monkeypatch.setattr(particles, "mask_particles", counting)
    ps = load_particle_set(project["particles"])
    assert ps.load([0]).masked is None
    ps.set_zero_mask(54.0, 3.0)  # 10 px at 5.4 Å a pixel
    plain = load_particle_set(project["particles"])
    for rows, box in (([0, 3], 16), ([3, 5, 0], 8), ([5], 12)):
        got = ps.load(rows, box)
        full = plain.load(rows)
        expected = mask_particles(full.data, 10.0, 3.0)
        expected = expected if box == 16 else fourier_crop(expected, box)
        torch.testing.assert_close(got.masked, expected, rtol=1e-5, atol=1e-4)
        assert torch.equal(got.data, plain.load(rows, box).data)  # the data stay unmasked
    assert sum(calls) == 3  # particles 0, 3, 5: each masked once
    assert ps._cache_bytes == 3 * 16 * 16 * 9 * 24
    ps.set_zero_mask(None)
    assert ps.load([0]).masked is None and ps._cache_bytes == 16 * 16 * 9 * 16
