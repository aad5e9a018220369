"""Tilt-series geometry and RELION's pseudo-subtomogram insertion (``relion_tomo_subtomo``).

Frames: a tilt image ``f`` is the projection along the beam of the particle rotated by
``R_f`` (a rotation about y by the tilt angle), so its 2D transform is the central slice of the
particle's 3D transform on the plane ``k = R_fᵀ (kx, ky, 0)`` (RELION's ``projPart`` rows u, v).

Insertion (``FourierBackprojection::backprojectSlice_forward_with_multiplicity``, RELION 4.0):
every 2D half-grid point ``(x, ky)`` with ``x < xRange(ky)`` (inside the circle of radius s/2 and
where the dose weight exceeds ``cutoff_fraction``; the x = 0 column only for ky ≥ 0) goes to
``pos3 = R_fᵀ (x, ky, 0)``; if ``pos3.x < 0`` it is negated and the value conjugated; it is then
splatted trilinearly with weight ``m = fx·fy·fz`` into the 3D half grid: ``D += m·value``,
``C += m·c²``, ``M += m``, and every corner on the x = 0 plane also adds the conjugate to its
Friedel mate. The geometry is the same for every particle of a tilt series, so the insertion
is one sparse matrix, applied to all particles of a batch at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["SliceInsertion", "TiltScheme", "dose_symmetric_order", "tilt_rotations"]


def dose_symmetric_order(n_negative: int, n_positive: int) -> list[int]:
    """Acquisition order of the dose-symmetric scheme (Hagen et al. 2017) as signed steps.

    Start at 0, one step to the positive side, then alternate sides in groups of two:
    0, +1, −1, −2, +2, +3, −3, −4, ... When one side runs out the other side finishes.
    """
    pos = list(range(1, n_positive + 1))
    neg = [-i for i in range(1, n_negative + 1)]
    order = [0]
    if pos:
        order.append(pos.pop(0))
    side = neg
    while pos or neg:
        group = side[:2] if side else []
        del side[: len(group)]
        order.extend(group)
        side = pos if side is neg else neg
    return order


@dataclass(frozen=True)
class TiltScheme:
    """Tilt angles (degrees, ascending, as tomograms.star lists them) and pre-exposure (e/Å²)."""

    tilt_angles_deg: torch.Tensor  # (f,) float64
    pre_exposure_e_per_a2: torch.Tensor  # (f,) float64: dose received before this image

    @classmethod
    def dose_symmetric(
        cls, tilt_min_deg: float, tilt_max_deg: float, step_deg: float, dose_per_tilt: float
    ) -> TiltScheme:
        """Tilts ``min..max`` every ``step`` (0 included), collected dose-symmetrically."""
        if step_deg <= 0 or tilt_min_deg > 0 or tilt_max_deg < 0:
            raise ValueError(
                f"tilt range must contain 0 and the step be positive, got "
                f"{tilt_min_deg}..{tilt_max_deg} step {step_deg}"
            )
        n_neg = int(-tilt_min_deg // step_deg + 1e-9)
        n_pos = int(tilt_max_deg // step_deg + 1e-9)
        order = dose_symmetric_order(n_neg, n_pos)
        steps = torch.arange(-n_neg, n_pos + 1, dtype=torch.float64)
        rank = {s: i for i, s in enumerate(order)}
        exposure = torch.tensor([rank[int(s)] * dose_per_tilt for s in steps], dtype=torch.float64)
        return cls(steps * step_deg, exposure)

    @property
    def n_tilts(self) -> int:
        return int(self.tilt_angles_deg.numel())


def tilt_rotations(tilt_angles_deg: torch.Tensor) -> torch.Tensor:
    """Rotations about y ``(f, 3, 3)`` float64: ``R = [[c, 0, s], [0, 1, 0], [-s, 0, c]]``."""
    t = torch.deg2rad(torch.as_tensor(tilt_angles_deg, dtype=torch.float64))
    c, s, z, o = t.cos(), t.sin(), torch.zeros_like(t), torch.ones_like(t)
    return torch.stack(
        [torch.stack([c, z, s], -1), torch.stack([z, o, z], -1), torch.stack([-s, z, c], -1)], -2
    )


def slice_frequencies(box: int, rotations: torch.Tensor) -> torch.Tensor:
    """3D frequencies ``(f, s, s//2+1, 3)`` (xyz, cycles per box) of each tilt's 2D half grid."""
    ky = torch.fft.fftfreq(box, 1.0 / box, dtype=torch.float64)
    kx = torch.arange(box // 2 + 1, dtype=torch.float64)
    yy, xx = torch.meshgrid(ky, kx, indexing="ij")
    k2 = torch.stack([xx, yy, torch.zeros_like(xx)], -1)  # (s, h, 3)
    return torch.einsum("fji,yxj->fyxi", rotations, k2)  # R_fᵀ k


class SliceInsertion:
    """RELION's forward insertion of 2D tilt slices into a 3D half grid, as sparse matrices.

    ``insert(values)`` maps 2D slices ``(b, f, s, s//2+1)`` complex to ``(b, s, s, s//2+1)``;
    ``insert_weights(w)`` does the same for real weights (c², or c, or 1) without conjugation.
    ``multiplicity`` is M ``(s, s, s//2+1)``, shared by all particles of the tilt series.
    ``inserted`` ``(f, s, s//2+1)`` marks the 2D points that are inserted.
    """

    def __init__(self, box: int, rotations: torch.Tensor, inserted: torch.Tensor) -> None:
        s, h = box, box // 2 + 1
        n_tilts = rotations.shape[0]
        self.box = box
        self.inserted = inserted
        pos = slice_frequencies(box, rotations)  # (f, s, h, 3)
        source = torch.arange(n_tilts * s * h).reshape(n_tilts, s, h)
        pos, source = pos[inserted], source[inserted]  # (p, 3), (p,)
        conj = pos[:, 0] < 0
        pos = torch.where(conj[:, None], -pos, pos)
        base = torch.floor(pos).long()
        rows, cols, weights, conjs = [], [], [], []
        for dz in (0, 1):
            for dy in (0, 1):
                for dx in (0, 1):
                    corner = base + torch.tensor([dx, dy, dz])
                    w = (1 - (pos - corner).abs()).prod(-1)
                    ok = (
                        (corner[:, 0] < h)
                        & (corner[:, 1] >= -s // 2)
                        & (corner[:, 1] < s // 2)
                        & (corner[:, 2] >= -s // 2)
                        & (corner[:, 2] < s // 2)
                    )
                    xi, yi, zi = corner[ok, 0], corner[ok, 1] % s, corner[ok, 2] % s
                    rows.append((zi * s + yi) * h + xi)
                    cols.append(source[ok])
                    weights.append(w[ok])
                    conjs.append(conj[ok])
                    on_plane = xi == 0  # Friedel mate on the x = 0 plane, conjugated
                    rows.append(((-zi[on_plane]) % s * s + (-yi[on_plane]) % s) * h)
                    cols.append(source[ok][on_plane])
                    weights.append(w[ok][on_plane])
                    conjs.append(~conj[ok][on_plane])
        row, col = torch.cat(rows), torch.cat(cols)
        weight, is_conj = torch.cat(weights), torch.cat(conjs)
        shape = (s * s * h, n_tilts * s * h)

        def sparse(values: torch.Tensor) -> torch.Tensor:
            index = torch.stack([row, col])
            coo = torch.sparse_coo_tensor(index, values.float(), shape, check_invariants=True)
            return coo.coalesce()

        self._sum = sparse(weight)  # S_plain + S_conj
        self._diff = sparse(torch.where(is_conj, -weight, weight))  # S_plain − S_conj
        ones = torch.ones(shape[1], 1)
        self.multiplicity = (self._sum @ ones).reshape(s, s, h)

    def _apply(self, matrix: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        b = values.shape[0]
        flat = values.reshape(b, -1).T.contiguous().float()  # (p, b)
        return (matrix @ flat).T.reshape(b, self.box, self.box, self.box // 2 + 1)

    def insert(self, values: torch.Tensor) -> torch.Tensor:
        """Complex slices ``(b, f, s, s//2+1)`` -> 3D sums ``(b, s, s, s//2+1)`` complex64."""
        return torch.complex(
            self._apply(self._sum, values.real), self._apply(self._diff, values.imag)
        )

    def insert_weights(self, weights: torch.Tensor) -> torch.Tensor:
        """Real per-slice weights ``(b, f, s, s//2+1)`` -> ``(b, s, s, s//2+1)`` float32."""
        return self._apply(self._sum, weights)
