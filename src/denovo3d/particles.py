"""Particle sets in Fourier space: what the engine sees of the data, whatever the file format.

Every particle arrives as three half-grid tensors (``(b, s, s, s//2+1)``, :mod:`denovo3d.fourier`
layout), cropped to the box the engine asks for:

- ``data``: D, the CTF-premultiplied data (pseudo-subtomograms: the transform of the
  ``rlnImageName`` volume; classic subtomograms: ``CTF · X``);
- ``ctf2``: C = ΣCTF² (classic: ``CTF²``; 1 where a classic set has no CTF volume);
- ``multiplicity``: M (classic: 1). Voxels with ``M < 0.01`` carry no data: D = C = M = 0 there,
  as RELION's ``applySubtomoCorrection`` does.

With that, one likelihood serves both formats (DESIGN §4). Reads are lazy, with a least-recently-
used cache under a memory budget; ``preread`` loads everything at once; ``use_scratch`` writes
the transformed particles once into one file on a (local) scratch disk and reads them from there.
With ``set_zero_mask`` (``--zero_mask``) a fourth tensor, ``masked``, holds D with the solvent
outside a soft sphere set to its edge's mean, the data the search aligns: made once per read at
the cache box and cropped from there, as RELION masks the image at its size before windowing it.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from denovo3d.engine.references import mask_particles
from denovo3d.errors import InputError
from denovo3d.fourier import centred_rfft, fourier_crop
from denovo3d.io.mrc import read_header, read_mrc
from denovo3d.io.particles_star import ParticleTables, read_particle_tables, resolve_project_path
from denovo3d.memory import WORKING_SET_BYTES, Workspace

__all__ = ["MULTIPLICITY_THRESHOLD", "ParticleBatch", "ParticleSet", "load_particle_set"]

MULTIPLICITY_THRESHOLD = 0.01  # RELION's --subtomo_multi_thr
_BYTES_PER_VOXEL = 16  # complex64 data + float32 ctf2 + float32 multiplicity
_MASKED_BYTES_PER_VOXEL = 8  # complex64 masked data (with set_zero_mask)


@dataclass(frozen=True)
class ParticleBatch:
    """Fourier-space tensors of ``b`` particles at box ``s`` (see the module docstring)."""

    indices: torch.Tensor  # (b,) int64, rows of the particle table
    data: torch.Tensor  # (b, s, s, s//2+1) complex64
    ctf2: torch.Tensor  # (b, s, s, s//2+1) float32
    multiplicity: torch.Tensor  # (b, s, s, s//2+1) float32
    masked: torch.Tensor | None = None  # (b, s, s, s//2+1) complex64, with set_zero_mask

    @property
    def box(self) -> int:
        return int(self.data.shape[-2])


def _read_weights_pseudo(path: Path, box: int, row: int) -> tuple[np.ndarray, np.ndarray]:
    """RELION-4 weights: MRC (nx, ny, nz) = (s/2+1, s, 2s); z [0, s) ΣCTF², [s, 2s) multiplicity."""
    volume, _ = read_mrc(path)
    expected = (2 * box, box, box // 2 + 1)
    if volume.shape != expected:
        raise InputError(
            path,
            f"weights volume has shape (z, y, x) {volume.shape}, expected {expected} "
            f"(RELION-4 pseudo-subtomogram layout for box {box})",
            row=row,
            label="rlnCtfImage",
        )
    ctf2, multiplicity = volume[:box], volume[box:]
    if (multiplicity < 0).any():
        raise InputError(
            path,
            f"negative multiplicity (min {multiplicity.min():g}) in the weights volume",
            row=row,
            label="rlnCtfImage",
        )
    return ctf2, multiplicity


def _read_ctf_classic(path: Path, box: int, row: int) -> np.ndarray:
    """A classic 3D CTF: full centred cube (RELION reads it at -k) or an FFTW half volume."""
    volume, _ = read_mrc(path)
    if volume.shape == (box, box, box // 2 + 1):
        return volume
    if volume.shape == (box, box, box):
        # centred cube: value of frequency k sits at index s/2 - k (RELION's index negation)
        k = np.fft.fftfreq(box, 1.0 / box).astype(int)
        kx = np.arange(box // 2 + 1)
        iz = (box // 2 - k) % box
        ix = (box // 2 - kx) % box
        return volume[np.ix_(iz, iz, ix)]
    raise InputError(
        path,
        f"3D CTF volume has shape (z, y, x) {volume.shape}, expected a full "
        f"cube {(box,) * 3} or a half volume {(box, box, box // 2 + 1)}",
        row=row,
        label="rlnCtfImage",
    )


class _ScratchFile:
    """Particles as D, C, M half grids at box ``box``, one after the other in one file
    (complex64 then float32, float32: ``16 s² (s/2+1)`` bytes a particle), read by ``pread``
    (not mapped, so that pages read do not count as this process's memory)."""

    def __init__(self, path: Path, box: int) -> None:
        self.path, self.box = path, box
        self.shape = (box, box, box // 2 + 1)
        self.voxels = box * box * (box // 2 + 1)

    @property
    def bytes_per_particle(self) -> int:
        return 16 * self.voxels

    @staticmethod
    def record(data: torch.Tensor, ctf2: torch.Tensor, mult: torch.Tensor) -> bytes:
        b = data.shape[0]
        parts = (torch.view_as_real(data).reshape(b, -1), ctf2.reshape(b, -1), mult.reshape(b, -1))
        return torch.cat(parts, dim=1).float().contiguous().numpy().tobytes()

    def read(self, rows: Sequence[int]) -> tuple[torch.Tensor, ...]:
        per, v = self.bytes_per_particle, self.voxels
        out = np.empty((len(rows), 4 * v), dtype=np.float32)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            for j, row in enumerate(rows):
                out[j] = np.frombuffer(os.pread(fd, per, row * per), dtype=np.float32)
        finally:
            os.close(fd)
        t = torch.from_numpy(out)
        data = torch.view_as_complex(t[:, : 2 * v].reshape(-1, v, 2).contiguous())
        shape = (len(rows), *self.shape)
        return data.reshape(shape), t[:, 2 * v : 3 * v].reshape(shape), t[:, 3 * v :].reshape(shape)


class ParticleSet:
    """A validated particle set whose volumes are read on demand (see the module docstring)."""

    def __init__(self, tables: ParticleTables, memory_budget_bytes: int = 4 << 30) -> None:
        self.tables = tables
        self.memory_budget_bytes = int(memory_budget_bytes)
        self._cache: OrderedDict[int, int] = OrderedDict()  # row -> slot of the slab, LRU order
        self._slab: tuple[torch.Tensor, ...] | None = None  # (capacity, s, s, s//2+1) D, C, M[, D']
        self._cache_box = tables.box
        self._scratch: _ScratchFile | None = None
        self._zero_mask: tuple[float, float] | None = None  # diameter (Å), edge (cache box px)

    # ---- description ---------------------------------------------------------------------
    @property
    def n(self) -> int:
        return len(self.tables.particles)

    @property
    def box(self) -> int:
        return self.tables.box

    @property
    def pixel_size_a(self) -> float:
        return self.tables.pixel_size_a

    @property
    def kind(self) -> str:
        return self.tables.kind

    @property
    def path(self) -> Path:
        return self.tables.particles_path

    @property
    def table(self) -> pd.DataFrame:
        return self.tables.particles

    @property
    def optics(self) -> pd.DataFrame:
        return self.tables.optics

    @property
    def random_subset(self) -> np.ndarray:
        """Half-set of each particle (1 or 2): rlnRandomSubset, else alternating as RELION does."""
        if "rlnRandomSubset" in self.table.columns:
            return self.table["rlnRandomSubset"].astype(int).to_numpy()
        return (np.arange(self.n) % 2 + 1).astype(int)

    def file_path(self, row: int, label: str) -> Path:
        return resolve_project_path(str(self.table[label].iloc[row]), self.tables.project_dir)

    # ---- validation of the files (headers only: cheap) -----------------------------------
    def check_files(self) -> None:
        """Check that every file exists and has the right shape and voxel size (headers only)."""
        s = self.box
        for row in range(self.n):
            data_path = self.file_path(row, "rlnImageName")
            if not data_path.is_file():
                raise InputError(data_path, "file not found", row=row + 1, label="rlnImageName")
            header = read_header(data_path)
            if header.shape != (s, s, s):
                what = "a 2D image or stack" if header.shape[0] != header.shape[1] else "a volume"
                raise InputError(
                    data_path,
                    f"{what} of shape (z, y, x) {header.shape}, expected "
                    f"{(s, s, s)} (rlnImageSize {s} in data_optics)",
                    row=row + 1,
                    label="rlnImageName",
                )
            voxel = header.voxel_size_a
            if voxel > 0 and abs(voxel - self.pixel_size_a) > 0.01 * self.pixel_size_a:
                raise InputError(
                    data_path,
                    f"voxel size {voxel:g} Å in the MRC header, "
                    f"{self.pixel_size_a:g} Å in data_optics",
                    row=row + 1,
                    label="rlnImageName",
                )
            if "rlnCtfImage" in self.table.columns:
                ctf_path = self.file_path(row, "rlnCtfImage")
                if not ctf_path.is_file():
                    raise InputError(ctf_path, "file not found", row=row + 1, label="rlnCtfImage")
                shape = read_header(ctf_path).shape
                allowed = (
                    [(2 * s, s, s // 2 + 1)]
                    if self.kind == "pseudo"
                    else [(s, s, s), (s, s, s // 2 + 1)]
                )
                if shape not in allowed:
                    raise InputError(
                        ctf_path,
                        f"weights volume has shape (z, y, x) {shape}, "
                        f"expected {' or '.join(map(str, allowed))}",
                        row=row + 1,
                        label="rlnCtfImage",
                    )

    # ---- reading -------------------------------------------------------------------------
    def _read_one(self, row: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Real-space data and half-grid C, M of one particle, as numpy arrays."""
        s = self.box
        data_path = self.file_path(row, "rlnImageName")
        data, _ = read_mrc(data_path)
        if data.shape != (s, s, s):
            raise InputError(
                data_path,
                f"volume of shape {data.shape}, expected {(s, s, s)}",
                row=row + 1,
                label="rlnImageName",
            )
        half = (s, s, s // 2 + 1)
        has_ctf = "rlnCtfImage" in self.table.columns
        if self.kind == "pseudo":
            ctf2, mult = _read_weights_pseudo(self.file_path(row, "rlnCtfImage"), s, row + 1)
        elif has_ctf:
            ctf = _read_ctf_classic(self.file_path(row, "rlnCtfImage"), s, row + 1)
            ctf2, mult = ctf, np.ones(half, np.float32)  # ctf itself; squared after the FFT
        else:
            ctf2, mult = np.ones(half, np.float32), np.ones(half, np.float32)
        return data, ctf2, mult

    def _read_rows(self, rows: Sequence[int], threads: int) -> tuple[torch.Tensor, ...]:
        """D, C, M (and the masked D) of ``rows`` at the cache box, from the scratch file or the
        particle files."""
        if self._scratch is not None:
            tensors = self._scratch.read(rows)
        else:
            tensors = self._read_files(rows, threads)
        if self._cache_box < self.box:
            tensors = tuple(fourier_crop(t, self._cache_box) for t in tensors)
        if self._zero_mask is not None:
            diameter_a, edge_px = self._zero_mask
            diameter_px = diameter_a / self.pixel_size_a * self._cache_box / self.box
            tensors = (*tensors, mask_particles(tensors[0], diameter_px, edge_px))
        return tensors

    def _read_files(self, rows: Sequence[int], threads: int) -> tuple[torch.Tensor, ...]:
        if threads > 1 and len(rows) > 1:
            with ThreadPoolExecutor(threads) as pool:
                items = list(pool.map(self._read_one, rows))
        else:
            items = [self._read_one(r) for r in rows]
        data = centred_rfft(torch.from_numpy(np.stack([it[0] for it in items])))
        weights = torch.from_numpy(np.stack([it[1] for it in items]))
        mult = torch.from_numpy(np.stack([it[2] for it in items]))
        if self.kind == "classic" and "rlnCtfImage" in self.table.columns:
            data = data * weights  # D = CTF · X, C = CTF²
            weights = weights * weights
        empty = mult < MULTIPLICITY_THRESHOLD
        data = data.masked_fill(empty, 0).to(torch.complex64)
        weights = weights.masked_fill(empty, 0).float()
        mult = mult.masked_fill(empty, 0).float()
        return data, weights, mult

    def set_zero_mask(self, diameter_a: float | None, edge_px: float = 5.0) -> None:
        """Also keep each particle's data masked by a soft sphere of ``diameter_a`` (Å) with an
        ``edge_px`` edge (pixels of the cache box), outside set to the edge's mean (RELION's
        ``--zero_mask``), returned as :attr:`ParticleBatch.masked`; ``None``: no masked copy.
        Masking once per read instead of at every mini-batch saves two FFTs (3.9 ms at box 64)
        each time a particle is searched, for 8 bytes a voxel more in the cache."""
        mask = None if diameter_a is None else (float(diameter_a), float(edge_px))
        if mask != self._zero_mask:
            self._zero_mask = mask
            self._cache.clear()
            self._slab = None

    def set_cache_box(self, box: int) -> None:
        """Declare the largest box the caller will ask for, so the cache holds only that much."""
        box = min(int(box), self.box)
        if box != self._cache_box:
            if box > self._cache_box:
                self._cache.clear()
                self._slab = None
            elif self._slab is not None:
                self._slab = tuple(fourier_crop(t, box) for t in self._slab)
            self._cache_box = box

    def _bytes_per_particle(self, box: int) -> int:
        per_voxel = _BYTES_PER_VOXEL + (_MASKED_BYTES_PER_VOXEL if self._zero_mask else 0)
        return box * box * (box // 2 + 1) * per_voxel

    @property
    def _cache_bytes(self) -> int:
        return len(self._cache) * self._bytes_per_particle(self._cache_box)

    def _slot_for(self, row: int, like: tuple[torch.Tensor, ...]) -> int | None:
        """A slot of the slab for ``row`` (the least recently used one when full), or None
        when the budget holds no particle. The slab is one tensor per field, allocated once
        (pages are touched only as slots fill): no fragmentation as particles come and go."""
        if self._slab is None:
            capacity = min(
                self.n, self.memory_budget_bytes // self._bytes_per_particle(like[0].shape[-2])
            )
            if capacity < 1:
                return None
            self._slab = tuple(torch.empty((capacity, *t.shape[1:]), dtype=t.dtype) for t in like)
        if len(self._cache) < self._slab[0].shape[0]:
            slot = len(self._cache)
        else:
            _, slot = self._cache.popitem(last=False)
        self._cache[row] = slot
        return slot

    def load(
        self,
        indices: Sequence[int] | np.ndarray | torch.Tensor,
        box: int | None = None,
        device: torch.device | str = "cpu",
        threads: int = 1,
        workspace: Workspace | None = None,
    ) -> ParticleBatch:
        """Particles ``indices`` (table rows, from 0) as a :class:`ParticleBatch` at ``box``;
        on the CPU, views of ``workspace``'s buffer "particles" if given: a caller that loads
        batch after batch keeps one (new arrays this size are faulted in afresh)."""
        rows = [int(i) for i in torch.as_tensor(indices).reshape(-1).tolist()]
        box = self._cache_box if box is None else int(box)
        if box > self._cache_box:
            self.set_cache_box(box)
        for r in rows:
            if r in self._cache:
                self._cache.move_to_end(r)
        cached = [j for j, r in enumerate(rows) if r in self._cache]
        missing = list(dict.fromkeys(r for r in rows if r not in self._cache))
        fresh = self._read_rows(missing, threads) if missing else ()
        shape = (box, box, box // 2 + 1)
        dtypes = (torch.complex64, torch.float32, torch.float32)
        dtypes += (torch.complex64,) if self._zero_mask is not None else ()
        shapes = [(len(rows), *shape)] * len(dtypes)
        if workspace is None:
            tensors = [torch.empty(s, dtype=dt) for s, dt in zip(shapes, dtypes, strict=True)]
        else:
            tensors = workspace.take("particles", shapes, list(dtypes), torch.device("cpu"))
        if cached:
            slots = torch.tensor([self._cache[rows[j]] for j in cached])
            self._copy_rows(tensors, self._slab, torch.tensor(cached), slots)
        if missing:
            where = {r: j for j, r in enumerate(missing)}
            at = [j for j, r in enumerate(rows) if r in where]
            src = torch.tensor([where[rows[j]] for j in at])
            self._copy_rows(tensors, fresh, torch.tensor(at), src)
            for j, r in enumerate(missing):
                slot = self._slot_for(r, fresh)
                if slot is None:
                    break
                for slab, new in zip(self._slab, fresh, strict=True):
                    slab[slot] = new[j]
        data, ctf2, mult, *masked = (t.to(device) for t in tensors)
        indices = torch.tensor(rows, dtype=torch.int64, device=device)
        return ParticleBatch(indices, data, ctf2, mult, masked[0] if masked else None)

    def _copy_rows(
        self,
        out: list[torch.Tensor],
        source: tuple[torch.Tensor, ...],
        at: torch.Tensor,
        src: torch.Tensor,
    ) -> None:
        """``out[f][at] = crop(source[f][src])`` for D, C, M[, D'] (``source`` at the cache box,
        ``out`` at its own box), by chunks of particles under ``WORKING_SET_BYTES``: a batch-sized
        copy at the cache box would be a new mapping, faulted in at every load. When ``at`` is a
        run of positions (a batch all in the cache) each chunk goes straight into its slice of
        ``out``: one gather (and one crop) instead of three copies."""
        box = out[0].shape[-2]
        step = max(1, WORKING_SET_BYTES // self._bytes_per_particle(self._cache_box))
        run = at.numel() > 0 and int(at[-1]) - int(at[0]) == at.numel() - 1
        for i in range(0, at.numel(), step):
            rows = src[i : i + step]
            for dst, full in zip(out, source, strict=True):
                same = box == full.shape[-2]
                if not run:
                    part = full.index_select(0, rows)
                    dst[at[i : i + step]] = part if same else fourier_crop(part, box)
                    continue
                target = dst[int(at[0]) + i : int(at[0]) + i + rows.numel()]
                if same:
                    torch.index_select(full, 0, rows, out=target)
                else:
                    fourier_crop(full.index_select(0, rows), box, out=target)

    def use_scratch(self, directory: str | Path, threads: int = 1, chunk: int = 64) -> Path:
        """Read the particles from one file in ``directory`` (``--scratch_dir``), written now
        unless a complete one for this particle set is there: the transformed, masked D, C and
        M, so a read is one ``pread`` (no MRC headers, no FFT). Written chunk by chunk (memory
        bounded) to a temporary name, then renamed: several processes may race safely."""
        source = self.path.resolve()
        stamp = f"{source}|{source.stat().st_mtime_ns}|{self.n}|{self.box}"
        key = hashlib.sha1(stamp.encode()).hexdigest()[:16]
        directory = Path(directory)
        scratch = _ScratchFile(directory / f"denovo3d_{key}_box{self.box}.particles", self.box)
        expected = scratch.bytes_per_particle * self.n
        if not (scratch.path.is_file() and scratch.path.stat().st_size == expected):
            directory.mkdir(parents=True, exist_ok=True)
            tmp = scratch.path.with_name(f".{scratch.path.name}.{os.getpid()}.tmp")
            try:
                with open(tmp, "wb") as fh:
                    for start in range(0, self.n, chunk):
                        rows = range(start, min(start + chunk, self.n))
                        fh.write(scratch.record(*self._read_files(rows, threads)))
                os.replace(tmp, scratch.path)
            finally:
                tmp.unlink(missing_ok=True)
        self._scratch = scratch
        return scratch.path

    def preread(self, threads: int = 1, chunk: int = 64) -> None:
        """Read every particle into the cache now (``--preread_images``)."""
        needed = self.n * self._bytes_per_particle(self._cache_box)
        if needed > self.memory_budget_bytes:
            raise InputError(
                self.path,
                f"pre-reading {self.n} particles of box "
                f"{self._cache_box} needs {needed / 2**30:.1f} GiB, more than the "
                f"memory budget of {self.memory_budget_bytes / 2**30:.1f} GiB",
            )
        for start in range(0, self.n, chunk):
            self.load(range(start, min(start + chunk, self.n)), threads=threads)


def load_particle_set(
    path: str | Path,
    project_dir: str | Path | None = None,
    *,
    memory_budget_bytes: int = 4 << 30,
    check_files: bool = True,
) -> ParticleSet:
    """Read and check a particles.star or optimisation_set.star (headers of all files too)."""
    particle_set = ParticleSet(read_particle_tables(path, project_dir), memory_budget_bytes)
    if check_files:
        particle_set.check_files()
    return particle_set
