"""The whole de novo job, ours against RELION's relion_refine, on the same data and settings.

Simulates a pseudo-subtomogram project (c6_hexamer, tutorial-like tilt series), runs RELION 5's
tomography "3D initial model" command line (the GUI's flags) with ``relion_refine`` and the same
line with ``denovo3d refine``, both as child processes in the project directory with the same
threads, and reports each job's CPU seconds (user + system, from the kernel's accounting of the
child) and wall seconds, and the FSC 0.5 of its last class map to the truth after superposition
(hand checked), beside the reconstruction with the true poses.

    PATH=/path/to/relion/bin:$PATH .venv/bin/python benchmarks/bench_vs_relion.py \\
        --n 300 --box 24 --pixel_size 12 --iter 8 --subset 50 --j 1

RELION's gradient job takes minutes of CPU per mini-batch even at box 24 on a plain CPU build,
so the standard dataset (1,000 particles, box 64, 100 mini-batches) is out of reach on a small
machine; keep --iter and --subset small there.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from denovo3d.engine.superpose import superpose
from denovo3d.fsc import fsc_volumes, resolution_at
from denovo3d.io.mrc import read_mrc


def gui_flags(iterations: int, subset: int, threads: int, seed: int) -> list[str]:
    """RELION 5.0.1's GUI command for the job (pipeline_jobs.cpp), C1, fixed mini-batch."""
    return [
        "--ios", "optimisation_set.star", "--iter", str(iterations), "--grad", "--denovo_3dref",
        "--ctf", "--K", "1", "--sym", "C1", "--flatten_solvent", "--zero_mask",
        "--dont_combine_weights_via_disc", "--pool", "30", "--pad", "1", "--skip_gridding",
        "--particle_diameter", "230", "--oversampling", "1", "--healpix_order", "1",
        "--offset_range", "6", "--offset_step", "2", "--auto_sampling", "--tau2_fudge", "4",
        "--j", str(threads), "--grad_ini_subset", str(subset), "--grad_fin_subset", str(subset),
        "--random_seed", str(seed),
    ]  # fmt: skip


def timed(command: list[str], cwd: Path, log: Path) -> tuple[float, float]:
    """Run ``command``; its (CPU seconds of the child, wall seconds)."""
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(command, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"{command[0]} failed; see {log}")
    return usage.ru_utime + usage.ru_stime, wall


def fsc05(path: Path, truth: torch.Tensor, pixel_size_a: float) -> float:
    volume = torch.from_numpy(read_mrc(path)[0].copy()).float()
    aligned, _ = superpose(volume, truth)
    return resolution_at(fsc_volumes(aligned, truth), 0.5, truth.shape[-1], pixel_size_a)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--box", type=int, default=24)
    parser.add_argument("--pixel_size", type=float, default=12.0)
    parser.add_argument("--snr", type=float, default=0.1)
    parser.add_argument("--iter", type=int, default=8)
    parser.add_argument("--subset", type=int, default=50)
    parser.add_argument("--j", type=int, default=1)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    relion = shutil.which("relion_refine")
    if relion is None:
        sys.exit("relion_refine is not on PATH")
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        sim = out / "sim"
        denovo3d = [sys.executable, "-m", "denovo3d"]
        if not (sim / "optimisation_set.star").is_file():
            simulate = ["simulate", "--o", str(sim), "--phantom", "c6_hexamer", "--n", str(args.n)]
            simulate += ["--box", str(args.box), "--pixel_size", str(args.pixel_size)]
            simulate += ["--snr", str(args.snr), "--seed", str(args.seed)]
            subprocess.run([*denovo3d, *simulate], check=True)
        truth = torch.from_numpy(read_mrc(sim / "truth.mrc")[0].copy()).float()
        flags = gui_flags(args.iter, args.subset, args.j, args.seed)
        rows = []
        for name, program in (("RELION", [relion]), ("denovo3d", [*denovo3d, "refine"])):
            job = out / name
            job.mkdir(parents=True, exist_ok=True)
            extra = ["--quiet"] if name == "denovo3d" else []
            cpu, wall = timed(
                [*program, "--o", str(job / "run"), *flags, *extra], sim, job / "out.log"
            )
            res = fsc05(job / f"run_it{args.iter:03d}_class001.mrc", truth, args.pixel_size)
            rows.append((name, cpu, wall, res))
        print(
            f"{args.n} particles, box {args.box}, {args.pixel_size:g} Å/px, {args.iter} "
            f"mini-batches of {args.subset}, --j {args.j}"
        )
        for name, cpu, wall, res in rows:
            print(f"  {name:9s} {cpu:8.1f} CPU s  {wall:8.1f} s wall  FSC 0.5 {res:.1f} Å")
        print(f"  CPU time ratio RELION / denovo3d: {rows[0][1] / rows[1][1]:.0f}x")


if __name__ == "__main__":
    main()
