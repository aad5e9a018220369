"""Bias of the symmetry score: refine from the true orientation and centre, report the drift.

A score whose optimum is the truth leaves the refinement where it started; the drift (degrees,
modulo the group's normaliser) measures how far each degradation of the benchmark phantoms moves
the optimum: ``clean``, ``wedge`` (missing-wedge-like attenuation only), ``blur``, ``noise``
(white noise only) and ``all`` (the benchmark's maps). ``--fixed_shift`` keeps the true centre
(only the rotation refined), which separates the rotation from the centre.

    .venv/bin/python benchmarks/bench_symmetry_drift.py --cases C2:14,C6:14,O:14 --threads 1
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.symmetry_phantoms import PARTICLE_DIAMETER_PX, degrade, recovery_clean

from denovo3d.geometry.symmetry import point_group
from denovo3d.symmetry_align import AlignParams, prepare_bands, refine, shell_model
from denovo3d.symmetry_search import keep_shells, orientation_error_deg

VARIANTS = {
    "clean": {"noise_sd_rel": 0.0, "wedge_keep": 1.0, "blur_px": 0.0},
    "wedge": {"noise_sd_rel": 0.0, "blur_px": 0.0},
    "blur": {"noise_sd_rel": 0.0, "wedge_keep": 1.0},
    "noise": {"wedge_keep": 1.0, "blur_px": 0.0},
    "all": {},
}


def drift_deg(
    group: str, trial: int, variant: str, fixed_shift: bool, diameter_px: float | None = None
) -> tuple[float, float]:
    """Drift (degrees) of the final fine-band refinement started at the truth, and the distance
    (px) of its centre from the true one; scored within ``diameter_px`` (None: the box)."""
    g = point_group(group)
    clean, truth, shift = recovery_clean(group, trial)
    volume = degrade(clean, seed=trial, **VARIANTS[variant]).float()
    bands = prepare_bands(volume, AlignParams(seed=trial, mask_diameter_px=diameter_px))
    start = truth.T.to(torch.float64)
    true_shift = shift - bands.centre_px.double()
    model = shell_model(bands.fine, g, start[None], true_shift[None])
    band = keep_shells(bands.fine, model[0])
    params = AlignParams()
    rotation, found_shift, _ = refine(
        band, g, start, params.refine_iterations, model, true_shift, refine_shift=not fixed_shift
    )
    err = float(orientation_error_deg(rotation, truth, g))
    return err, float((found_shift - true_shift).norm())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="C2:14,C6:14,O:14", help="group:trial,...")
    parser.add_argument("--variants", default="clean,wedge,blur,noise,all")
    parser.add_argument("--fixed_shift", action="store_true", help="keep the true centre")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--particle_diameter_px", type=float, default=PARTICLE_DIAMETER_PX, help="0: whole box"
    )
    args = parser.parse_args()
    diameter = args.particle_diameter_px if args.particle_diameter_px > 0 else None
    torch.set_num_threads(args.threads)
    for case in args.cases.split(","):
        group, trial = case.split(":")
        parts, cpu = [], time.process_time()
        for variant in args.variants.split(","):
            err, shift_err = drift_deg(group, int(trial), variant, args.fixed_shift, diameter)
            parts.append(f"{variant} {err:.3f} deg ({shift_err:.2f} px)")
        cpu = time.process_time() - cpu
        print(f"{case}: " + ", ".join(parts) + f"; {cpu:.1f} s CPU", flush=True)


if __name__ == "__main__":
    main()
