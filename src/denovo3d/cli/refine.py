"""De novo 3D initial model by VDAM (gradient-driven), as RELION's "3D initial model" job.

Example:
  denovo3d refine --i PseudoSubtomo/job007/particles.star --o InitialModel/job008/run \\
      --iter 100 --K 1 --particle_diameter 230 --flatten_solvent --zero_mask \\
      --healpix_order 1 --offset_range 6 --offset_step 2 --tau2_fudge 4 --j 8 --sym C6

The command line RELION 5's GUI writes for this job runs unchanged with `relion_refine`
replaced by `denovo3d refine` (the RELION 4 form with --i particles.star too). Flags that only
tune RELION's own machinery (--pool, --pad, ...) are accepted and listed once in run.log.

Writes run_itNNN_classKKK.mrc, run_itNNN_model.star, run_itNNN_data.star and
run_itNNN_optimiser.star at iteration 0, every --write_iter and at the end, then
initial_model.mrc and run_optimisation_set.star; run.log and one line per iteration on the
terminal; RELION_JOB_EXIT_SUCCESS / _FAILURE / _ABORTED in --pipeline_control (default: the
output directory). Creating RELION_JOB_ABORT_NOW there stops the run at the next sub-batch;
the same command plus --continue resumes from the last finished iteration.
"""

from __future__ import annotations

import argparse
import math
import re
import shlex
from collections.abc import Callable
from pathlib import Path

from denovo3d.config import RefineConfig
from denovo3d.errors import InputError

__all__ = ["NO_EFFECT_FLAGS", "UNSUPPORTED_FLAGS", "add_args", "build_config", "main", "run_job"]

# RELION flags that only tune relion_refine's own machinery (threads' pools, padding of its
# Fourier grids, how it combines weights, disc access, gridding): nothing to do here.
NO_EFFECT_FLAGS: dict[str, str] = {
    "--pool": "particles per thread task in RELION",
    "--pad": "padding of RELION's Fourier grids (we interpolate on the unpadded grid)",
    "--skip_gridding": "RELION's gridding correction (VDAM never applies it)",
    "--dont_combine_weights_via_disc": "how RELION's MPI ranks combine weights",
    "--no_parallel_disc_io": "RELION's parallel disc access",
    "--auto_sampling": "RELION's refinement of the sampling in auto-refine (the initial-model "
    "job keeps its sampling; so do we)",
}
# RELION flags with a meaning that denovo3d does not reproduce: accepted, ignored, logged.
UNSUPPORTED_FLAGS: dict[str, str] = {
    "--ctf_intact_first_peak": "the CTF is always used in full",
    "--sigma_tilt": "no prior on the tilt angle",
}


# the two lists above with the word run.log uses for them
_ACCEPTED = ((NO_EFFECT_FLAGS, "no effect"), (UNSUPPORTED_FLAGS, "ignored"))


