"""MRC maps and volumes through ``mrcfile``: voxel size in Å, zero origin, atomic writes.

Arrays are numpy ``(z, y, x)`` as mrcfile returns them; the engine turns them into tensors.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import mrcfile
import numpy as np

from denovo3d.errors import InputError
from denovo3d.io.atomic import atomic_path

__all__ = ["MrcHeader", "read_header", "read_mrc", "write_mrc"]


@dataclass(frozen=True)
class MrcHeader:
    """What we need from an MRC header: shape ``(nz, ny, nx)``, voxel size (Å), data mode."""

    shape: tuple[int, int, int]
    voxel_size_a: float
    mode: int


def _open(path: Path, header_only: bool) -> mrcfile.mrcfile.MrcFile:
    if not path.is_file():
        raise InputError(path, "file not found")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # mrcfile warns on sloppy but readable headers
            return mrcfile.open(path, mode="r", header_only=header_only, permissive=False)
    except (ValueError, OSError) as exc:
        raise InputError(path, f"not a readable MRC file ({exc})") from None


def _is_volume(mrc: mrcfile.mrcfile.MrcFile) -> bool:
    """A 3D volume, not a 2D image or stack. Space group 0 marks a stack in the MRC-2014
    convention, but RELION 3.1 and older programs write volumes with it too: a cube, or a
    header whose sampling ``mz`` equals ``nz``, is read as a volume whatever its space group."""
    if mrc.data is None or mrc.data.ndim != 3:
        return False
    if not mrc.is_image_stack():
        return True
    nz, ny, nx = mrc.data.shape
    return (nz == ny == nx) or int(mrc.header.mz) == nz


def read_header(path: str | Path) -> MrcHeader:
    """Read only the header of an MRC file (cheap: for validation of many files)."""
    path = Path(path)
    with _open(path, header_only=True) as mrc:
        h = mrc.header
        shape = (int(h.nz), int(h.ny), int(h.nx))
        return MrcHeader(shape=shape, voxel_size_a=float(mrc.voxel_size.x), mode=int(h.mode))


def read_mrc(path: str | Path, *, require_3d: bool = True) -> tuple[np.ndarray, float]:
    """Read a map as float32 ``(z, y, x)`` and its voxel size in Å.

    Raises InputError for a missing or unreadable file, a 2D image or stack where a volume is
    needed (``require_3d``), a truncated file, or NaN/Inf voxels.
    """
    path = Path(path)
    with _open(path, header_only=False) as mrc:
        if require_3d and not _is_volume(mrc):
            shape = None if mrc.data is None else tuple(mrc.data.shape)
            raise InputError(
                path, f"expected a 3D volume, found an image or 2D stack of shape {shape}"
            )
        data = np.asarray(mrc.data, dtype=np.float32)
        voxel = float(mrc.voxel_size.x)
    if not np.isfinite(data).all():
        bad = int((~np.isfinite(data)).sum())
        raise InputError(path, f"{bad} voxel(s) are NaN or Inf")
    return data, voxel


def write_mrc(path: str | Path, data: np.ndarray, voxel_size_a: float) -> Path:
    """Write a float32 volume atomically with its voxel size (Å) and a zero origin (mode 2)."""
    path = Path(path)
    array = np.ascontiguousarray(data, dtype=np.float32)
    with atomic_path(path) as tmp, mrcfile.new(tmp, overwrite=True) as mrc:
        mrc.set_data(array)
        mrc.voxel_size = float(voxel_size_a)
        mrc.header.origin = (0.0, 0.0, 0.0)
        mrc.header.nxstart = mrc.header.nystart = mrc.header.nzstart = 0
        mrc.update_header_stats()
    return path
