"""Point groups with RELION's names and standard orientations; symmetrising maps.

Each group is built as RELION's ``SymList::fill_symmetry_class`` builds it: the same generators
(rotation axes, mirror planes, inversion, in xyz) closed under composition. Operators are
``(n, 3, 3)`` float64 matrices acting on xyz column vectors, identity first; improper ones
(mirrors, inversion) have determinant -1. A group is closed under inversion, so the set of
matrices is the same whether one reads them as acting on coordinates or transposed.

Maps are ``(s, s, s)`` real tensors in ``(z, y, x)`` order with the centre at voxel ``s // 2``.
Applying an operator ``M`` to a map gives ``V'(x) = V(Mᵀ x)``, done in Fourier space as
``F'(k) = F(Mᵀ k)`` with trilinear samples (:func:`denovo3d.fourier.sample_rfft`) of a transform
zero-padded in real space (4 times up to box 64: interpolation errors ~0.3 % of the map).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import lru_cache

import torch

from denovo3d.fourier import centred_irfft, centred_rfft, rfft_coords, sample_rfft

__all__ = [
    "PointGroup",
    "UnknownGroupError",
    "axis_rotation",
    "default_pad",
    "padded_rfft",
    "point_group",
    "rotate_map",
    "symmetrise",
]

_T2 = (0.0, 0.816496, 0.577350)
_I2 = [(2, (0, 0, 1)), (5, (0.525731114, 0, 0.850650807)), (3, (0, 0.356822076, 0.934172364))]
_I1 = [
    (2, (1, 0, 0)),
    (5, (0.85065080702670, 0, -0.5257311142635)),
    (3, (0.934172364, 0.3568220765, 0)),
]
_I3 = [
    (2, (-0.5257311143, 0, 0.8506508070)),
    (5, (0, 0, 1)),
    (3, (-0.4911234778630044, 0.3568220764705179, 0.7946544753759428)),
]
_I4 = [
    (2, (0.5257311143, 0, 0.8506508070)),
    (5, (0.8944271932547096, 0, 0.4472135909903704)),
    (3, (0.4911234778630044, 0.3568220764705179, 0.7946544753759428)),
]
# mirror-plane normals RELION adds for the I?H groups
_IH_MIRROR = {
    "I": (1, 0, 0),
    "I1": (0, 0, -1),
    "I2": (1, 0, 0),
    "I3": (0.850650807, 0, 0.525731114),
    "I4": (0.850650807, 0, -0.525731114),
}


class UnknownGroupError(ValueError):
    """A symmetry name that is not one of RELION's point groups."""


@dataclass(frozen=True)
class PointGroup:
    """A RELION point group: upper-case name, operators ``(n, 3, 3)`` float64, identity first."""

    name: str
    operators: torch.Tensor

    @property
    def order(self) -> int:
        return int(self.operators.shape[0])

    @property
    def is_proper(self) -> bool:
        """True when every operator is a rotation (no mirror or inversion)."""
        return bool((torch.linalg.det(self.operators) > 0).all())


def axis_rotation(axis: torch.Tensor, angle_rad: torch.Tensor) -> torch.Tensor:
    """Rotations ``(..., 3, 3)`` about ``axis (..., 3)`` (any length) by ``angle_rad (...)``."""
    axis = axis / axis.norm(dim=-1, keepdim=True)
    angle = torch.as_tensor(angle_rad, dtype=axis.dtype, device=axis.device)
    x, y, z = axis.unbind(-1)
    c, s = angle.cos(), angle.sin()
    C = 1 - c
    rows = [
        torch.stack([c + x * x * C, x * y * C - z * s, x * z * C + y * s], -1),
        torch.stack([y * x * C + z * s, c + y * y * C, y * z * C - x * s], -1),
        torch.stack([z * x * C - y * s, z * y * C + x * s, c + z * z * C], -1),
    ]
    return torch.stack(rows, -2)


def _rot(fold: int, axis: tuple[float, ...]) -> torch.Tensor:
    return axis_rotation(
        torch.tensor(axis, dtype=torch.float64),
        torch.tensor(2 * math.pi / fold, dtype=torch.float64),
    )