def add_args(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--i", dest="particles", help="particles.star (or optimisation_set.star)")
    src.add_argument("--ios", dest="optimisation_set", help="optimisation_set.star")
    parser.add_argument("--tomograms", default=None, help="tomograms.star (RELION 5 form)")
    parser.add_argument("--trajectories", default=None, help="motion trajectories (RELION 5)")
    parser.add_argument("--o", dest="output", help="output root, e.g. InitialModel/job008/run")
    parser.add_argument("--iter", type=int, default=None, help="VDAM mini-batches (100)")
    parser.add_argument("--K", type=int, default=1, help="number of classes (1)")
    parser.add_argument("--particle_diameter", type=float, help="mask diameter, Å")
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
    parser.add_argument(
        "--oversampling", type=int, default=1, help="adaptive oversampling order (only 1)"
    )
    parser.add_argument("--offset_range", type=float, default=6.0, help="pixels (6)")
    parser.add_argument("--offset_step", type=float, default=2.0, help="pixels (2)")
    parser.add_argument("--tau2_fudge", type=float, default=4.0, help="regularisation T (4)")
    parser.add_argument("--grad_ini_subset", type=int, default=-1, help="initial batch size")
    parser.add_argument("--grad_fin_subset", type=int, default=-1, help="final batch size")
    parser.add_argument("--grad_stepsize", type=float, default=0.5, help="final step size (0.5)")
    parser.add_argument("--mu", type=float, default=0.9, help="running-average factor (0.9)")
    parser.add_argument("--maxsig", type=int, default=-1, help="coarse samples kept (100·K)")
    parser.add_argument(
        "--adaptive_fraction", type=float, default=0.999, help="weight kept for the fine pass"
    )
    parser.add_argument("--perturb", type=float, default=0.5, help="grid perturbation (0.5)")
    parser.add_argument("--offset", type=float, default=10.0, help="initial offset prior, Å")
    parser.add_argument("--maskedge", type=float, default=5.0, help="soft mask edge, px (5)")
    parser.add_argument("--incr_size", type=int, default=10, help="extra Fourier shells (10)")
    parser.add_argument("--j", type=int, default=1, help="CPU threads (1)")
    parser.add_argument(
        "--gpu",
        nargs="?",
        const="",
        default=None,
        help='CUDA device ids ("0,1"); --gpu "" uses the first GPU, or the CPU if there is none',
    )
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
        metavar="OPTIMISER_STAR",
        help="resume from the last finished iteration (of --o or of run_itNNN_optimiser.star)",
    )
    parser.add_argument(
        "--class_inactivity_threshold", type=float, default=0.0, help="re-seed empty classes"
    )
    parser.add_argument(
        "--write_iter", "--grad_write_iter", type=int, default=10, help="write every N (10)"
    )
    parser.add_argument("--sym", default="C1", help="point group applied at the end (C1)")
    parser.add_argument("--grad", action="store_true", help="gradient-driven (always on here)")
    parser.add_argument(
        "--denovo_3dref", action="store_true", help="de novo reference (always on here)"
    )
    parser.add_argument("--ctf", action="store_true", help="CTF correction (always on here)")
    parser.add_argument(
        "--pipeline_control", default=None, help="job directory for RELION's exit/abort files"
    )
    parser.add_argument(
        "--max_memory",
        default=None,
        help="memory budget per process, e.g. 8G or 512M (default: half the machine's available "
        "memory, shared by the processes of a node): half caches particles, the rest bounds "
        "the loaded chunks and the E/M-step temporaries",
    )
    parser.add_argument(
        "--quiet", action="store_true", help="no terminal output (run.log is still written)"
    )
    for flags, kind in _ACCEPTED:
        for flag, meaning in flags.items():
            if flag in _TAKES_VALUE:
                parser.add_argument(flag, dest=_dest(flag), help=f"accepted, {kind}: {meaning}")
            else:
                parser.add_argument(
                    flag,
                    dest=_dest(flag),
                    action="store_const",
                    const="",
                    help=f"accepted, {kind}: {meaning}",
                )


_TAKES_VALUE = ("--pool", "--pad", "--sigma_tilt")


def _dest(flag: str) -> str:
    return "relion_" + flag.lstrip("-")


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


_OPTIMISER_STAR = re.compile(r"^(?P<root>.+)_it(?P<it>\d{3,})_optimiser\.star$")


def _output_root(args: argparse.Namespace) -> str:
    """``--o``, or the root of the ``run_itNNN_optimiser.star`` given to ``--continue``."""
    from_continue = None
    if isinstance(args.resume, str):
        match = _OPTIMISER_STAR.match(args.resume)
        if match is None:
            raise InputError(args.resume, "--continue expects a run_itNNN_optimiser.star")
        from_continue = match["root"]
    if args.output is None:
        if from_continue is None:
            raise InputError(None, "--o (the output root, e.g. InitialModel/job008/run) is needed")
        return from_continue
    # a directory (RELION's External jobs pass one) gets RELION's root name "run"
    output = args.output + "run" if args.output.endswith("/") else args.output
    if from_continue is not None and Path(from_continue) != Path(output):
        raise InputError(
            args.resume,
            f"--continue names run {from_continue} but --o is {output}; "
            "denovo3d continues a run in place",
        )
    return output


