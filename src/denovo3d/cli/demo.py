"""Run the whole product on the built-in example: simulate, inspect, de novo job, report.

A C6 ring of asymmetric subunits (like the HIV capsid hexamer of RELION's tomography tutorial)
is imaged as tilt series (-60..60° every 3°, 300 kV, defocus 2-5 µm, dose weighting, noise) and
written as RELION-4 pseudo-subtomograms; the de novo job runs on them in C1, aligns the map to
the C6 axes and symmetrises it (initial_model.mrc); the report page is written last and the map
is compared with the truth (FSC 0.5 after superposition, against a true-pose reconstruction).

Each step is the sub-command a user would run, printed before it runs. Running the demo again
reuses data simulated with the same settings and continues an unfinished job.

Example:
    denovo3d demo --o example --n 300 --iter 30 --j 2
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
from pathlib import Path

__all__ = ["add_args", "main"]


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--o", type=Path, default=Path("example"), help="folder (example)")
    parser.add_argument("--n", type=int, default=300, help="particles to simulate (300)")
    parser.add_argument("--box", type=int, default=32, help="box size in pixels (32)")
    parser.add_argument("--pixel_size", type=float, default=10.0, help="Å per pixel (10)")
    parser.add_argument("--snr", type=float, default=0.1, help="per-tilt-image SNR (0.1)")
    parser.add_argument("--iter", type=int, default=30, help="VDAM mini-batches (30)")
    parser.add_argument("--sym", default="C6", help="point group of the final map (C6)")
    parser.add_argument("--j", type=int, default=2, help="CPU threads (2)")
    parser.add_argument("--seed", type=int, default=1, help="seed of data and job (1)")


def _run(argv: list[str]) -> None:
    """Run one sub-command as a user would, echoing its command line."""
    from denovo3d.cli import main as cli_main
    from denovo3d.errors import InputError

    print(f"\n$ denovo3d {shlex.join(argv)}", flush=True)
    code = cli_main(argv)
    if code != 0:
        raise InputError(None, f"step `denovo3d {argv[0]}` failed with exit code {code}")


def _simulate(args: argparse.Namespace, data: Path) -> bool:
    """Simulate the example unless ``data`` already holds one made with the same settings;
    returns whether it simulated."""
    settings = {
        "phantom": "c6_hexamer",
        "n": args.n,
        "box": args.box,
        "pixel_size": args.pixel_size,
        "snr": args.snr,
        "seed": args.seed,
    }
    stamp = data / "demo_settings.json"
    done = stamp.is_file() and (data / "optimisation_set.star").is_file()
    if done and json.loads(stamp.read_text()) == settings:
        print(f"reusing the example data in {data}")
        return False
    argv = ["simulate", "--o", str(data)]
    for key, value in settings.items():
        argv += [f"--{key}", str(value)]
    _run([*argv, "--j", str(args.j)])
    stamp.write_text(json.dumps(settings))
    return True


def _compare_with_truth(job: Path, data: Path) -> None:
    """FSC 0.5 of initial_model.mrc against the truth, and of a true-pose reconstruction."""
    import torch

    from denovo3d.engine.references import reconstruct
    from denovo3d.engine.superpose import superpose
    from denovo3d.fourier import centred_irfft
    from denovo3d.fsc import fsc_volumes, resolution_at
    from denovo3d.geometry.euler import euler_to_matrix
    from denovo3d.io.mrc import read_mrc
    from denovo3d.io.star import read_star
    from denovo3d.particles import load_particle_set

    truth_np, pixel = read_mrc(data / "truth.mrc")
    truth = torch.from_numpy(truth_np.copy())
    model_np, _ = read_mrc(job / "initial_model.mrc")
    box = truth.shape[-1]
    aligned, _ = superpose(torch.from_numpy(model_np.copy()), truth)
    res = resolution_at(fsc_volumes(aligned, truth), 0.5, box, pixel)

    ps = load_particle_set(data / "particles.star")
    table = read_star(data / "truth_particles.star")["particles"]
    angles = torch.tensor(table[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy())
    origin = torch.tensor(
        table[["rlnOriginXAngst", "rlnOriginYAngst", "rlnOriginZAngst"]].to_numpy()
    )
    batch = ps.load(range(ps.n), box)
    rotations = euler_to_matrix(angles[:, 0], angles[:, 1], angles[:, 2])
    num, den = reconstruct(batch.data, batch.ctf2, rotations, -origin / pixel, box)
    true_map = centred_irfft(num / den.clamp_min(1e-3 * float(den.mean())), box)
    res_true = resolution_at(fsc_volumes(true_map, truth), 0.5, box, pixel)
    print(
        f"\nFSC 0.5 to the truth: initial_model.mrc {res:.1f} Å; "
        f"reconstruction with the true poses {res_true:.1f} Å (ratio {res / res_true:.2f})"
    )


def main(args: argparse.Namespace) -> int:
    from denovo3d.io.atomic import ensure_writable_dir
    from denovo3d.refine import checkpoint_path_for

    ensure_writable_dir(args.o)
    data, job = args.o / "data", args.o / "InitialModel"
    optimisation_set = data / "optimisation_set.star"
    if _simulate(args, data) and job.is_dir():
        print(f"new example data: removing the previous demo job {job}")
        shutil.rmtree(job)
    _run(["inspect", str(optimisation_set)])
    root = job / "run"
    refine = [
        "refine",
        "--ios",
        str(optimisation_set),
        "--o",
        str(root),
        "--iter",
        str(args.iter),
        "--particle_diameter",
        f"{0.75 * args.box * args.pixel_size:g}",
        "--flatten_solvent",
        "--zero_mask",
        "--sym",
        args.sym,
        "--j",
        str(args.j),
        "--random_seed",
        str(args.seed),
    ]
    if checkpoint_path_for(str(root)).is_file():
        refine.append("--continue")
    _run(refine)
    _run(["report", str(job)])
    _compare_with_truth(job, data)
    print(f"\nDone: {job / 'initial_model.mrc'} and {job / 'report.html'}")
    return 0
