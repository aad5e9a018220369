"""Write a simulated data set as a RELION 4 tomography project (see :mod:`denovo3d.simulate`).

Layout under the project directory (all STAR paths relative to it, as RELION resolves them from
the directory a job runs in)::

    particles.star            data_optics + data_particles, pseudo-subtomograms, no poses
    optimisation_set.star     rlnTomoParticlesFile particles.star, rlnTomoTomogramsFile ...
    tomograms.star            data_global + one block per tomogram (projections, CTF, dose)
    Subtomograms/<tomo>/<n>_data.mrc      real space, premultiplied D, centre at s/2
    Subtomograms/<tomo>/<n>_weights.mrc   (z, y, x) = (2s, s, s/2+1): C then M, FFTW order
    truth.mrc, truth_particles.star       the map and the true poses (rlnAngle*, rlnOrigin*Angst)
    simulation.json                       the configuration and the noise σ
and with classic subtomograms: particles_classic.star, <n>_subtomo.mrc and <n>_ctf.mrc (the 3D
CTF as a full centred cube, frequency k at index s/2 − k, as RELION 3.1 reads it).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import torch

from denovo3d.fourier import centred_irfft
from denovo3d.io.atomic import atomic_path, ensure_writable_dir
from denovo3d.io.mrc import write_mrc
from denovo3d.io.star import write_star

__all__ = ["ProjectWriter", "centred_cube_from_half", "write_volume"]


def write_volume(path: Path, data: np.ndarray, voxel_size_a: float, float16: bool) -> None:
    """Write an MRC volume atomically, float32 (mode 2) or float16 (mode 12)."""
    if not float16:
        write_mrc(path, data, voxel_size_a)
        return
    with atomic_path(path) as tmp, mrcfile.new(tmp, overwrite=True) as mrc:
        mrc.set_data(np.ascontiguousarray(data, dtype=np.float16))
        mrc.voxel_size = float(voxel_size_a)
        mrc.update_header_stats()


def centred_cube_from_half(half: torch.Tensor) -> torch.Tensor:
    """Real, Friedel-symmetric half grid ``(s, s, s//2+1)`` -> centred cube ``(s, s, s)``.

    Cube index ``j`` holds frequency ``s/2 − j`` on every axis (RELION 3.1 reads the 3D CTF
    cube at ``-k``); negative kx are read from the mate ``-k``.
    """
    s = half.shape[-2]
    k = (s // 2 - torch.arange(s)) % s  # frequency index (fftfreq order) of each cube index
    kx = s // 2 - torch.arange(s)  # signed kx in (−s/2, s/2]
    zz, yy, xx = torch.meshgrid(k, k, kx, indexing="ij")
    neg = xx < 0
    z_idx = torch.where(neg, (-zz) % s, zz)
    y_idx = torch.where(neg, (-yy) % s, yy)
    return half[z_idx, y_idx, xx.abs()]


class ProjectWriter:
    """Writes volumes chunk by chunk, then the STAR files."""

    def __init__(self, out_dir: Path, config, scheme, draws, source: str = "") -> None:
        self.root = ensure_writable_dir(out_dir)
        self.config = config
        self.scheme = scheme
        self.draws = draws
        self.source = source
        n_tomo = max(1, min(config.n_tomograms, config.n_particles))
        self.tomo_names = [f"TS_{t + 1:02d}" for t in range(n_tomo)]
        counters = [0] * n_tomo
        self.stems: list[str] = []
        for t in draws.tomogram.tolist():
            counters[t] += 1
            self.stems.append(f"{self.tomo_names[t]}/{counters[t]}")
        for name in self.tomo_names:
            (self.root / "Subtomograms" / name).mkdir(parents=True, exist_ok=True)
        self.noise_sigma = 0.0

    def write_truth(self, truth: torch.Tensor, noise_sigma: float) -> None:
        write_mrc(self.root / "truth.mrc", truth.numpy(), self.config.pixel_size_a)
        self.noise_sigma = noise_sigma

    def write_chunk(self, chunk) -> None:
        cfg = self.config
        px = cfg.pixel_size_a
        data = centred_irfft(chunk.data, cfg.box).numpy()
        mult = chunk.multiplicity.numpy()
        for j, row in enumerate(chunk.indices.tolist()):
            stem = self.root / "Subtomograms" / self.stems[row]
            write_volume(Path(f"{stem}_data.mrc"), data[j], px, cfg.float16)
            weights = np.concatenate([chunk.ctf2[j].numpy(), mult])
            write_volume(Path(f"{stem}_weights.mrc"), weights, 1.0 / px, cfg.float16)
        if chunk.classic_data is not None:
            classic = centred_irfft(chunk.classic_data, cfg.box).numpy()
            for j, row in enumerate(chunk.indices.tolist()):
                stem = self.root / "Subtomograms" / self.stems[row]
                write_volume(Path(f"{stem}_subtomo.mrc"), classic[j], px, cfg.float16)
                cube = centred_cube_from_half(chunk.classic_ctf[j]).numpy()
                write_volume(Path(f"{stem}_ctf.mrc"), cube, px, cfg.float16)

    # ---- STAR files --------------------------------------------------------------------------
    def _optics(self, premultiplied: bool) -> pd.DataFrame:
        cfg = self.config
        return pd.DataFrame(
            [
                {
                    "rlnOpticsGroup": 1,
                    "rlnOpticsGroupName": "opticsGroup1",
                    "rlnSphericalAberration": cfg.cs_mm,
                    "rlnVoltage": cfg.voltage_kv,
                    "rlnAmplitudeContrast": cfg.amplitude_contrast,
                    "rlnTomoTiltSeriesPixelSize": cfg.pixel_size_a / cfg.binning,
                    "rlnCtfDataAreCtfPremultiplied": int(premultiplied),
                    "rlnImageDimensionality": 3,
                    "rlnTomoSubtomogramBinning": cfg.binning,
                    "rlnImagePixelSize": cfg.pixel_size_a,
                    "rlnImageSize": cfg.box,
                }
            ]
        )

    def _particles(self, suffix_data: str, suffix_ctf: str) -> pd.DataFrame:
        d = self.draws
        coords = d.coordinates_px.numpy()
        n = coords.shape[0]
        return pd.DataFrame(
            {
                "rlnTomoName": [self.tomo_names[t] for t in d.tomogram.tolist()],
                "rlnTomoParticleName": self.stems,
                "rlnRandomSubset": np.arange(n) % 2 + 1,
                "rlnOpticsGroup": np.ones(n, dtype=int),
                "rlnCoordinateX": coords[:, 0],
                "rlnCoordinateY": coords[:, 1],
                "rlnCoordinateZ": coords[:, 2],
                "rlnOriginXAngst": np.zeros(n),
                "rlnOriginYAngst": np.zeros(n),
                "rlnOriginZAngst": np.zeros(n),
                "rlnImageName": [f"Subtomograms/{s}{suffix_data}" for s in self.stems],
                "rlnCtfImage": [f"Subtomograms/{s}{suffix_ctf}" for s in self.stems],
            }
        )

    def _tomograms(self) -> dict[str, pd.DataFrame]:
        cfg, d, scheme = self.config, self.draws, self.scheme
        ts_pixel = cfg.pixel_size_a / cfg.binning
        size_px = [round(v / ts_pixel) for v in cfg.tomogram_size_a]
        blocks: dict[str, pd.DataFrame] = {}
        blocks["global"] = pd.DataFrame(
            {
                "rlnTomoName": self.tomo_names,
                "rlnTomoTiltSeriesName": [f"tilt_series/{t}.mrc:mrc" for t in self.tomo_names],
                "rlnTomoFrameCount": scheme.n_tilts,
                "rlnTomoSizeX": size_px[0],
                "rlnTomoSizeY": size_px[1],
                "rlnTomoSizeZ": size_px[2],
                "rlnTomoHand": 1.0,
                "rlnOpticsGroupName": "opticsGroup1",
                "rlnTomoTiltSeriesPixelSize": ts_pixel,
                "rlnVoltage": cfg.voltage_kv,
                "rlnSphericalAberration": cfg.cs_mm,
                "rlnAmplitudeContrast": cfg.amplitude_contrast,
                "rlnTomoImportFractionalDose": cfg.dose_per_tilt,
            }
        )
        from denovo3d.tilt_series import tilt_rotations

        rotations = tilt_rotations(scheme.tilt_angles_deg).numpy()
        centre = np.array(size_px, dtype=float) / 2
        for t, name in enumerate(self.tomo_names):
            mine = d.tomogram == t
            defocus = float(d.defocus_a[mine].mean()) if bool(mine.any()) else 0.0
            rows = {f"rlnTomoProj{a}": [] for a in "XYZW"}
            for R in rotations:
                shift = centre[:2] - R[:2] @ centre
                matrix = np.vstack([np.c_[R, [shift[0], shift[1], 0.0]], [0, 0, 0, 1.0]])
                for a, line in zip("XYZW", matrix, strict=True):
                    rows[f"rlnTomoProj{a}"].append("[" + ",".join(f"{v:.6g}" for v in line) + "]")
            table = pd.DataFrame(rows)
            table["rlnDefocusU"] = defocus
            table["rlnDefocusV"] = defocus
            table["rlnDefocusAngle"] = 0.0
            table["rlnCtfScalefactor"] = 1.0
            table["rlnMicrographPreExposure"] = scheme.pre_exposure_e_per_a2.numpy()
            blocks[name] = table
        return blocks

    def finish(self) -> dict[str, Path]:
        cfg, d = self.config, self.draws
        root = self.root
        paths = {
            "particles": root / "particles.star",
            "tomograms": root / "tomograms.star",
            "optimisation_set": root / "optimisation_set.star",
            "truth": root / "truth.mrc",
            "truth_particles": root / "truth_particles.star",
        }
        particles = self._particles("_data.mrc", "_weights.mrc")
        write_star(paths["particles"], {"optics": self._optics(True), "particles": particles})
        write_star(paths["tomograms"], self._tomograms())
        write_star(
            paths["optimisation_set"],
            {
                "": {
                    "rlnTomoParticlesFile": "particles.star",
                    "rlnTomoTomogramsFile": "tomograms.star",
                }
            },
        )
        truth = particles.copy()
        angles, origins = d.angles_deg.numpy(), d.origins_a.numpy()
        for i, label in enumerate(["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]):
            truth[label] = angles[:, i]
        for i, axis in enumerate("XYZ"):
            truth[f"rlnOrigin{axis}Angst"] = origins[:, i]
        truth["rlnDefocusU"] = truth["rlnDefocusV"] = d.defocus_a.numpy()
        write_star(paths["truth_particles"], {"optics": self._optics(True), "particles": truth})
        if cfg.classic:
            paths["particles_classic"] = root / "particles_classic.star"
            classic = self._particles("_subtomo.mrc", "_ctf.mrc")
            classic["rlnMicrographName"] = classic["rlnTomoName"]
            write_star(
                paths["particles_classic"], {"optics": self._optics(False), "particles": classic}
            )
        info = dataclasses.asdict(cfg) | {"noise_sigma_per_pixel": self.noise_sigma}
        info["source"] = self.source
        with atomic_path(root / "simulation.json") as tmp:
            tmp.write_text(json.dumps(info, indent=2) + "\n")
        paths["simulation"] = root / "simulation.json"
        return paths