def build_config(args: argparse.Namespace) -> RefineConfig:
    output = _output_root(args)
    resume = args.resume is not False
    input_path = args.particles or args.optimisation_set
    if not resume:
        if input_path is None:
            raise InputError(None, "--i particles.star or --ios optimisation_set.star is needed")
        if args.particle_diameter is None:
            raise InputError(None, "--particle_diameter (the mask diameter in Å) is needed")
    # on --continue an unset --iter means the run's own (-1 until the checkpoint is read)
    n_iter = args.iter if args.iter is not None else (-1 if resume else 100)
    if (args.iter is not None and args.iter < 1) or args.K < 1:
        raise InputError(None, f"--iter {args.iter} and --K {args.K} must be at least 1")
    if args.offset_step <= 0 or args.offset_range < 0:
        raise InputError(None, "--offset_step must be > 0 and --offset_range >= 0")
    if args.sym.strip().lower() != "auto":
        from denovo3d.geometry.symmetry import UnknownGroupError, point_group

        try:
            point_group(args.sym)  # a bad name stops now, not after the run
        except UnknownGroupError as exc:
            raise InputError(None, f"--sym {args.sym}: {exc}") from None
    if args.oversampling != 1:
        raise InputError(
            None,
            f"--oversampling {args.oversampling}: only 1 is supported (the fine pass is one "
            "HEALPix order finer than the coarse one, as in RELION's initial-model job)",
        )
    return RefineConfig(
        input_path=input_path or "",
        output_root=output,
        n_iter=n_iter,
        n_classes=args.K,
        particle_diameter_a=args.particle_diameter or 200.0,
        flatten_solvent=args.flatten_solvent,
        zero_mask=args.zero_mask,
        non_negative=args.non_negative,
        healpix_order=_healpix_order(args),
        offset_range_px=args.offset_range,
        offset_step_px=args.offset_step,
        tau2_fudge=args.tau2_fudge,
        mu=args.mu,
        ini_subset=args.grad_ini_subset,
        fin_subset=args.grad_fin_subset,
        stepsize=args.grad_stepsize,
        max_significant=args.maxsig,
        adaptive_fraction=args.adaptive_fraction,
        incr_size=args.incr_size,
        mask_edge_px=args.maskedge,
        perturb=args.perturb,
        sigma2_offset_a=args.offset,
        random_seed=args.random_seed,
        write_iter=max(1, args.write_iter),
        class_inactivity_threshold=args.class_inactivity_threshold,
        symmetry=args.sym,
        threads=args.j,
        gpu=args.gpu,
        preread_images=args.preread_images,
        scratch_dir=args.scratch_dir,
        tomograms_path=args.tomograms,
        trajectories_path=args.trajectories,
        command_line=shlex.join(getattr(args, "command_argv", ["denovo3d", "refine"])),
        memory_budget_bytes=_max_memory(args.max_memory),
    )


def accepted_without_effect(args: argparse.Namespace) -> list[str]:
    """One line per RELION flag given that has no effect here (for run.log)."""
    lines = []
    for flags, kind in _ACCEPTED:
        for flag, meaning in flags.items():
            if getattr(args, _dest(flag)) is not None:
                lines.append(f"  {flag}: {kind}; {meaning}")
    return lines


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
    return run_job(args)


def run_job(args: argparse.Namespace, on_success: Callable | None = None) -> int:
    """The job with RELION's protocol around it; ``on_success(cfg, state)`` runs before
    ``RELION_JOB_EXIT_SUCCESS`` is written (an External job's output nodes)."""
    from denovo3d.distributed import from_env
    from denovo3d.io.atomic import ensure_writable_dir
    from denovo3d.pipeline_control import JobAbortedError, PipelineControl
    from denovo3d.progress import JobMonitor
    from denovo3d.refine import run

    if not from_env().is_writer:  # rank 0 speaks for the job: run.log, markers, outputs
        try:
            run(build_config(args), resume=args.resume is not False)
        except JobAbortedError:
            return 3
        except InputError:  # rank 0 prints it, naming this rank where only this one saw it
            return 2
        return 0
    control = None
    if args.pipeline_control is not None:
        control = PipelineControl(ensure_writable_dir(args.pipeline_control))
        control.start()
    try:
        cfg = build_config(args)
        job_dir = ensure_writable_dir(Path(cfg.output_root).parent)
    except InputError:
        if control is not None:
            control.failed()
        raise
    if control is None:
        control = PipelineControl(job_dir)
        control.start()
    monitor = JobMonitor(
        job_dir / "run.log", quiet=args.quiet, abort_requested=control.abort_requested
    )
    monitor.log(f"$ {cfg.command_line}", echo=False)  # the user typed it; run.log keeps it
    ignored = accepted_without_effect(args)
    if ignored:
        monitor.log("RELION flags accepted here without effect:\n" + "\n".join(ignored))
    try:
        state = run(cfg, resume=args.resume is not False, monitor=monitor)
    except JobAbortedError as exc:
        control.aborted()
        monitor.log(
            f"denovo3d refine: aborted ({exc}); continue from the last finished iteration "
            "with the same command and --continue"
        )
        return 3
    except KeyboardInterrupt:
        control.aborted()
        monitor.log("denovo3d refine: interrupted; resume with --continue")
        return 130
    except InputError as exc:
        control.failed()
        monitor.log(f"denovo3d refine: error: {exc}", echo=False)  # the CLI prints it
        raise
    except BaseException:
        control.failed()
        raise
    if on_success is not None:
        on_success(cfg, state)
    control.succeeded()
    monitor.log(f"denovo3d refine: finished iteration {state.iteration}, {cfg.output_root}")
    return 0
