"""THE convention test: RELION's own relion_reconstruct rebuilds our truth from our simulated data.

Classic 3D subtomograms with a per-particle 3D CTF are simulated with known poses, the true
poses (rlnAngleRot/Tilt/Psi, rlnOriginX/Y/ZAngst) are put into the STAR file given to
``relion_reconstruct --ctf --3d_rot`` (RELION 3.1), and the FSC of RELION's map to our truth
must reach what the data allow: ~1 up to near Nyquist without noise; with noise, as far as our
own reconstruction from the same data and poses. The same data with the origin sign flipped or
the rotation transposed must fail, so the test is sensitive to exactly those conventions.
"""

from __future__ import annotations

import math
import re
import shutil
import subprocess
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest
import torch

from denovo3d.fourier import centred_irfft, centred_rfft, rfft_coords
from denovo3d.fsc import fsc_volumes, resolution_at
from denovo3d.geometry.euler import euler_to_matrix
from denovo3d.io.star import read_star, write_star
from denovo3d.phantoms import make_phantom
from denovo3d.simulate import SimulationConfig, simulate_project

pytestmark = [
    pytest.mark.relion,
    pytest.mark.skipif(
        shutil.which("relion_reconstruct") is None,
        reason="relion_reconstruct not on PATH (install Debian package relion)",
    ),
]

BOX, PIXEL = 40, 8.0
POSE_LABELS = ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]
ORIGIN_LABELS = ["rlnOriginXAngst", "rlnOriginYAngst", "rlnOriginZAngst"]


def _simulate(root: Path, n: int, snr: float | None) -> tuple[dict, pd.DataFrame, pd.DataFrame]:
    truth = make_phantom("asymmetric", BOX, PIXEL)
    config = SimulationConfig(
        n_particles=n, box=BOX, pixel_size_a=PIXEL, snr=snr, classic=True, chunk_size=50
    )
    paths = simulate_project(root, truth, config, source="asymmetric")
    classic = read_star(paths["particles_classic"])
    posed = classic["particles"].copy()
    truth_table = read_star(paths["truth_particles"])["particles"]
    for label in POSE_LABELS + ORIGIN_LABELS:
        posed[label] = truth_table[label].to_numpy()
    return paths, classic["optics"], posed


