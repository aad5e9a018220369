"""Time the simulator: 1,000 pseudo-subtomograms of box 64 (target: under 5 minutes on 2 cores).

Prints the wall time of the whole ``simulate_project`` (phantom, simulation, writing every
file) and of its parts, and the peak resident memory of the process.

Usage:
    .venv/bin/python benchmarks/bench_simulate.py [--n 1000] [--box 64] [--out DIR] [--classic]
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import torch

from denovo3d.phantoms import make_phantom
from denovo3d.simulate import SimulationConfig, simulate_project


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--box", type=int, default=64)
    parser.add_argument("--pixel_size", type=float, default=5.4)
    parser.add_argument("--snr", type=float, default=0.1)
    parser.add_argument("--classic", action="store_true")
    parser.add_argument("--out", type=Path, default=None, help="default: a temporary directory")
    args = parser.parse_args()
    config = SimulationConfig(
        n_particles=args.n,
        box=args.box,
        pixel_size_a=args.pixel_size,
        snr=args.snr,
        classic=args.classic,
    )
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp) / "sim"
        start = time.perf_counter()
        truth = make_phantom("c6_hexamer", args.box, args.pixel_size)
        phantom_s = time.perf_counter() - start
        simulate_project(out, truth, config, source="c6_hexamer")
        total_s = time.perf_counter() - start
        size_mb = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / 2**20
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"simulate: {args.n} particles, box {args.box}, {config.tilt_scheme.n_tilts} tilts, "
        f"classic={args.classic}, torch threads {torch.get_num_threads()}"
    )
    print(f"  phantom      {phantom_s:8.1f} s")
    print(f"  total        {total_s:8.1f} s  ({1e3 * total_s / args.n:.0f} ms per particle)")
    print(f"  written      {size_mb:8.0f} MiB")
    print(f"  peak RSS     {peak_mb:8.0f} MiB")


if __name__ == "__main__":
    main()
