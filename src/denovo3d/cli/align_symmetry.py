"""Align a map to the standard axes of a point group, and symmetrise it (relion_align_symmetry).

Centres the map (centre of mass, then sub-voxel on the symmetry axes), searches a seeded fine grid
of rotations at a small box, refines the best ones, turns the full map in Fourier space and, with
--apply_sym, symmetrises it. The input is a map, or a run_itNNN_model.star whose classes are read
from data_model_classes (rlnReferenceImage, rlnClassDistribution, rlnEstimatedResolution).
--sym auto first detects the group (see `denovo3d detect-symmetry`) and aligns to it, or says C1
with the runner-up named when the evidence is unclear. Prints the rotation as RELION Euler angles
(rot, tilt, psi) and the score, and writes them with the per-operator correlations (and the
detection table) to <output stem>_symmetry.star; the same seed gives the same result.

Example:
    denovo3d align-symmetry --i InitialModel/job012/run_it200_model.star --select_largest_class \\
        --o InitialModel/job012/initial_model.mrc --sym D7 --apply_sym
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from denovo3d.errors import InputError
from denovo3d.geometry.symmetry import UnknownGroupError, point_group
from denovo3d.io.mrc import read_mrc, write_mrc
from denovo3d.io.star import read_star, require_labels
from denovo3d.io.symmetry_star import symmetry_star_path, write_symmetry_star
from denovo3d.symmetry_align import (
    AlignParams,
    SymmetryAlignment,
    SymmetryResult,
    align_requested,
    apply_alignment,
)

__all__ = ["add_args", "add_diameter_arg", "load_maps", "main", "mask_diameter_px"]


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--i", dest="input", type=Path, required=True, help="map (.mrc) or model.star"
    )
    parser.add_argument(
        "--o", dest="output", type=Path, default=Path("aligned.mrc"), help="output map"
    )
    parser.add_argument("--sym", default="C1", help="point group (RELION name) or 'auto'")
    parser.add_argument("--apply_sym", action="store_true", help="symmetrise the aligned map")
    parser.add_argument(
        "--select_largest_class", action="store_true", help="model.star: largest class"
    )
    parser.add_argument(
        "--select_highest_resol", action="store_true", help="model.star: best-resolved class"
    )
    parser.add_argument("--keep_centre", action="store_true", help="do not re-centre the map")
    parser.add_argument("--random_seed", type=int, default=0, help="seed of the search grids")
    parser.add_argument("--box_size", type=int, default=64, help="working box (pixels, even)")
    parser.add_argument("--angpix", type=float, default=-1, help="pixel size (Å); -1: header")
    add_diameter_arg(parser)


def add_diameter_arg(parser: argparse.ArgumentParser) -> None:
    """``--particle_diameter`` (Å), shared with detect-symmetry."""
    parser.add_argument(
        "--particle_diameter",
        type=float,
        default=-1,
        help="diameter (Å) of the soft sphere scored about the centre, e.g. the de novo job's "
        "--particle_diameter (keeps the solvent's noise out); -1: the whole box",
    )


def mask_diameter_px(args: argparse.Namespace, angpix: float) -> float | None:
    """``--particle_diameter`` in pixels of a map of ``angpix`` Å (None when not given)."""
    if args.particle_diameter <= 0:
        return None
    if angpix <= 0:
        raise InputError(None, "--particle_diameter needs the pixel size: give --angpix")
    return args.particle_diameter / angpix


def _resolve(name: str, star: Path) -> Path:
    """RELION writes paths relative to the project directory: try the working directory, then
    the STAR file's directory and its parents."""
    path = Path(name)
    if path.is_absolute() or path.is_file():
        return path
    for base in [star.parent, *star.parent.parents]:
        if (base / path).is_file():
            return base / path
    raise InputError(star, f"class map {name} not found (relative to . or {star.parent})")


