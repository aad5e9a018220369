"""Simulate a RELION 4 pseudo-subtomogram project with ground truth, from a phantom or a map.

Particles get uniformly random orientations and offsets; each is imaged in a dose-symmetric
tilt series with its own defocus (CTF, dose weighting by the critical exposure, white noise at
the given SNR) and the tilts are combined into pseudo-subtomograms exactly as RELION's
relion_tomo_subtomo does (CTF-premultiplied data, ΣCTF² and multiplicity weights). Writes
particles.star, tomograms.star, optimisation_set.star, Subtomograms/, truth.mrc and the true
poses in truth_particles.star (particles.star carries none).

SNR: noise variance per pixel of a tilt image = mean variance of the noise-free, CTF- and
dose-modulated tilt images (over orientations, tilts and defoci) divided by --snr.

Example:
    denovo3d simulate --o sim_c6 --phantom c6_hexamer --n 1000 --box 64 --pixel_size 5.4 --snr 0.1
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from denovo3d.errors import InputError
from denovo3d.io.atomic import ensure_writable_dir
from denovo3d.io.mrc import read_mrc
from denovo3d.phantoms import PHANTOMS, make_phantom
from denovo3d.simulate import SimulationConfig, simulate_project

__all__ = ["add_args", "main"]


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--o", type=Path, required=True, help="output project directory")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--phantom", choices=sorted(PHANTOMS), help="built-in phantom")
    source.add_argument(
        "--map", type=Path, help="truth map (MRC): a cube of --box voxels, used as it is"
    )
    parser.add_argument("--n", type=int, default=1000, help="number of particles (1000)")
    parser.add_argument("--box", type=int, default=64, help="box size in pixels (64)")
    parser.add_argument(
        "--pixel_size",
        type=float,
        default=None,
        help="pixel size in Å (5.4; default of a --map: its own)",
    )
    parser.add_argument(
        "--snr", type=float, default=0.1, help="per-tilt-image SNR (0.1); 0 or less: no noise"
    )
    parser.add_argument(
        "--tilt_range",
        type=float,
        nargs=2,
        default=(-60.0, 60.0),
        metavar=("MIN", "MAX"),
        help="tilt range in degrees (-60 60)",
    )
    parser.add_argument("--tilt_step", type=float, default=3.0, help="tilt step in degrees (3)")
    parser.add_argument(
        "--dose_per_tilt", type=float, default=3.0, help="exposure per tilt in e/Å² (3)"
    )
    parser.add_argument(
        "--defocus_range",
        type=float,
        nargs=2,
        default=(20000.0, 50000.0),
        metavar=("MIN", "MAX"),
        help="per-particle defocus range in Å (20000 50000)",
    )
    parser.add_argument(
        "--no_depth_defocus",
        action="store_true",
        help="same defocus in every tilt (default: follows the particle's depth)",
    )
    parser.add_argument("--voltage", type=float, default=300.0, help="kV (300)")
    parser.add_argument("--cs", type=float, default=2.7, help="spherical aberration, mm (2.7)")
    parser.add_argument("--amplitude_contrast", type=float, default=0.07, help="(0.07)")
    parser.add_argument(
        "--max_offset", type=float, default=None, help="offset radius in Å (3 pixels)"
    )
    parser.add_argument("--tomograms", type=int, default=5, help="number of tomograms (5)")
    parser.add_argument(
        "--classic",
        action="store_true",
        help="also write classic subtomograms with a 3D CTF (particles_classic.star)",
    )
    parser.add_argument("--float16", action="store_true", help="write volumes as float16")
    parser.add_argument("--seed", type=int, default=0, help="random seed (0)")
    parser.add_argument("--j", type=int, default=0, help="torch threads (0: torch's default)")


def _truth(args: argparse.Namespace) -> tuple[torch.Tensor, float, str]:
    if args.map is not None:
        volume, voxel = read_mrc(args.map)
        pixel = args.pixel_size or voxel
        if len(set(volume.shape)) != 1 or volume.shape[0] != args.box:
            raise InputError(
                args.map, f"map of shape {volume.shape}, expected a cube of --box {args.box}"
            )
        if voxel > 0 and abs(voxel - pixel) > 1e-3 * pixel:
            raise InputError(
                args.map, f"map voxel size {voxel:g} Å differs from --pixel_size {pixel:g} Å"
            )
        return torch.from_numpy(volume.copy()), pixel, str(args.map)
    pixel = args.pixel_size or 5.4
    try:
        return make_phantom(args.phantom, args.box, pixel), pixel, args.phantom
    except ValueError as exc:
        raise InputError(None, f"--phantom {args.phantom}: {exc}") from None


def main(args: argparse.Namespace) -> int:
    if args.n < 1:
        raise InputError(None, f"--n must be at least 1, got {args.n}")
    if args.box < 8 or args.box % 2:
        raise InputError(None, f"--box must be even and at least 8, got {args.box}")
    if args.pixel_size is not None and args.pixel_size <= 0:
        raise InputError(None, f"--pixel_size must be positive, got {args.pixel_size}")
    if args.j > 0:
        torch.set_num_threads(args.j)
    truth, pixel, source = _truth(args)  # check the input before creating anything
    ensure_writable_dir(args.o)
    try:
        config = SimulationConfig(
            n_particles=args.n,
            box=args.box,
            pixel_size_a=pixel,
            snr=args.snr if args.snr > 0 else None,
            tilt_min_deg=args.tilt_range[0],
            tilt_max_deg=args.tilt_range[1],
            tilt_step_deg=args.tilt_step,
            dose_per_tilt=args.dose_per_tilt,
            defocus_range_a=tuple(args.defocus_range),
            defocus_from_depth=not args.no_depth_defocus,
            voltage_kv=args.voltage,
            cs_mm=args.cs,
            amplitude_contrast=args.amplitude_contrast,
            max_offset_a=args.max_offset,
            n_tomograms=max(1, args.tomograms),
            classic=args.classic,
            float16=args.float16,
            seed=args.seed,
        )
        config.tilt_scheme  # noqa: B018 - validates the tilt range
        start = time.perf_counter()
        paths = simulate_project(args.o, truth, config, source=source)
    except ValueError as exc:
        raise InputError(None, str(exc)) from None
    elapsed = time.perf_counter() - start
    print(
        f"simulated {args.n} particles of {source} (box {args.box}, {pixel:g} Å/px, "
        f"{config.tilt_scheme.n_tilts} tilts) in {elapsed:.1f} s"
    )
    for name, path in paths.items():
        print(f"  {name:17s} {path}")
    return 0
