"""Detect the point group of a map: rank Cn, Dn (n = 2..12), T, O, I by symmetry agreement.

Each candidate group is aligned to the map (seeded global search, local refinement) and scored
on frequencies of 3 to 12 cycles per box (at most s/2 - 2), the spherical average removed:
per element, how much more its copy agrees than turns by other angles about the same axis do
(the excess), the group's score being the 20th percentile over its elements, and its
significance that score in standard deviations of randomly turned copies' excess, times the
square root of its number of elements. The verdict is the largest group that holds (score >=
0.45, significance >= 7.8, its index-2 subgroups, e.g. Cn for Dn, scoring >= 0.45 and at most
1.25 times its score; for Dn, its 2-fold flips disagreeing with the map at most 2 times as much
as the turns of Cn about Cn's axis: the `flips` column; every element's copy agreeing with the
map at least 0.97 on some shell from 5 cycles per box up, where a true symmetry's copies differ
by noise alone: the `peak` column); otherwise C1, with the runner-up named.
A verdict Dn whose Cn holds too comes with a note: Dn adds only the flips, which a ring of Cn
subunits matches in part, so compare the two symmetrised maps where the map has finer detail.

Example:
    denovo3d detect-symmetry InitialModel/job012/run_it200_class001.mrc
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from denovo3d.cli.align_symmetry import add_diameter_arg, mask_diameter_px
from denovo3d.errors import InputError
from denovo3d.geometry.symmetry import UnknownGroupError, point_group
from denovo3d.io.mrc import read_mrc
from denovo3d.symmetry_align import CANDIDATES, AlignParams, detect_symmetry

__all__ = ["add_args", "main"]


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("map", type=Path, help="map (.mrc)")
    parser.add_argument(
        "--candidates",
        default=",".join(CANDIDATES),
        help="comma-separated groups to try (default Cn, Dn n=2..12, T, O, I)",
    )
    parser.add_argument("--random_seed", type=int, default=0, help="seed of the search grids")
    parser.add_argument("--box_size", type=int, default=64, help="working box (pixels, even)")
    parser.add_argument("--keep_centre", action="store_true", help="do not re-centre the map")
    parser.add_argument("--angpix", type=float, default=-1, help="pixel size (Å); -1: header")
    add_diameter_arg(parser)


def main(args: argparse.Namespace) -> int:
    names = tuple(c.strip() for c in str(args.candidates).split(",") if c.strip())
    for name in names:
        try:
            point_group(name)
        except UnknownGroupError as exc:
            raise InputError(None, f"--candidates: {exc}") from None
    volume, angpix = read_mrc(args.map)
    if len(set(volume.shape)) != 1 or volume.shape[0] < 16:
        raise InputError(args.map, f"expected a cubic map of at least 16³, found {volume.shape}")
    params = AlignParams(
        box_size=args.box_size,
        seed=args.random_seed,
        keep_centre=args.keep_centre,
        mask_diameter_px=mask_diameter_px(args, angpix if args.angpix <= 0 else args.angpix),
    )
    start = time.perf_counter()
    result = detect_symmetry(torch.from_numpy(volume.copy()), names, params)
    print(result.table())
    print(f"time {time.perf_counter() - start:.1f} s")
    return 0
