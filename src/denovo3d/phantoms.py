"""Procedural, deterministic phantoms that look like proteins at 15-30 Å.

Each phantom is a list of pseudo-atoms (one per residue, Cα-like, coordinates in Å) built from
secondary-structure elements: α-helix-like rods (1.5 Å rise, 2.3 Å radius, 100° per residue),
β-sheet-like slabs (strands of 3.3 Å rise, 4.8 Å apart, joined by hairpins) and loops, packed
into compact domains (helix bundles, α/β sandwiches) that are joined by linkers into an
asymmetric subunit. Copies of the subunit are placed by the point group's operators in RELION's
standard orientation (Cn: n-fold along z; Dn: also a 2-fold along x). Atoms are rendered as
Gaussians (σ = 2 Å, widened to at least 0.5 pixel against aliasing) on any box and pixel size:
the physical size is fixed, so the same protein appears at any sampling.

Every phantom uses its own fixed seed: the same call gives the same map, bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["PHANTOMS", "Phantom", "make_phantom", "phantom_atoms"]

_HELIX_RISE_A, _HELIX_RADIUS_A, _HELIX_TWIST_RAD = 1.5, 2.3, math.radians(100.0)
_STRAND_RISE_A, _STRAND_SPACING_A, _CA_STEP_A = 3.3, 4.8, 3.8
_ATOM_SIGMA_A = 2.0
_CONTENT_FRACTION = 0.7  # content must lie inside a sphere of this fraction of the box


def _rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random rotation matrix (3, 3)."""
    q = rng.normal(size=4)
    w, x, y, z = q / np.linalg.norm(q)
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )


def _axis_rotation(axis: str, angle_deg: float) -> np.ndarray:
    c, s = math.cos(math.radians(angle_deg)), math.sin(math.radians(angle_deg))
    if axis == "z":
        return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])
    if axis == "x":
        return np.array([[1.0, 0, 0], [0, c, -s], [0, s, c]])
    return np.array([[c, 0, s], [0, 1.0, 0], [-s, 0, c]])


def _helix(start: np.ndarray, end: np.ndarray, phase: float) -> np.ndarray:
    """Cα trace of an α-helix whose axis runs from ``start`` to ``end`` (Å), ``(n, 3)``."""
    axis = end - start
    length = float(np.linalg.norm(axis))
    n = max(int(length / _HELIX_RISE_A), 4)
    u = axis / length
    a = np.cross(u, [1.0, 0, 0] if abs(u[0]) < 0.9 else [0, 1.0, 0])
    a /= np.linalg.norm(a)
    b = np.cross(u, a)
    t = np.arange(n)
    angle = phase + t * _HELIX_TWIST_RAD
    radial = np.cos(angle)[:, None] * a + np.sin(angle)[:, None] * b
    return start + (t * _HELIX_RISE_A)[:, None] * u + _HELIX_RADIUS_A * radial