def _mirror(normal: tuple[float, ...]) -> torch.Tensor:
    n = torch.tensor(normal, dtype=torch.float64)
    n = n / n.norm()
    return torch.eye(3, dtype=torch.float64) - 2 * torch.outer(n, n)


def _close(generators: list[torch.Tensor]) -> torch.Tensor:
    """All products of the generators (breadth first), identity first: ``(n, 3, 3)``."""
    elements = [torch.eye(3, dtype=torch.float64)]
    keys = {_key(elements[0])}
    frontier = list(elements)
    while frontier:
        new = []
        for a in frontier:
            for g in generators:
                p = g @ a
                k = _key(p)
                if k not in keys:
                    keys.add(k)
                    elements.append(p)
                    new.append(p)
        frontier = new
        if len(elements) > 500:
            raise RuntimeError("generators do not close into a finite group")
    return torch.stack(elements)


def _key(m: torch.Tensor) -> tuple[int, ...]:
    return tuple(int(v) for v in torch.round(m.flatten() * 1e4).tolist())


def _generators(kind: str, n: int, variant: str) -> list[torch.Tensor]:
    """RELION's ``fill_symmetry_class`` generators for a parsed name."""
    z, x = (0, 0, 1), (1, 0, 0)
    inversion = -torch.eye(3, dtype=torch.float64)
    gens = {
        "C": lambda: [_rot(n, z)],
        "CI": lambda: [inversion],
        "CS": lambda: [_mirror(z)],
        "CV": lambda: [_rot(n, z), _mirror((0, 1, 0))],
        "CH": lambda: [_rot(n, z), _mirror(z)],
        "S": lambda: [_rot(n // 2, z), inversion],
        "D": lambda: [_rot(n, z), _rot(2, x)],
        "DV": lambda: [_rot(n, z), _rot(2, x), _mirror(x)],
        "DH": lambda: [_rot(n, z), _rot(2, x), _mirror(z)],
        "T": lambda: [_rot(3, z), _rot(2, _T2)],
        "TD": lambda: [_rot(3, z), _rot(2, _T2), _mirror((1.4142136, 2.4494897, 0.0))],
        "TH": lambda: [_rot(3, z), _rot(2, tuple(-v for v in _T2)), inversion],
        "O": lambda: [_rot(3, (1, 1, 1)), _rot(4, z)],
        "OH": lambda: [_rot(3, (1, 1, 1)), _rot(4, z), _mirror((0, 1, 1))],
    }
    if kind in ("I", "IH"):
        axes = {"I": _I2, "I1": _I1, "I2": _I2, "I3": _I3, "I4": _I4}[variant]
        out = [_rot(f, a) for f, a in axes]
        return out + ([_mirror(_IH_MIRROR[variant])] if kind == "IH" else [])
    return gens[kind]()


_PATTERNS = [
    (r"C(\d{1,2})", "C"),
    (r"CI", "CI"),
    (r"CS", "CS"),
    (r"C(\d{1,2})V", "CV"),
    (r"C(\d{1,2})H", "CH"),
    (r"S(\d{1,2})", "S"),
    (r"D(\d{1,2})", "D"),
    (r"D(\d{1,2})V", "DV"),
    (r"D(\d{1,2})H", "DH"),
    (r"T", "T"),
    (r"TD", "TD"),
    (r"TH", "TH"),
    (r"O", "O"),
    (r"OH", "OH"),
    (r"(I[1-5]?)", "I"),
    (r"(I[1-5]?)H", "IH"),
]


def point_group(name: str) -> PointGroup:
    """The point group called ``name`` (case-insensitive RELION name: C7, D2, T, O, I, I3, C4H...).

    Raises :class:`UnknownGroupError` for names RELION does not know (or does not implement: I5).
    """
    return _point_group(name.strip().upper())


@lru_cache(maxsize=128)
def _point_group(name: str) -> PointGroup:
    for pattern, kind in _PATTERNS:
        m = re.fullmatch(pattern, name)
        if m is None:
            continue
        n, variant = 1, ""
        if kind in ("I", "IH"):
            variant = m.group(1)
            if variant == "I5":
                raise UnknownGroupError(
                    f"symmetry {name}: RELION does not implement I5 (use I1-I4)"
                )
        elif m.groups():
            n = int(m.group(1))
            if n < 1:
                raise UnknownGroupError(f"symmetry {name}: the order must be at least 1")
            if kind == "S" and n % 2:
                raise UnknownGroupError(f"symmetry {name}: the order of an Sn group must be even")
        ops = _close(_generators(kind, n, variant))
        ops.flatten(1)[ops.flatten(1).abs() < 1e-12] = 0.0
        return PointGroup(name=name, operators=ops)
    raise UnknownGroupError(
        f"unknown symmetry group {name!r}; expected one of RELION's point groups: Cn, Ci, Cs, Cnv, "
        "Cnh, Sn, Dn, Dnv, Dnh, T, Td, Th, O, Oh, I, I1-I4, Ih, I1h-I4h (n up to 99)"
    )


def default_pad(box: int) -> int:
    """Padding factor for Fourier-space rotations: 4 up to box 64, 2 from box 128 (memory)."""
    return max(2, min(4, 256 // box))


def padded_rfft(volume: torch.Tensor, pad: int) -> torch.Tensor:
    """``(s, s, s)`` map -> ``(S, S, S//2+1)`` transform of the map zero-padded to ``S = pad*s``.

    No gridding correction: it would over-correct the operators that map the grid onto itself
    (permutations, 180° turns), which are then exact; finer padding keeps the others close.
    """
    s = volume.shape[-1]
    big = pad * s
    padded = volume.new_zeros(big, big, big)
    lo = big // 2 - s // 2
    padded[lo : lo + s, lo : lo + s, lo : lo + s] = volume
    return centred_rfft(padded)


def _transformed_fts(
    volume: torch.Tensor,
    matrices: torch.Tensor,
    shift_px: torch.Tensor | None = None,
    pad: int | None = None,
    chunk: int = 8,
) -> torch.Tensor:
    """Half-grid transforms ``(n, s, s, s//2+1)`` of ``V(Mᵀx + shift)``, one per ``M (n, 3, 3)``."""
    s = volume.shape[-1]
    pad = default_pad(s) if pad is None else pad
    ft = padded_rfft(volume, pad)
    k = rfft_coords(s, volume.device).to(volume.dtype)
    m = matrices.to(volume.dtype).to(volume.device)
    out = []
    for start in range(0, m.shape[0], chunk):
        q = torch.einsum("zyxi,nij->nzyxj", k, m[start : start + chunk])  # Mᵀk as rows: kᵀM
        f = sample_rfft(ft, q * pad)
        if shift_px is not None:
            phase = 2 * torch.pi * (q @ shift_px.to(q.dtype)) / s
            f = f * torch.polar(torch.ones_like(phase), phase)
        out.append(f)
    return torch.cat(out)


def rotate_map(
    volume: torch.Tensor, matrix: torch.Tensor, shift_px: torch.Tensor | None = None
) -> torch.Tensor:
    """``V'(x) = V(Mᵀ x + shift)``: turn a ``(s, s, s)`` map by ``M (3, 3)`` about the centre
    ``s // 2`` after moving the point ``centre + shift_px`` (xyz, pixels) to the centre."""
    ft = _transformed_fts(volume, matrix[None], shift_px)[0]
    return centred_irfft(ft, volume.shape[-1])


def symmetrise(volume: torch.Tensor, group: PointGroup | str) -> torch.Tensor:
    """Average of ``volume (s, s, s)`` over the operators of ``group`` (as RELION's ``--sym``)."""
    g = point_group(group) if isinstance(group, str) else group
    if g.order == 1:
        return volume.clone()
    s = volume.shape[-1]
    ft = volume.new_zeros(
        s,
        s,
        s // 2 + 1,
        dtype=torch.complex128 if volume.dtype == torch.float64 else torch.complex64,
    )
    for start in range(0, g.order, 8):
        ft += _transformed_fts(volume, g.operators[start : start + 8]).sum(0)
    return centred_irfft(ft / g.order, s)
