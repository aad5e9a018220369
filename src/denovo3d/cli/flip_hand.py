"""Mirror a map to the other hand (de novo maps come out with either hand).

Flips the map along one axis about the box centre (voxel s//2 stays in place): voxel j goes to
(2*(s//2) - j) mod s. For even boxes this is RELION's ``relion_image_handler --invert_hand``
exactly (it wraps the edge plane j = 0 onto itself); for odd boxes it is a plain flip, where
RELION's (s - j) mod s would move the centre by one voxel. RELION flips x; any axis gives the
same hand (the results differ by a 180° rotation). The voxel size is kept; the origin is zero.

Example:
    denovo3d flip-hand --i InitialModel/job012/initial_model.mrc --o initial_model_flipped.mrc
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from denovo3d.io.mrc import read_mrc, write_mrc

__all__ = ["add_args", "flip_hand", "main"]

_AXIS = {"z": 0, "y": 1, "x": 2}  # numpy (z, y, x) order as mrcfile returns it


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--i", dest="input", type=Path, required=True, help="input map (.mrc)")
    parser.add_argument("--o", dest="output", type=Path, required=True, help="output map (.mrc)")
    parser.add_argument(
        "--axis",
        choices=sorted(_AXIS),
        default="x",
        help="axis to flip along (default x, as RELION)",
    )


def flip_hand(volume: np.ndarray, axis: str = "x") -> np.ndarray:
    """Mirror ``volume (z, y, x)`` along ``axis`` about voxel ``s // 2`` of that axis."""
    dim = _AXIS[axis]
    s = volume.shape[dim]
    index = (2 * (s // 2) - np.arange(s)) % s
    return np.take(volume, index, axis=dim)


def main(args: argparse.Namespace) -> int:
    volume, voxel_size_a = read_mrc(args.input)
    write_mrc(args.output, flip_hand(volume, args.axis), voxel_size_a)
    print(f"Mirrored along {args.axis}: {args.output} ({voxel_size_a:.4g} Å/voxel)")
    return 0
