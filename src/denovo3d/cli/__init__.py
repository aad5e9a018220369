"""The ``denovo3d`` program: one entry point, one module per sub-command.

Each sub-command module has a docstring (its help text, with an example), ``add_args(parser)``
and ``main(args) -> int``. They are listed once in ``COMMANDS``. Bad input (``InputError``) is
printed as one line on stderr with exit code 2, never as a traceback.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import sys
from collections.abc import Sequence

from denovo3d import __version__
from denovo3d.errors import InputError

__all__ = ["COMMANDS", "build_parser", "main"]

# sub-command name -> module under denovo3d.cli
COMMANDS: dict[str, str] = {
    "demo": "demo",
    "inspect": "inspect",
    "report": "report",
    "flip-hand": "flip_hand",
    "align-symmetry": "align_symmetry",
    "detect-symmetry": "detect_symmetry",
    "refine": "refine",
    "external": "external",
    "simulate": "simulate",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="denovo3d",
        description="De novo 3D initial models from cryo-ET subtomograms (RELION 4/5 projects).",
    )
    parser.add_argument("--version", action="version", version=f"denovo3d {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(f"denovo3d.cli.{module_name}")
        doc = (module.__doc__ or "").strip()
        p = sub.add_parser(
            name,
            help=doc.splitlines()[0] if doc else None,
            description=doc,
            formatter_class=argparse.RawDescriptionHelpFormatter,
            allow_abbrev=False,  # RELION's flags are exact: --o must not match --offset
        )
        module.add_args(p)
        p.set_defaults(_main=module.main, _parser=p)
    return parser


def _unknown_argument(parser: argparse.ArgumentParser, extras: list[str]) -> str:
    """``unknown option --foo (did you mean --foo_bar?)`` for the first unknown flag."""
    flags = [s for action in parser._actions for s in action.option_strings]
    first = next((e for e in extras if e.startswith("-")), None)
    if first is None:
        return f"unexpected argument {extras[0]!r}"
    name = first.split("=", 1)[0]
    close = difflib.get_close_matches(name, flags, n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return f"unknown option {name}{hint}"


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``denovo3d``; returns the exit code (0 ok, 2 bad input)."""
    args, extras = build_parser().parse_known_args(argv)
    args.command_argv = ["denovo3d", *(sys.argv[1:] if argv is None else argv)]
    if extras and getattr(args, "_takes_extras", False):
        args.params, extras = extras, []
    if extras:
        print(
            f"denovo3d {args.command}: error: {_unknown_argument(args._parser, extras)}",
            file=sys.stderr,
        )
        return 2
    try:
        return int(args._main(args) or 0)
    except InputError as exc:
        print(f"denovo3d {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