def _relion_reconstruct(root: Path, name: str, optics: pd.DataFrame, table: pd.DataFrame) -> Path:
    write_star(root / f"{name}.star", {"optics": optics, "particles": table})
    result = subprocess.run(
        ["relion_reconstruct", "--i", f"{name}.star", "--o", f"{name}.mrc", "--ctf", "--3d_rot"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return root / f"{name}.mrc"


def _read(path: Path) -> torch.Tensor:
    return torch.from_numpy(mrcfile.read(path).astype(np.float32))


def _own_reconstruction(paths: dict, posed: pd.DataFrame) -> torch.Tensor:
    """Our conventions, independently of RELION: splat ``CTF·X·e^{-2πik·o/s}`` at ``Aᵀk``.

    Trilinear insertion into a 2× oversampled half grid, division by ΣCTF², sinc² correction.
    """
    s, big = BOX, 2 * BOX
    h = big // 2 + 1
    k = rfft_coords(s).double()
    inside = k.norm(dim=-1) < s / 2
    root = paths["truth"].parent
    idx = (s // 2 - torch.fft.fftfreq(s, 1 / s).long()) % s  # the cube holds k at s/2 − k
    idx_x = (s // 2 - torch.arange(s // 2 + 1)) % s
    values, weights, targets = [], [], []
    for _, row in posed.iterrows():
        volume = torch.from_numpy(mrcfile.read(root / row["rlnImageName"]).astype(np.float64))
        cube = torch.from_numpy(mrcfile.read(root / row["rlnCtfImage"]).astype(np.float64))
        ctf = cube[idx][:, idx][:, :, idx_x]
        A = euler_to_matrix(*(torch.tensor(float(row[a])) for a in POSE_LABELS)).double()
        origin = torch.tensor([float(row[a]) for a in ORIGIN_LABELS], dtype=torch.float64) / PIXEL
        phase = torch.exp(-2j * math.pi * (k @ origin) / s)
        values.append((ctf * centred_rfft(volume) * phase)[inside])
        weights.append((ctf * ctf)[inside])
        targets.append(2.0 * (k[inside] @ A))  # Aᵀk on the 2× oversampled grid
    value, weight, target = torch.cat(values), torch.cat(weights), torch.cat(targets)
    flip = target[:, 0] < 0
    target = torch.where(flip[:, None], -target, target)
    value = torch.where(flip, value.conj(), value)
    base = torch.floor(target).long()
    frac = target - base
    num = torch.zeros(big * big * h, dtype=torch.complex128)
    den = torch.zeros(big * big * h, dtype=torch.float64)
    for corner in range(8):
        d = torch.tensor([(corner >> 0) & 1, (corner >> 1) & 1, (corner >> 2) & 1])
        w = torch.where(d.bool(), frac, 1 - frac).prod(-1)
        c = base + d
        index = ((c[:, 2] % big) * big + c[:, 1] % big) * h + c[:, 0].clamp(max=h - 1)
        num.index_add_(0, index, w * value)
        den.index_add_(0, index, w * weight)
    ratio = torch.where(den > 1e-3 * den.max(), num / den.clamp_min(1e-30), 0 * num)
    padded = centred_irfft(ratio.reshape(big, big, h), big)
    lo = big // 2 - s // 2
    volume = padded[lo : lo + s, lo : lo + s, lo : lo + s]
    r = (torch.arange(s, dtype=torch.float64) - s // 2) / big
    sinc2 = torch.special.sinc(r) ** 2
    return (volume / (sinc2[:, None, None] * sinc2[None, :, None] * sinc2)).float()


def test_relion_reads_our_pixel_size(tmp_path: Path) -> None:
    paths, _, posed = _simulate(tmp_path, 2, None)
    for name in ("truth.mrc", posed["rlnImageName"].iloc[0]):
        out = subprocess.run(
            ["relion_image_handler", "--i", name, "--stats"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        ).stdout
        assert re.search(r"angpix = 8\b", out), out
    weights = read_star(paths["particles"])["particles"]["rlnCtfImage"].iloc[0]
    out = subprocess.run(
        ["relion_image_handler", "--i", weights, "--stats"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    assert f"(x,y,z,n)= {BOX // 2 + 1} x {BOX} x {2 * BOX} x 1" in out, out


def test_relion_reconstruct_gives_back_our_truth_without_noise(tmp_path: Path) -> None:
    paths, optics, posed = _simulate(tmp_path, 100, None)
    truth = _read(paths["truth"])
    curves = {}
    curves["ours"] = fsc_volumes(_read(_relion_reconstruct(tmp_path, "ok", optics, posed)), truth)
    flipped = posed.copy()
    flipped[ORIGIN_LABELS] = -posed[ORIGIN_LABELS].to_numpy()
    curves["origin"] = fsc_volumes(
        _read(_relion_reconstruct(tmp_path, "origin", optics, flipped)), truth
    )
    transposed = posed.copy()  # (rot, tilt, psi) -> (-psi, tilt, -rot) is Aᵀ
    transposed["rlnAngleRot"] = -posed["rlnAnglePsi"].to_numpy()
    transposed["rlnAnglePsi"] = -posed["rlnAngleRot"].to_numpy()
    curves["transposed"] = fsc_volumes(
        _read(_relion_reconstruct(tmp_path, "transposed", optics, transposed)), truth
    )
    report = {name: resolution_at(c, 0.5, BOX, PIXEL) for name, c in curves.items()}
    print(
        "noise-free FSC 0.5 resolution (Å):",
        report,
        "0.143:",
        resolution_at(curves["ours"], 0.143, BOX, PIXEL),
        "min FSC below Nyquist:",
        round(float(curves["ours"][1 : BOX // 2].min()), 4),
    )
    nyquist = 2 * PIXEL
    assert float(curves["ours"][1 : BOX // 2 - 1].min()) > 0.9, curves["ours"]
    assert report["ours"] <= nyquist * 1.06
    assert report["origin"] > 3 * nyquist and report["transposed"] > 1.5 * nyquist


def test_relion_reconstruct_matches_our_own_reconstruction_with_noise(tmp_path: Path) -> None:
    paths, optics, posed = _simulate(tmp_path, 150, 0.02)
    truth = _read(paths["truth"])
    relion = fsc_volumes(_read(_relion_reconstruct(tmp_path, "noisy", optics, posed)), truth)
    ours = fsc_volumes(_own_reconstruction(paths, posed), truth)
    res = {
        name: (resolution_at(c, 0.5, BOX, PIXEL), resolution_at(c, 0.143, BOX, PIXEL))
        for name, c in (("relion", relion), ("ours", ours))
    }
    print("noisy FSC 0.5 / 0.143 resolution (Å):", res)
    shell = lambda r: BOX * PIXEL / r  # noqa: E731
    assert res["relion"][0] < 4 * 2 * PIXEL  # the data carry signal well past the lowest shells
    assert abs(shell(res["relion"][0]) - shell(res["ours"][0])) <= 1.5


def test_relion_reconstruct_of_our_pseudo_subtomograms(tmp_path: Path) -> None:
    """The pseudo-subtomogram path (D, C) through RELION 3.1: data flagged CTF-premultiplied and
    sqrt(C) given as an FFTW-half 3D CTF, so that RELION's weight CTF² is our C: Σ D / Σ C."""
    truth = make_phantom("asymmetric", BOX, PIXEL)
    config = SimulationConfig(n_particles=100, box=BOX, pixel_size_a=PIXEL, snr=None)
    paths = simulate_project(tmp_path, truth, config)
    blocks = read_star(paths["truth_particles"])
    table = blocks["particles"].copy()
    for i, name in enumerate(table["rlnCtfImage"]):
        weights = mrcfile.read(tmp_path / name).astype(np.float32)
        sqrt_c = np.sqrt(np.clip(weights[:BOX], 0, None))  # (s, s, s/2+1) FFTW half
        out = f"sqrtC_{i}.mrc"
        with mrcfile.new(tmp_path / out) as mrc:
            mrc.set_data(sqrt_c)
        table.loc[i, "rlnCtfImage"] = out
    rec = _read(_relion_reconstruct(tmp_path, "pseudo", blocks["optics"], table))
    curve = fsc_volumes(rec, _read(paths["truth"]))
    print(
        "pseudo-subtomograms via RELION, FSC 0.5 / 0.143 (Å):",
        resolution_at(curve, 0.5, BOX, PIXEL),
        resolution_at(curve, 0.143, BOX, PIXEL),
    )
    assert resolution_at(curve, 0.5, BOX, PIXEL) <= 2 * PIXEL * 1.06
