"""M-step sums: residual back-projection into per-class, per-half-set accumulators, and the
sufficient statistics of σ², class fractions and the offset prior.

For the kept samples e = (particle i, class k, rotation o, offset t, weight w), grouped by
(k, half-set, o) so that each rotation is splatted once:

    data[k,h]   += splat_{A_o}( Σ_e w·(D_i·e^{+2πi k·t/s} − C_i·P_o) / σ² )
    weight[k,h] += splat_{A_o}( Σ_e w·C_i / σ² )

(RELION's premultiplied-data back-projection, no division by the multiplicity), with the half-grid
Friedel weights folded in (:func:`~denovo3d.engine.projector.splat`), so the
accumulators are full-space sums on the half grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from denovo3d.engine.expectation import Alignment, PassGrid, project
from denovo3d.engine.projector import splat
from denovo3d.memory import WORKING_SET_BYTES

__all__ = ["Accumulators", "accumulate"]


@dataclass
class Accumulators:
    """Sums of one mini-batch. ``data (K, 2, S, S, S//2+1)`` complex, ``weight`` (same, real);
    ``sigma2_num, sigma2_den (n_shells,)``: Σ w·f·|D − C·P|² and Σ w·f·C per shell;
    ``class_weight (K,)``; ``offset_sq`` Σ w·|t|² (px²) and ``n_particles``."""

    data: torch.Tensor
    weight: torch.Tensor
    sigma2_num: torch.Tensor
    sigma2_den: torch.Tensor
    class_weight: torch.Tensor
    offset_sq: torch.Tensor
    n_particles: int = 0

    @classmethod
    def zeros(cls, K: int, box: int, n_shells: int, like: torch.Tensor) -> Accumulators:
        shape = (K, 2, box, box, box // 2 + 1)
        real = like.real.dtype
        dev = like.device
        return cls(
            torch.zeros(shape, dtype=like.dtype, device=dev),
            torch.zeros(shape, dtype=real, device=dev),
            torch.zeros(n_shells, dtype=torch.float64, device=dev),
            torch.zeros(n_shells, dtype=torch.float64, device=dev),
            torch.zeros(K, dtype=torch.float64, device=dev),
            torch.zeros((), dtype=torch.float64, device=dev),
        )


def accumulate(
    acc: Accumulators,
    data: torch.Tensor,
    ctf2: torch.Tensor,
    half: torch.Tensor,
    alignment: Alignment,
    refs_full: torch.Tensor,
    grid: PassGrid,
    sigma2: torch.Tensor,
    budget_bytes: int = 1 << 30,
) -> None:
    """Add a batch to ``acc`` in place.

    ``data (b, V)`` complex, ``ctf2 (b, V)`` on ``grid.voxels`` (the fine pass); ``half (b,)``
    0/1; ``alignment`` from :func:`~denovo3d.engine.expectation.align`; ``sigma2 (n_shells,)``.
    """
    vox = grid.voxels
    n_orient = grid.rotations.shape[0]
    K = refs_full.shape[0]
    box = acc.data.shape[-2]
    inv_s2 = 1.0 / sigma2.to(vox.coords)[vox.shell]  # (V,)
    splat_w = 0.5 * vox.friedel * inv_s2
    cls = alignment.ko // n_orient
    key = (cls * 2 + half[alignment.particle]) * n_orient + alignment.ko % n_orient
    order = torch.argsort(key, stable=True)
    key = key[order]
    groups, inverse = torch.unique_consecutive(key, return_inverse=True)
    entry_cost = 8 * len(vox) * 6
    max_entries = max(1, min(budget_bytes, WORKING_SET_BYTES) // entry_cost)
    t_union, t_pos = torch.unique(alignment.offset, return_inverse=True)
    phases = grid.phases(t_union)  # only the offsets in use
    e0 = 0
    while e0 < key.numel():
        # a chunk of whole groups
        g0 = int(inverse[e0])
        e1 = min(key.numel(), e0 + max_entries)
        if e1 < key.numel():
            g_end = int(inverse[e1])
            e1 = int(torch.searchsorted(inverse, torch.tensor(g_end, device=inverse.device)))
            if e1 <= e0:  # one group larger than the chunk: take it whole
                e1 = int(torch.searchsorted(inverse, torch.tensor(g0 + 1, device=inverse.device)))
        sel = order[e0:e1]
        local = inverse[e0:e1] - g0
        g_keys = groups[g0 : int(inverse[e1 - 1]) + 1]
        part = alignment.particle[sel]
        w = alignment.weight[sel].to(vox.coords)
        shifted = data[part] * phases[t_pos[sel]]  # (n, V)
        c = ctf2[part]
        n_g = g_keys.numel()
        data_g = shifted.new_zeros((n_g, len(vox))).index_add_(0, local, w[:, None] * shifted)
        ctf_g = c.new_zeros((n_g, len(vox))).index_add_(0, local, w[:, None] * c)
        g_cls = g_keys // (2 * n_orient)
        g_half = (g_keys // n_orient) % 2
        g_rot = grid.rotations[g_keys % n_orient].to(vox.coords)
        proj_g = torch.empty((n_g, len(vox)), dtype=data.dtype, device=data.device)
        for k in range(K):
            mine = torch.nonzero(g_cls == k).squeeze(1)
            if mine.numel():
                proj_g[mine] = project(refs_full[k : k + 1], g_rot[mine], vox)[0]
        resid = shifted - c * proj_g[local]
        power = (resid.real**2 + resid.imag**2) * (w[:, None] * vox.friedel)
        acc.sigma2_num.index_add_(0, vox.shell, power.sum(0).double())
        acc.sigma2_den.index_add_(0, vox.shell, (c * (w[:, None] * vox.friedel)).sum(0).double())
        acc.class_weight.index_add_(0, alignment.ko[sel] // n_orient, w.double())
        offsets = grid.offsets_px[alignment.offset[sel]]
        acc.offset_sq += (w.double() * (offsets.double() ** 2).sum(1)).sum()
        values = (data_g - ctf_g * proj_g) * splat_w
        weights = ctf_g * splat_w
        radius = min(vox.radius, vox.box / 2)
        for k in range(K):
            for h in range(2):
                mine = torch.nonzero((g_cls == k) & (g_half == h)).squeeze(1)
                if mine.numel():
                    rot = g_rot[mine]
                    d, w = splat(values[mine], weights[mine], rot, vox.coords, radius, box)
                    acc.data[k, h] += d
                    acc.weight[k, h] += w
        e0 = e1
    acc.n_particles += int(data.shape[0])
