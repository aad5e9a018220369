"""Hand-made RELION particle sets, written straight from RELION's documented layout.

Independent of our simulator and our writers (plain ``starfile``/``mrcfile``/numpy), so that
reading them tests our reader against the format, not against ourselves.
"""

from __future__ import annotations

from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import starfile


def write_volume(path: Path, data: np.ndarray, voxel_size: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(data)
        mrc.voxel_size = voxel_size


def make_pseudo_subtomo_project(
    root: Path,
    n: int = 6,
    box: int = 16,
    pixel_size: float = 5.4,
    float16: bool = False,
    tomograms: tuple[str, ...] = ("TS_01", "TS_03"),
    seed: int = 0,
) -> dict:
    """A RELION-4 ``relion_tomo_subtomo``-style project under ``root``.

    Returns the particles.star path, the optimisation set path and, per particle, the
    data volume and the weights ΣCTF² / multiplicity in (z, y, x) half layout.
    """
    rng = np.random.default_rng(seed)
    job = Path("PseudoSubtomo/job007")
    rows, truth = [], []
    dtype = np.float16 if float16 else np.float32
    for i in range(n):
        tomo = tomograms[i % len(tomograms)]
        name = f"{tomo}/{i + 1}"
        data = rng.normal(size=(box,) * 3).astype(dtype)
        # weights: z [0, s) ΣCTF², [s, 2s) multiplicity; FFTW half layout (s/2+1 along x)
        ctf2 = rng.uniform(0.0, 3.0, size=(box, box, box // 2 + 1))
        mult = rng.uniform(0.0, 20.0, size=(box, box, box // 2 + 1))
        mult[:, :, 3:5] = 0.0  # a patch without data, like a missing wedge
        weights = np.concatenate([ctf2, mult]).astype(dtype)
        stem = job / "Subtomograms" / name
        write_volume(root / f"{stem}_data.mrc", data, pixel_size)
        write_volume(root / f"{stem}_weights.mrc", weights, 1.0 / pixel_size)
        rows.append(
            {
                "rlnTomoName": tomo,
                "rlnTomoParticleName": name,
                "rlnRandomSubset": i % 2 + 1,
                "rlnOpticsGroup": 1,
                "rlnCoordinateX": 100.0 + i,
                "rlnCoordinateY": 200.0,
                "rlnCoordinateZ": 300.0,
                "rlnOriginXAngst": 0.0,
                "rlnOriginYAngst": 0.0,
                "rlnOriginZAngst": 0.0,
                "rlnImageName": f"{stem}_data.mrc",
                "rlnCtfImage": f"{stem}_weights.mrc",
            }
        )
        truth.append((data.astype(np.float32), ctf2.astype(np.float32), mult.astype(np.float32)))
    optics = pd.DataFrame(
        [
            {
                "rlnOpticsGroup": 1,
                "rlnOpticsGroupName": "opticsGroup1",
                "rlnSphericalAberration": 2.7,
                "rlnVoltage": 300.0,
                "rlnTomoTiltSeriesPixelSize": pixel_size / 4,
                "rlnCtfDataAreCtfPremultiplied": 1,
                "rlnImageDimensionality": 3,
                "rlnTomoSubtomogramBinning": 4.0,
                "rlnImagePixelSize": pixel_size,
                "rlnImageSize": box,
                "rlnAmplitudeContrast": 0.07,
            }
        ]
    )
    particles_path = root / job / "particles.star"
    starfile.write({"optics": optics, "particles": pd.DataFrame(rows)}, particles_path)
    opt_path = root / job / "optimisation_set.star"
    starfile.write(
        {
            "": {
                "rlnTomoParticlesFile": str(job / "particles.star"),
                "rlnTomoTomogramsFile": "ImportTomo/job001/tomograms.star",
            }
        },
        opt_path,
    )
    return {"particles": particles_path, "optimisation_set": opt_path, "volumes": truth, "job": job}


def make_classic_subtomo_project(
    root: Path,
    n: int = 3,
    box: int = 16,
    pixel_size: float = 5.4,
    ctf_layout: str = "cube",
    seed: int = 1,
) -> dict:
    """RELION-3.1-style classic subtomograms: real-space volumes plus a 3D CTF per particle.

    ``ctf_layout`` "cube": the full centred (``s³``) CTF RELION's ``--reconstruct_ctf`` writes;
    "half": an FFTW half volume ``(s, s, s/2+1)``; "none": no rlnCtfImage column.
    """
    rng = np.random.default_rng(seed)
    rows, volumes = [], []
    for i in range(n):
        stem = Path("Subtomograms") / f"TS_01_{i + 1:03d}"
        data = rng.normal(size=(box,) * 3).astype(np.float32)
        write_volume(root / f"{stem}.mrc", data, pixel_size)
        row = {"rlnImageName": f"{stem}.mrc", "rlnMicrographName": "TS_01", "rlnOpticsGroup": 1}
        ctf = None
        if ctf_layout != "none":
            ctf = rng.uniform(
                -1, 1, size=(box, box, box) if ctf_layout == "cube" else (box, box, box // 2 + 1)
            ).astype(np.float32)
            write_volume(root / f"{stem}_ctf.mrc", ctf, pixel_size)
            row["rlnCtfImage"] = f"{stem}_ctf.mrc"
        rows.append(row)
        volumes.append((data, ctf))
    optics = pd.DataFrame(
        [
            {
                "rlnOpticsGroup": 1,
                "rlnImagePixelSize": pixel_size,
                "rlnImageSize": box,
                "rlnImageDimensionality": 3,
                "rlnVoltage": 300.0,
                "rlnSphericalAberration": 2.7,
                "rlnAmplitudeContrast": 0.07,
            }
        ]
    )
    path = root / "particles_classic.star"
    starfile.write({"optics": optics, "particles": pd.DataFrame(rows)}, path)
    return {"particles": path, "volumes": volumes}
