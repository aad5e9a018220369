"""The de novo job as a RELION "External" job: outputs appear as nodes in the project.

RELION's External job type runs
  PROGRAM --o External/job012/ --in_parts PARTICLES [--in_3dref REF] --LABEL VALUE ... --j N
and, once the program has written RELION_JOB_EXIT_SUCCESS, reads RELION_OUTPUT_NODES.star from
--o to register its outputs. Set "External executable" to `denovo3d external` and give the
refine options as the job's parameters (label without the dashes, e.g. `particle_diameter 230`,
`iter 100`, `sym C6`, `flatten_solvent Yes`). The input particles may be a particles.star or a
RELION 5 optimisation set. Outputs: everything `denovo3d refine` writes (root --o/run) and the
nodes initial_model.mrc (DensityMap.mrc), run_itNNN_data.star (ParticleGroupMetadata.star.relion),
run_optimisation_set.star (TomoOptimisationSet.star.relion) and, with K > 1, every final class map.

Example:
  denovo3d external --o External/job012/ --in_parts Extract/job010/optimisation_set.star \\
      --particle_diameter 230 --iter 100 --sym C6 --flatten_solvent Yes --zero_mask Yes --j 8
"""

from __future__ import annotations

import argparse
from pathlib import Path

from denovo3d.errors import InputError

__all__ = ["add_args", "external_to_refine", "main"]

_YES = {"yes", "true", "1", "on"}
_NO = {"no", "false", "0", "off"}
_OTHER_INPUTS = ("--in_movies", "--in_mics", "--in_coords", "--in_mask")


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--o", dest="output", required=True, help="the job directory")
    parser.add_argument("--in_parts", required=True, help="particles.star or optimisation set")
    parser.add_argument("--in_3dref", default=None, help="accepted; a de novo job needs none")
    for flag in _OTHER_INPUTS:
        parser.add_argument(flag, default=None, help="not used by this job")
    # every other --label value pair is a refine option (collected by denovo3d.cli.main)
    parser.set_defaults(params=[], _takes_extras=True)


def external_to_refine(args: argparse.Namespace, refine_parser: argparse.ArgumentParser) -> list:
    """The ``denovo3d refine`` argument list for an External call. RELION passes every job
    parameter as ``--label value``, so switches come as ``--flatten_solvent Yes``; the value is
    read as a yes/no and the switch given or dropped."""
    switches = {
        s for action in refine_parser._actions if action.nargs == 0 for s in action.option_strings
    }
    params: list[str] = []
    tokens = list(args.params)
    while tokens:
        token = tokens.pop(0)
        if token in switches and tokens and not tokens[0].startswith("--"):
            value = tokens.pop(0)
            if value.lower() in _YES:
                params.append(token)
            elif value.lower() not in _NO:
                raise InputError(None, f"{token} {value}: expected Yes or No")
            continue
        params.append(token)
    output = args.output if args.output.endswith("/") else args.output + "/"
    return ["--i", args.in_parts, "--o", output + "run", *params]


def main(args: argparse.Namespace) -> int:
    from denovo3d.cli import refine as refine_cli
    from denovo3d.io.relion_outputs import iteration_root, optimisation_set_path
    from denovo3d.pipeline_control import (
        NODE_MAP,
        NODE_OPTIMISATION_SET,
        NODE_PARTICLES,
        PipelineControl,
        write_output_nodes,
    )

    try:
        refine_args = _refine_arguments(args)
    except InputError:
        if Path(args.output).is_dir():  # the GUI waits for a marker
            PipelineControl(args.output).failed()
        raise
    refine_args.command_argv = ["denovo3d", "external", *_argv_of(args)]
    if args.in_3dref is not None:
        print(f"denovo3d external: --in_3dref {args.in_3dref} not used (the job is de novo)")

    def output_nodes(cfg, state) -> None:
        """Written before RELION_JOB_EXIT_SUCCESS: the GUI reads them once it sees that."""
        last = iteration_root(cfg.output_root, state.iteration)
        nodes = [
            (str(Path(cfg.output_root).parent / "initial_model.mrc"), NODE_MAP),
            (f"{last}_data.star", NODE_PARTICLES),
            (str(optimisation_set_path(cfg.output_root)), NODE_OPTIMISATION_SET),
        ]
        if cfg.n_classes > 1:
            nodes += [(f"{last}_class{k:03d}.mrc", NODE_MAP) for k in range(1, cfg.n_classes + 1)]
        path = write_output_nodes(Path(cfg.output_root).parent, nodes)
        print(f"denovo3d external: wrote {path}")

    return refine_cli.run_job(refine_args, on_success=output_nodes)


def _refine_arguments(args: argparse.Namespace) -> argparse.Namespace:
    from denovo3d.cli import _unknown_argument
    from denovo3d.cli import refine as refine_cli

    for flag in _OTHER_INPUTS:
        if getattr(args, flag.removeprefix("--")) is not None:
            raise InputError(None, f"{flag}: the de novo job takes particles (--in_parts) only")
    parser = argparse.ArgumentParser(prog="denovo3d external", allow_abbrev=False)
    refine_cli.add_args(parser)
    refine_args, extras = parser.parse_known_args(external_to_refine(args, parser))
    if extras:
        raise InputError(None, f"External job parameter: {_unknown_argument(parser, extras)}")
    return refine_args


def _argv_of(args: argparse.Namespace) -> list[str]:
    argv = ["--o", args.output, "--in_parts", args.in_parts]
    if args.in_3dref is not None:
        argv += ["--in_3dref", args.in_3dref]
    return argv + list(args.params)
