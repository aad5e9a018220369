"""Check a particle set and print a summary a user can verify at a glance.

Reads a RELION 4/5 particles.star (or the optimisation_set.star that names it), checks every
table, label and file header, reads a sample of the volumes (all with --sample 0) to check
their contents, and prints: particle count, tomograms, optics groups, box and pixel size,
format, mean multiplicity and CTF² coverage, particles per tomogram, and any problems.

Example:
    denovo3d inspect PseudoSubtomo/job007/optimisation_set.star
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from denovo3d.fourier import rfft_radius
from denovo3d.particles import MULTIPLICITY_THRESHOLD, ParticleSet, load_particle_set

__all__ = ["add_args", "main", "summarise"]

_FORMATS = {
    "pseudo": "RELION-4 pseudo-subtomograms (CTF-premultiplied data + ΣCTF²/multiplicity weights)",
    "classic": "classic 3D subtomograms (not premultiplied; 3D CTF volume per particle)",
}


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("star", type=Path, help="particles.star or optimisation_set.star")
    parser.add_argument(
        "--project_dir",
        type=Path,
        default=None,
        help="directory the STAR paths are relative to (default: as RELION, the "
        "current directory; else the STAR file's directory or a parent)",
    )
    parser.add_argument(
        "--sample",
        type=int,
        default=200,
        help="number of particles whose volumes are read (0: all; default 200)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for choosing the sample")


def summarise(particles: ParticleSet, sample: int = 200, seed: int = 0) -> dict:
    """Statistics of a particle set (reads ``sample`` particles' volumes; 0 reads all)."""
    n = particles.n
    rng = np.random.default_rng(seed)
    rows = np.arange(n) if sample <= 0 or sample >= n else np.sort(rng.choice(n, sample, False))
    radius = rfft_radius(particles.box)
    inside = radius < particles.box // 2
    weight = torch.full_like(radius, 2.0)
    weight[..., 0] = 1.0  # the kx = 0 plane is not doubled in the half grid
    weight = weight * inside
    coverage, mult_mean, ctf2_mean, empty = [], [], [], []
    for start in range(0, len(rows), 32):
        batch = particles.load(rows[start : start + 32])
        covered = (batch.multiplicity >= MULTIPLICITY_THRESHOLD).float() * weight
        n_cov = covered.sum(dim=(-3, -2, -1))
        coverage.append(n_cov / weight.sum())
        denom = n_cov.clamp(min=1)
        mult_mean.append((batch.multiplicity * covered).sum(dim=(-3, -2, -1)) / denom)
        ctf2_mean.append((batch.ctf2 * covered).sum(dim=(-3, -2, -1)) / denom)
        empty.append(batch.data.abs().amax(dim=(-3, -2, -1)) == 0)
    table = particles.table
    tomo = table["rlnTomoName"] if "rlnTomoName" in table.columns else None
    problems = []
    if "rlnRandomSubset" not in table.columns:
        problems.append("no rlnRandomSubset: half-sets alternate by row, as RELION does")
    if {"rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"} & set(table.columns):
        problems.append("particles carry rlnAngle* poses: a de novo run ignores them")
    dup = table["rlnImageName"].duplicated()
    if dup.any():
        problems.append(
            f"{int(dup.sum())} rows repeat an rlnImageName (first: row "
            f"{int(np.flatnonzero(dup.to_numpy())[0]) + 1})"
        )
    empty_rows = rows[torch.cat(empty).numpy()]
    if empty_rows.size:
        problems.append(
            f"{empty_rows.size} sampled particle(s) hold no data at all "
            f"(first: row {int(empty_rows[0]) + 1})"
        )
    return {
        "n": n,
        "sampled": len(rows),
        "tomograms": {} if tomo is None else tomo.value_counts(sort=False).to_dict(),
        "optics": particles.optics,
        "box": particles.box,
        "pixel_size_a": particles.pixel_size_a,
        "kind": particles.kind,
        "coverage": float(torch.cat(coverage).mean()),
        "multiplicity": float(torch.cat(mult_mean).mean()),
        "ctf2": float(torch.cat(ctf2_mean).mean()),
        "problems": problems,
    }


def _optics_line(row: dict) -> str:
    name = row.get("rlnOpticsGroupName", f"group {row.get('rlnOpticsGroup')}")
    parts = [str(name)]
    for label, unit in (
        ("rlnVoltage", "kV"),
        ("rlnSphericalAberration", "mm Cs"),
        ("rlnAmplitudeContrast", "amplitude contrast"),
    ):
        if label in row:
            parts.append(f"{float(row[label]):g} {unit}")
    return ", ".join(parts)


def main(args: argparse.Namespace) -> int:
    particles = load_particle_set(args.star, args.project_dir)
    s = summarise(particles, args.sample, args.seed)
    box, apix = s["box"], s["pixel_size_a"]
    source = f"{particles.path}" + (f" (via {args.star})" if particles.path != args.star else "")
    print(f"Particle set      {source}")
    print(f"Project directory {particles.tables.project_dir.resolve()}")
    print(f"Format            {_FORMATS[s['kind']]}")
    print(f"Particles         {s['n']} in {len(s['tomograms']) or 'unnamed'} tomogram(s)")
    print(f"Optics groups     {len(s['optics'])}")
    for row in s["optics"].to_dict("records"):
        print(f"                  {_optics_line(row)}")
    print(
        f"Box / pixel       {box} px at {apix:.3f} Å = {box * apix:.1f} Å; Nyquist {2 * apix:.1f} Å"
    )
    print(
        f"Weights           sampled {s['sampled']} of {s['n']} particles: "
        f"{100 * s['coverage']:.1f} % of Fourier voxels inside Nyquist carry data "
        f"(CTF² coverage); mean multiplicity {s['multiplicity']:.2f} and mean ΣCTF² "
        f"{s['ctf2']:.3g} where they do"
    )
    if s["tomograms"]:
        print("Per tomogram      " + ", ".join(f"{k}: {v}" for k, v in s["tomograms"].items()))
    print("Problems          " + ("none" if not s["problems"] else s["problems"][0]))
    for line in s["problems"][1:]:
        print(f"                  {line}")
    return 0