def load_maps(args: argparse.Namespace) -> list[tuple[Path, np.ndarray, float]]:
    """The candidate maps (path, volume, pixel size) named by ``--i`` and the select flags."""
    src: Path = args.input
    if src.suffix != ".star":
        volume, angpix = read_mrc(src)
        return [(src, volume, angpix)]
    blocks = read_star(src)
    table = blocks.get("model_classes")
    if table is None or isinstance(table, dict):
        raise InputError(src, "no data_model_classes loop: is this a run_itNNN_model.star?")
    require_labels(table, ["rlnReferenceImage", "rlnClassDistribution"], src, "model_classes")
    rows = list(range(len(table)))
    if args.select_largest_class:
        rows = [int(np.argmax(table["rlnClassDistribution"].to_numpy()))]
    elif args.select_highest_resol:
        require_labels(table, ["rlnEstimatedResolution"], src, "model_classes")
        rows = [int(np.argmin(table["rlnEstimatedResolution"].to_numpy()))]
    maps = []
    for row in rows:
        path = _resolve(str(table["rlnReferenceImage"].iloc[row]), src)
        volume, angpix = read_mrc(path)
        maps.append((path, volume, angpix))
    return maps


def _check_map(path: Path, volume: np.ndarray, box_size: int) -> None:
    if len(set(volume.shape)) != 1:
        raise InputError(path, f"expected a cubic map, found shape {volume.shape}")
    if volume.shape[0] < 16:
        raise InputError(path, f"map too small for a symmetry search ({volume.shape[0]} < 16)")
    if box_size < 16 or box_size % 2:
        raise InputError(None, f"--box_size must be even and at least 16, found {box_size}")


def _report(path: Path, a: SymmetryAlignment, angpix: float) -> None:
    rot, tilt, psi = a.euler_deg
    cx, cy, cz = (a.centre_px * angpix).tolist()
    print(f"{path}: {a.group} axes at rot {rot:.2f} tilt {tilt:.2f} psi {psi:.2f} (deg)")
    print(f"  symmetry centre offset from the box centre: {cx:.2f} {cy:.2f} {cz:.2f} Å (x y z)")
    print(f"  score (mean correlation with the {a.group} copies): {a.score:.4f}")


def main(args: argparse.Namespace) -> int:
    sym = str(args.sym)
    if sym.lower() != "auto":
        try:
            point_group(sym)
        except UnknownGroupError as exc:
            raise InputError(None, f"--sym: {exc}") from None
    maps = load_maps(args)
    best: tuple[float, Path, torch.Tensor, SymmetryResult, float] | None = None
    for path, volume, angpix in maps:
        _check_map(path, volume, args.box_size)
        pixel = angpix if args.angpix <= 0 else args.angpix
        params = AlignParams(
            box_size=args.box_size,
            seed=args.random_seed,
            keep_centre=args.keep_centre,
            mask_diameter_px=mask_diameter_px(args, pixel),
        )
        v = torch.from_numpy(volume.copy())
        start = time.perf_counter()
        result = align_requested(v, sym, params)
        if result.detection is not None:
            print(result.detection.table())
        a = result.alignment
        _report(path, a, angpix if args.angpix <= 0 else args.angpix)
        print(f"  time {time.perf_counter() - start:.1f} s")
        if best is None or a.score > best[0]:
            best = (a.score, path, v, result, angpix if args.angpix <= 0 else args.angpix)
    assert best is not None
    _, path, v, result, angpix = best
    a = result.alignment
    out = apply_alignment(v.double(), a, apply_sym=args.apply_sym and a.group != "C1")
    write_mrc(args.output, out.float().numpy(), angpix)
    record = write_symmetry_star(symmetry_star_path(args.output), a, angpix, sym, result.detection)
    applied = " and symmetrised" if args.apply_sym and a.group != "C1" else ""
    print(f"Wrote {args.output}: {path.name} aligned{applied} ({a.group}, {angpix:.4g} Å/voxel)")
    print(f"Wrote {record}")
    return 0