def _loop(a: np.ndarray, b: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A loop from ``a`` to ``b``: Cα steps of ~3.8 Å bulging sideways, ends excluded."""
    length = float(np.linalg.norm(b - a))
    n = max(int(length / _CA_STEP_A), 1)
    t = np.linspace(0.0, 1.0, n + 2)[1:-1, None]
    bulge = rng.normal(scale=0.25 * length + 2.0, size=3) * np.sin(np.pi * t)
    return a + t * (b - a) + bulge + rng.normal(scale=0.7, size=(n, 3))


def _sheet(n_strands: int, n_res: int, twist_deg: float) -> np.ndarray:
    """An antiparallel β-sheet in its own frame (strands along x, stacked along y), ``(n, 3)``."""
    chains = []
    for i in range(n_strands):
        x = (np.arange(n_res) - (n_res - 1) / 2) * _STRAND_RISE_A
        if i % 2:
            x = x[::-1]
        y = np.full(n_res, (i - (n_strands - 1) / 2) * _STRAND_SPACING_A)
        z = 0.8 * (-1.0) ** np.arange(n_res)  # pleat
        strand = np.stack([x, y, z], -1)
        chains.append(strand @ _axis_rotation("y", twist_deg * (i - n_strands / 2)).T)
    return np.concatenate(chains)


def _helix_bundle(rng: np.random.Generator, semi_axes: np.ndarray) -> np.ndarray:
    """Helices packed ~10 Å apart on a hexagonal lattice inside an ellipsoid (own frame)."""
    a, b, c = semi_axes
    atoms, previous_end = [], None
    points = [
        (i * 10.0 + (j % 2) * 5.0, j * 8.66)
        for j in range(-4, 5)
        for i in range(-4, 5)
        if ((i * 10.0 + (j % 2) * 5.0) / a) ** 2 + (j * 8.66 / b) ** 2 < 0.75
    ]
    rng.shuffle(points)
    for k, (x, y) in enumerate(points):
        half = c * math.sqrt(max(1.0 - (x / a) ** 2 - (y / b) ** 2, 0.1)) * rng.uniform(0.7, 1.0)
        tilt = rng.normal(scale=0.25, size=2)
        start = np.array([x - tilt[0] * half, y - tilt[1] * half, -half])
        end = np.array([x + tilt[0] * half, y + tilt[1] * half, half])
        if k % 2:
            start, end = end, start
        helix = _helix(start, end, rng.uniform(0, 2 * np.pi))
        if previous_end is not None:
            atoms.append(_loop(previous_end, helix[0], rng))
        atoms.append(helix)
        previous_end = helix[-1]
    return np.concatenate(atoms)


def _alpha_beta(rng: np.random.Generator, semi_axes: np.ndarray) -> np.ndarray:
    """A twisted β-sheet slab between two layers of helices, α/β/α (own frame)."""
    a, b, _ = semi_axes
    n_strands = max(int(2 * b / _STRAND_SPACING_A) - 1, 3)
    n_res = max(int(1.6 * a / _STRAND_RISE_A), 4)
    sheet = _sheet(n_strands, n_res, twist_deg=rng.uniform(4.0, 8.0))
    helices = [
        _helix(
            np.array([-0.7 * a, y, z]),
            np.array([0.7 * a, y + rng.normal(scale=3.0), z * rng.uniform(0.9, 1.1)]),
            rng.uniform(0, 2 * np.pi),
        )
        for z in (10.0, -10.0)  # helix axes ~10 Å from the sheet
        for y in (-0.45 * b, 0.45 * b)
    ]
    return _chain(rng, [sheet, *helices])


def _domain(rng: np.random.Generator, kind: str, centre: tuple, semi_axes: tuple) -> np.ndarray:
    """A domain of ``kind`` ("helical" or "alpha_beta"), randomly oriented at ``centre`` (Å)."""
    axes = np.asarray(semi_axes, dtype=float)
    build = _helix_bundle if kind == "helical" else _alpha_beta
    atoms = build(rng, axes)
    return atoms @ _rotation(rng).T + np.asarray(centre, dtype=float)


def _chain(rng: np.random.Generator, domains: list[np.ndarray]) -> np.ndarray:
    """Join domains into one chain with linker loops."""
    parts = [domains[0]]
    for domain in domains[1:]:
        parts.append(_loop(parts[-1][-1], domain[0], rng))
        parts.append(domain)
    return np.concatenate(parts)


def _hiv_like_subunit(rng: np.random.Generator) -> np.ndarray:
    """Capsid-like subunit: a helical N-terminal domain (inner ring) and an α/β C-terminal one."""
    ntd = _domain(rng, "helical", (34.0, 4.0, 14.0), (17.0, 14.0, 20.0))
    ctd = _domain(rng, "alpha_beta", (60.0, -12.0, -16.0), (16.0, 12.0, 11.0))
    arm = _domain(rng, "helical", (74.0, 14.0, 8.0), (8.0, 6.0, 11.0))
    return _chain(rng, [ntd, ctd, arm])


def _c6_hexamer(rng: np.random.Generator) -> np.ndarray:
    subunit = _hiv_like_subunit(rng)
    return np.concatenate([subunit @ _axis_rotation("z", 60.0 * j).T for j in range(6)])


def _asymmetric(rng: np.random.Generator) -> np.ndarray:
    domains = [
        _domain(rng, "helical", (-42.0, -12.0, 6.0), (22.0, 16.0, 24.0)),
        _domain(rng, "alpha_beta", (-2.0, 18.0, -12.0), (20.0, 15.0, 12.0)),
        _domain(rng, "helical", (34.0, -6.0, 22.0), (15.0, 13.0, 17.0)),
        _domain(rng, "alpha_beta", (22.0, -38.0, -22.0), (16.0, 12.0, 10.0)),
        _domain(rng, "helical", (62.0, 20.0, -8.0), (9.0, 7.0, 14.0)),
    ]
    return _chain(rng, domains)


def _d2_tetramer(rng: np.random.Generator) -> np.ndarray:
    subunit = _chain(
        rng,
        [
            _domain(rng, "alpha_beta", (26.0, 18.0, 20.0), (18.0, 14.0, 11.0)),
            _domain(rng, "helical", (44.0, -8.0, 34.0), (14.0, 11.0, 16.0)),
        ],
    )
    operators = [np.eye(3), _axis_rotation("z", 180), _axis_rotation("x", 180)]
    operators.append(operators[1] @ operators[2])
    return np.concatenate([subunit @ op.T for op in operators])


@dataclass(frozen=True)
class Phantom:
    """A built-in phantom: its point group (RELION name), seed and pseudo-atom builder."""

    symmetry: str
    seed: int
    description: str
    build: Callable[[np.random.Generator], np.ndarray]


PHANTOMS: dict[str, Phantom] = {
    "c6_hexamer": Phantom(
        "C6", 6061, "ring of six two-domain capsid-like subunits, ~170 Å wide", _c6_hexamer
    ),
    "asymmetric": Phantom("C1", 1011, "five-domain asymmetric complex, ~150 Å long", _asymmetric),
    "d2_tetramer": Phantom(
        "D2", 2022, "dimer of dimers of two-domain subunits, ~130 Å wide", _d2_tetramer
    ),
}


def phantom_atoms(name: str) -> np.ndarray:
    """Pseudo-atom coordinates ``(n, 3)`` xyz in Å (centred on their centre of mass)."""
    if name not in PHANTOMS:
        raise ValueError(f"unknown phantom {name!r}; choose from {', '.join(PHANTOMS)}")
    phantom = PHANTOMS[name]
    atoms = phantom.build(np.random.default_rng(phantom.seed))
    if phantom.symmetry == "C1":
        atoms = atoms - atoms.mean(axis=0)
    return atoms  # symmetric phantoms stay on their axes


def make_phantom(name: str, box: int, pixel_size_a: float) -> torch.Tensor:
    """Render phantom ``name`` on a ``box``³ grid of ``pixel_size_a`` -> ``(z, y, x)`` float32.

    The centre of the map (atom coordinate 0) is voxel ``box // 2``. Raises ValueError if the
    content does not fit inside a sphere of 0.7 box diameter.
    """
    atoms = torch.from_numpy(phantom_atoms(name))
    sigma_a = math.hypot(_ATOM_SIGMA_A, 0.5 * pixel_size_a)
    extent_a = float(atoms.norm(dim=1).max()) + 2.0 * sigma_a
    limit_a = 0.5 * _CONTENT_FRACTION * box * pixel_size_a
    if extent_a > limit_a:
        need = math.ceil(2.0 * extent_a / (_CONTENT_FRACTION * pixel_size_a))
        raise ValueError(
            f"phantom {name!r} reaches {extent_a:.0f} Å from its centre; a box of {box} at "
            f"{pixel_size_a:g} Å holds {limit_a:.0f} Å (use a box of at least {need})"
        )
    grid = (torch.arange(box, dtype=torch.float64) - box // 2) * pixel_size_a
    volume = torch.zeros(box, box, box, dtype=torch.float64)
    for chunk in atoms.split(256):
        gx, gy, gz = (
            torch.exp(-0.5 * ((grid - chunk[:, i, None]) / sigma_a) ** 2) for i in range(3)
        )
        volume += torch.einsum("az,ay,ax->zyx", gz, gy, gx)
    return (volume / volume.max()).float()
