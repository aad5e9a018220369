"""Noise model and priors as running averages (relion-vdam-notes §1.7): σ² per shell, the offset
prior's variance, class fractions. ``mu`` is RELION's ``--mu`` (0.9 with mini-batches)."""

from __future__ import annotations

import torch

from denovo3d.engine.maximization import Accumulators
from denovo3d.engine.voxels import VoxelSet

__all__ = ["initial_sigma2", "update_class_fractions", "update_sigma2", "update_sigma2_offset"]


def initial_sigma2(data: torch.Tensor, ctf2: torch.Tensor, voxels: VoxelSet) -> torch.Tensor:
    """σ²(shell) ``(n,)`` float64 from the particles' power: ``Σ f·|D|² / (2·Σ f·C)`` per shell.

    ``data, ctf2 (b, s, s, s//2+1)``; ``voxels`` covers the whole box. It contains the signal too,
    so early likelihoods are flat (RELION's de-facto annealing). Empty shells copy a neighbour.
    """
    d = voxels.take(data)
    c = voxels.take(ctf2)
    n = voxels.box // 2 + 1
    keep = voxels.shell < n
    shell = voxels.shell[keep]
    f = voxels.friedel[keep].double()
    num = torch.zeros(n, dtype=torch.float64, device=data.device)
    den = torch.zeros_like(num)
    num.index_add_(0, shell, (d[:, keep].abs() ** 2).sum(0).double() * f)
    den.index_add_(0, shell, c[:, keep].sum(0).double() * f)
    return _fill(num / (2 * den.clamp_min(1e-30)), den > 0)


def _fill(values: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
    """Replace entries where ``ok`` is False (or values ≤ 0) by the nearest lower good shell."""
    out = values.clone()
    good = ok & (values > 0)
    last = float(values[good][0]) if bool(good.any()) else 1.0
    for i in range(values.numel()):
        if bool(good[i]):
            last = float(out[i])
        else:
            out[i] = last
    return out


def update_sigma2(sigma2: torch.Tensor, acc: Accumulators, mu: float) -> torch.Tensor:
    """``σ² ← μ·σ² + (1 − μ)·Σ w|D − C·P|² / (2·Σ w·C)`` for shells with data; others keep."""
    has = acc.sigma2_den > 0
    fresh = acc.sigma2_num / (2 * acc.sigma2_den.clamp_min(1e-30))
    new = torch.where(has, mu * sigma2 + (1 - mu) * fresh, sigma2)
    return new.clamp_min(1e-30)


def update_sigma2_offset(sigma2_offset_px: float, acc: Accumulators, mu: float) -> float:
    """Offset prior variance per axis (px²): ``μ·old + (1 − μ)·Σ w|t|² / (3·n)``."""
    if acc.n_particles == 0:
        return sigma2_offset_px
    fresh = float(acc.offset_sq) / (3 * acc.n_particles)
    return mu * sigma2_offset_px + (1 - mu) * max(fresh, 1e-2)


def update_class_fractions(pdf_class: torch.Tensor, acc: Accumulators, mu: float) -> torch.Tensor:
    """``pdf ← μ·pdf + (1 − μ)·Σ_i w_ik / n``, renormalised."""
    if acc.n_particles == 0:
        return pdf_class
    fresh = acc.class_weight / acc.n_particles
    new = mu * pdf_class + (1 - mu) * fresh.to(pdf_class)
    return new / new.sum()
