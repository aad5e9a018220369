"""De novo 3D initial model by VDAM (gradient-driven), as RELION's "3D initial model" job.

Example:
  denovo3d refine --i PseudoSubtomo/job007/particles.star --o InitialModel/job008/run \\
      --iter 100 --K 1 --particle_diameter 230 --flatten_solvent --zero_mask \\
      --healpix_order 1 --offset_range 6 --offset_step 2 --tau2_fudge 4 --j 8 --sym C6

Writes run_itNNN_classKKK.mrc, run_itNNN_model.star, run_itNNN_data.star and
run_itNNN_optimiser.star at iteration 0, every --write_iter and at the end, then
initial_model.mrc. A killed run resumes with the same command plus --continue.
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys

from denovo3d.config import RefineConfig
from denovo3d.errors import InputError

__all__ = ["add_args", "main"]


def add_args(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--i", dest="particles", help="particles.star (or optimisation_set.star)")
    src.add_argument("--ios", dest="optimisation_set", help="optimisation_set.star")
    parser.add_argument("--o", dest="output", required=True, help="output root, e.g. Job/run")
    parser.add_argument("--iter", type=int, default=100, help="VDAM mini-batches (100)")
    parser.add_argument("--K", type=int, default=1, help="number of classes (1)")
    parser.add_argument("--particle_diameter", type=float, required=True, help="mask diameter, Å")
    parser.add_argument("--flatten_solvent", action="store_true", help="soft spherical mask")
    parser.add_argument("--zero_mask", action="store_true", help="mask particles for alignment")
    parser.add_argument("--non_negative", action="store_true", help="clamp negative density")
    sampling = parser.add_mutually_exclusive_group()
    sampling.add_argument(
        "--healpix_order", type=int, help="coarse HEALPix order (1: 30° coarse, 15° fine)"
    )
    sampling.add_argument(
        "--angular_step", type=float, default=15.0, help="fine angular step in degrees (15)"
    )
    parser.add_argument("--offset_range", type=float, default=6.0, help="pixels (6)")
    parser.add_argument("--offset_step", type=float, default=2.0, help="pixels (2)")
    parser.add_argument("--tau2_fudge", type=float, default=4.0, help="regularisation T (4)")
    parser.add_argument("--grad_ini_subset", type=int, default=-1, help="initial batch size")
    parser.add_argument("--grad_fin_subset", type=int, default=-1, help="final batch size")
    parser.add_argument("--j", type=int, default=1, help="CPU threads (1)")
    parser.add_argument("--gpu", nargs="?", const="0", default=None, help="CUDA device ids")
    parser.add_argument("--preread_images", action="store_true", help="read all particles first")
    parser.add_argument(
        "--scratch_dir", default=None, help="copy the transformed particles here once (local disk)"
    )
    parser.add_argument("--random_seed", type=int, default=0, help="seed (0)")
    parser.add_argument(
        "--continue",
        dest="resume",
        nargs="?",
        const=True,
        default=False,
        help="resume from the last finished iteration of --o",
    )
    parser.add_argument(
        "--class_inactivity_threshold", type=float, default=0.0, help="re-seed empty classes"
    )
    parser.add_argument("--write_iter", type=int, default=10, help="write every N iterations")
    parser.add_argument("--sym", default="C1", help="point group applied at the end (C1)")
    parser.add_argument(
        "--max_memory",
        default=None,
        help="memory budget per process, e.g. 8G or 512M (default: half the machine's available "
        "memory, shared by the processes of a node): half caches particles, the rest bounds "
        "the loaded chunks and the E/M-step temporaries",
    )


def _healpix_order(args: argparse.Namespace) -> int:
    if args.healpix_order is not None:
        if args.healpix_order < 0:
            raise InputError(None, f"--healpix_order {args.healpix_order} must be >= 0")
        return int(args.healpix_order)
    fine = math.log2(30.0 / args.angular_step)  # fine order n+1 has step 60/2^(n+1)
    order = round(fine)
    if abs(fine - order) > 1e-6 or order < 0:
        raise InputError(
            None, f"--angular_step {args.angular_step:g} is not 30/2^n degrees (30, 15, 7.5, ...)"
        )
    return order


def build_config(args: argparse.Namespace) -> RefineConfig:
    if args.iter < 1 or args.K < 1:
        raise InputError(None, f"--iter {args.iter} and --K {args.K} must be at least 1")
    if args.offset_step <= 0 or args.offset_range < 0:
        raise InputError(None, "--offset_step must be > 0 and --offset_range >= 0")
    return RefineConfig(
        input_path=args.particles or args.optimisation_set,
        output_root=args.output,
        n_iter=args.iter,
        n_classes=args.K,
        particle_diameter_a=args.particle_diameter,
        flatten_solvent=args.flatten_solvent,
        zero_mask=args.zero_mask,
        non_negative=args.non_negative,
        healpix_order=_healpix_order(args),
        offset_range_px=args.offset_range,
        offset_step_px=args.offset_step,
        tau2_fudge=args.tau2_fudge,
        ini_subset=args.grad_ini_subset,
        fin_subset=args.grad_fin_subset,
        random_seed=args.random_seed,
        write_iter=max(1, args.write_iter),
        class_inactivity_threshold=args.class_inactivity_threshold,
        symmetry=args.sym,
        threads=args.j,
        gpu=args.gpu,
        preread_images=args.preread_images,
        scratch_dir=args.scratch_dir,
        command_line=shlex.join(["denovo3d", "refine", *sys.argv[2:]]),
        memory_budget_bytes=_max_memory(args.max_memory),
    )


_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def _max_memory(text: str | None) -> int:
    """``--max_memory`` in bytes ("8G", "512M", "1.5G", "2000000"); default: half of the
    available memory over the processes on this node."""
    if text is None:
        from denovo3d.distributed import local_world_size
        from denovo3d.memory import available_bytes

        return max(256 << 20, available_bytes() // 2 // local_world_size())
    value = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = value[-1:] if value[-1:] in _UNITS else ""
    try:
        size = float(value[: len(value) - len(unit)]) * _UNITS[unit]
    except ValueError:
        size = -1.0
    if not size >= 64 << 20:
        raise InputError(None, f"--max_memory {text}: expected a size of at least 64M, e.g. 8G")
    return int(size)


def main(args: argparse.Namespace) -> int:
    from denovo3d.refine import run

    cfg = build_config(args)
    state = run(cfg, resume=bool(args.resume))
    print(f"denovo3d refine: finished iteration {state.iteration}, {cfg.output_root}")
    return 0
