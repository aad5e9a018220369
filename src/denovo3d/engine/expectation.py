"""E-step: pose scores as matrix products, posteriors, significance pruning, coarse-to-fine.

The exact pseudo-subtomogram log-likelihood (DESIGN §4) of particle i at pose (class, rotation
o, offset t), summed over the voxels of a :class:`VoxelSet` with Friedel weights f:

    L = Σ_k f·[ Re(conj(D_i(k)·e^{+2πi k·t/s}) · P_o(k)) − ½ C_i(k)·|P_o(k)|² ] / σ²(|k|)

with ``P_o(k) = F(k @ A_o)`` the rotated reference. Pass 1 (coarse grid, coarse voxels): cross
terms by one real GEMM ``[b·T, 2V] @ [2V, K·O]``, norms by ``[b, V] @ [V, K·O]``. Pass 2 (fine):
for each particle the children of its significant coarse rotations × the children of its
significant coarse offsets, as a batched GEMM over particles. Posteriors are a softmax per
particle; the kept samples carry ``fraction`` of the weight.

Orientation indices run over classes: ``ko = k·O + o`` (coarse and fine grids alike), and fine
indices are children of coarse ones: ``fine = 8·coarse + child``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from denovo3d.engine.projector import rotate
from denovo3d.engine.voxels import VoxelSet

__all__ = [
    "Alignment",
    "PassGrid",
    "Search",
    "align",
    "coarse_scores",
    "fine_search",
    "project",
    "significant_mask",
]


@dataclass(frozen=True)
class PassGrid:
    """What one pass searches: rotations ``A (O, 3, 3)``, offsets ``(T, 3)`` in pixels of the
    particle box ``box_px``, the voxels, and ``inv_sigma2 (V,)`` = Friedel weight / σ²(shell)."""

    rotations: torch.Tensor
    offsets_px: torch.Tensor
    voxels: VoxelSet
    inv_sigma2: torch.Tensor
    box_px: int

    def phases(self, index: torch.Tensor | None = None) -> torch.Tensor:
        """``(T, V)`` complex ``exp(+2πi k·t/box_px)`` (only offsets ``index`` if given)."""
        offsets = self.offsets_px if index is None else self.offsets_px[index]
        return self.voxels.phases(offsets, self.box_px)


@dataclass(frozen=True)
class Alignment:
    """E-step result for a batch of ``b`` particles.

    Kept samples (``N`` entries): ``particle, ko, offset (N,)`` int64 (fine indices), ``weight
    (N,)`` float (normalised per particle). Per particle ``(b,)``: ``best_ko, best_offset``,
    ``max_prob``, ``n_significant``, ``log_evidence`` (logsumexp of the fine scores).
    """

    particle: torch.Tensor
    ko: torch.Tensor
    offset: torch.Tensor
    weight: torch.Tensor
    best_ko: torch.Tensor
    best_offset: torch.Tensor
    max_prob: torch.Tensor
    n_significant: torch.Tensor
    log_evidence: torch.Tensor


def project(refs_full: torch.Tensor, rotations: torch.Tensor, voxels: VoxelSet) -> torch.Tensor:
    """Rotated references ``P[k, o, v] = F_k(k_v @ A_o)``: full centred references
    ``(K, 2, S, S, S)`` (:func:`~denovo3d.engine.projector.full_centred`), rotations
    ``(O, 3, 3)`` -> ``(K, O, V)`` complex (trilinear, :func:`~.projector.rotate`)."""
    return rotate(refs_full, rotations, voxels.coords, min(voxels.radius, voxels.box / 2))


def _real(z: torch.Tensor) -> torch.Tensor:
    """``(..., V)`` complex -> ``(..., 2V)`` real (re, im interleaved)."""
    return torch.view_as_real(z).reshape(*z.shape[:-1], 2 * z.shape[-1])


def coarse_scores(
    data: torch.Tensor,
    ctf2: torch.Tensor,
    proj: torch.Tensor,
    grid: PassGrid,
    log_prior: torch.Tensor,
) -> torch.Tensor:
    """Scores ``(b, T, KO)`` of every coarse pose.

    ``data (b, V)`` complex and ``ctf2 (b, V)`` on ``grid.voxels``; ``proj (KO, V)``;
    ``log_prior (T, KO)`` (offset + class/orientation priors).
    """
    b, T = data.shape[0], grid.offsets_px.shape[0]
    phases = grid.phases()  # (T, V)
    shifted = (data * grid.inv_sigma2)[:, None, :] * phases[None]  # (b, T, V)
    cross = _real(shifted).reshape(b * T, -1) @ _real(proj).T  # one real GEMM
    norm = (0.5 * ctf2 * grid.inv_sigma2) @ (proj.real**2 + proj.imag**2).T  # (b, KO)
    return cross.reshape(b, T, -1) - norm[:, None, :] + log_prior[None]


def significant_mask(prob: torch.Tensor, fraction: float, max_count: int) -> torch.Tensor:
    """``prob (b, N)`` normalised rows -> bool ``(b, N)``: the largest samples whose weights sum
    to ``fraction`` (the one that crosses it included), at most ``max_count`` per row."""
    sorted_p, order = prob.sort(dim=1, descending=True)
    before = sorted_p.cumsum(dim=1) - sorted_p
    keep_sorted = before < fraction
    keep_sorted[:, max_count:] = False
    keep_sorted[:, 0] = True
    return torch.zeros_like(keep_sorted).scatter(1, order, keep_sorted)


def _padded_rows(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Column indices of the True entries per row, padded: ``(b, n_max)`` index and valid mask."""
    n_max = int(mask.sum(dim=1).max())
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :n_max]
    return order, mask.gather(1, order)


def _children(parents: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(b, n)`` parents -> ``(b, 8n)`` children ``8p + c`` and their validity."""
    kids = (8 * parents[:, :, None] + torch.arange(8, device=parents.device)).reshape(
        parents.shape[0], -1
    )
    return kids, valid.repeat_interleave(8, dim=1)


def fine_search(
    data: torch.Tensor,
    ctf2: torch.Tensor,
    refs_full: torch.Tensor,
    coarse_sig: torch.Tensor,
    grid: PassGrid,
    log_prior_offset: torch.Tensor,
    log_prior_ko: torch.Tensor,
    fraction: float,
    budget_bytes: int,
) -> Alignment:
    """Pass 2 around the significant coarse samples ``coarse_sig (b, T_c, KO_c)`` bool.

    ``data, ctf2 (b, V)`` on ``grid.voxels`` (fine); ``grid.rotations (O_f, 3, 3)`` fine grid of
    one class (children order); ``log_prior_offset (T_f,)``; ``log_prior_ko (KO_f,)``.
    """
    b = data.shape[0]
    n_orient = grid.rotations.shape[0]
    o_idx, o_ok = _children(*_padded_rows(coarse_sig.any(dim=1)))  # (b, n_o)
    t_idx, t_ok = _children(*_padded_rows(coarse_sig.any(dim=2)))  # (b, n_t)
    union = torch.unique(o_idx[o_ok])
    proj_u = torch.empty((union.numel(), len(grid.voxels)), dtype=data.dtype, device=data.device)
    for k in range(refs_full.shape[0]):
        sel = torch.nonzero(union // n_orient == k).squeeze(1)
        if sel.numel():
            rot = grid.rotations[union[sel] % n_orient]
            proj_u[sel] = project(refs_full[k : k + 1], rot, grid.voxels)[0]
    pos = torch.searchsorted(union, o_idx.clamp(max=int(union.max())))
    t_union = torch.unique(t_idx[t_ok])
    phases = grid.phases(t_union)  # (T_used, V): only the offsets some particle needs
    t_pos = torch.searchsorted(t_union, t_idx.clamp(max=int(t_union.max())))
    n_o_all, n_t_all = o_ok.sum(dim=1), t_ok.sum(dim=1)
    order = torch.argsort(n_o_all * n_t_all)  # similar sizes share a group: little padding
    V = len(grid.voxels)
    parts, g0 = [], 0
    while g0 < b:
        rows = order[g0 : g0 + 64]
        n_o, n_t = int(n_o_all[rows].max()), int(n_t_all[rows].max())
        per_particle = 8 * V * (3 * n_o + 2 * n_t) + 16 * n_o * n_t
        rows = rows[: max(1, budget_bytes // per_particle)]
        n_o, n_t = int(n_o_all[rows].max()), int(n_t_all[rows].max())
        proj = proj_u[pos[rows, :n_o]]  # (g, n_o, V)
        y = (data[rows] * grid.inv_sigma2)[:, None, :] * phases[t_pos[rows, :n_t]]
        cross = torch.bmm(_real(y), _real(proj).transpose(1, 2))  # (g, n_t, n_o)
        power = (proj.real**2 + proj.imag**2).transpose(1, 2)
        norm = torch.bmm((0.5 * ctf2[rows] * grid.inv_sigma2)[:, None, :], power)
        scores = (
            cross
            - norm
            + log_prior_offset[t_idx[rows, :n_t]][:, :, None]
            + log_prior_ko[o_idx[rows, :n_o]][:, None, :]
        )
        valid = t_ok[rows, :n_t, None] & o_ok[rows, None, :n_o]
        scores = scores.masked_fill(~valid, float("-inf"))
        parts.append(
            (_posteriors(scores, rows, o_idx[rows, :n_o], t_idx[rows, :n_t], fraction), rows)
        )
        g0 += rows.numel()
    return _merge(parts, b)


def _posteriors(
    scores: torch.Tensor,
    rows: torch.Tensor,
    o_idx: torch.Tensor,
    t_idx: torch.Tensor,
    fraction: float,
) -> Alignment:
    """Softmax of ``scores (g, n_t, n_o)`` per particle, the kept samples and the best one."""
    g, _, n_o = scores.shape
    flat_scores = scores.reshape(g, -1)
    log_evidence = torch.logsumexp(flat_scores, dim=1)
    prob = torch.exp(flat_scores - log_evidence[:, None])
    keep = significant_mask(prob, fraction, prob.shape[1])
    local, flat = torch.nonzero(keep, as_tuple=True)
    weight = prob[local, flat]
    weight = weight / torch.zeros_like(log_evidence).index_add_(0, local, weight)[local]
    best = prob.argmax(dim=1)
    ar = torch.arange(g, device=scores.device)
    return Alignment(
        particle=rows[local],
        ko=o_idx[local, flat % n_o],
        offset=t_idx[local, flat // n_o],
        weight=weight,
        best_ko=o_idx[ar, best % n_o],
        best_offset=t_idx[ar, best // n_o],
        max_prob=prob[ar, best],
        n_significant=keep.sum(dim=1),
        log_evidence=log_evidence,
    )


_PER_PARTICLE = ("best_ko", "best_offset", "max_prob", "n_significant", "log_evidence")


def _merge(parts: list[tuple[Alignment, torch.Tensor]], b: int) -> Alignment:
    """Groups of particles ``(alignment, rows of the batch)`` -> one batch Alignment."""
    rows = torch.cat([r for _, r in parts])
    fields = {}
    for name in Alignment.__dataclass_fields__:
        values = torch.cat([getattr(p, name) for p, _ in parts])
        if name in _PER_PARTICLE:
            out = values.new_empty(b)
            out[rows] = values
            values = out
        fields[name] = values
    return Alignment(**fields)


@dataclass(frozen=True)
class Search:
    """Both passes and the priors: ``log_pdf_class (K,)``, offset prior variance per axis
    (px²), the kept weight ``fraction`` (0.999), ``max_significant`` coarse samples per particle,
    and the memory budget for temporaries."""

    coarse: PassGrid
    fine: PassGrid
    log_pdf_class: torch.Tensor
    sigma2_offset_px: float
    fraction: float = 0.999
    max_significant: int = 100
    budget_bytes: int = 1 << 30

    def log_prior_offset(self, offsets_px: torch.Tensor) -> torch.Tensor:
        return -(offsets_px**2).sum(dim=1).to(self.log_pdf_class) / (2 * self.sigma2_offset_px)

    def log_prior_ko(self, n_orient: int) -> torch.Tensor:
        return self.log_pdf_class.repeat_interleave(n_orient)


def _cat(parts: list[Alignment], starts: list[int]) -> Alignment:
    fields = {}
    for name in Alignment.__dataclass_fields__:
        values = [getattr(p, name) for p in parts]
        if name == "particle":
            values = [v + s0 for v, s0 in zip(values, starts, strict=True)]
        fields[name] = torch.cat(values)
    return Alignment(**fields)


def _union_groups(
    sig: torch.Tensor, bytes_orientation: int, bytes_offset: int, budget_bytes: int
) -> list[tuple[int, int]]:
    """Consecutive groups of particles whose significant coarse samples ``sig (b, T_c, KO_c)``
    bool need at most ``budget_bytes`` together (one particle alone may pass it), at
    ``bytes_orientation`` per coarse orientation and ``bytes_offset`` per coarse offset of the
    group's union: the fine pass projects and phase-shifts each group's union at once."""
    groups, g0, b = [], 0, sig.shape[0]
    orient, offset = sig.any(dim=1).to(torch.int32), sig.any(dim=2).to(torch.int32)
    while g0 < b:
        n_o = torch.cummax(orient[g0:], dim=0).values.sum(dim=1)
        n_t = torch.cummax(offset[g0:], dim=0).values.sum(dim=1)
        cost = n_o * bytes_orientation + n_t * bytes_offset  # grows with the group
        g1 = g0 + max(1, int((cost <= budget_bytes).sum()))
        groups.append((g0, g1))
        g0 = g1
    return groups


def align(
    data: torch.Tensor, ctf2: torch.Tensor, refs_full: torch.Tensor, search: Search
) -> Alignment:
    """Coarse then fine search for a batch.

    ``data (b, s, s, s//2+1)`` complex and ``ctf2`` (same shape) at the box both VoxelSets index;
    ``refs_full (K, 2, S, S, S)`` the references' full centred transforms (zero beyond the
    current radius). Temporaries stay under ``search.budget_bytes``: coarse scores by chunks of
    particles, fine projections by groups whose union of orientations fits.
    """
    c_grid, f_grid = search.coarse, search.fine
    K = refs_full.shape[0]
    proj = project(refs_full, c_grid.rotations, c_grid.voxels).reshape(
        K * len(c_grid.rotations), -1
    )
    log_prior = (
        search.log_prior_offset(c_grid.offsets_px)[:, None]
        + search.log_prior_ko(len(c_grid.rotations))[None, :]
    )
    prior_t_fine = search.log_prior_offset(f_grid.offsets_px)
    prior_ko_fine = search.log_prior_ko(len(f_grid.rotations))
    T, KO, V = c_grid.offsets_px.shape[0], proj.shape[0], len(c_grid.voxels)
    per_particle = 4 * (T * KO * 3 + T * V * 6)
    chunk = max(1, min(data.shape[0], search.budget_bytes // per_particle))
    parts, starts = [], []
    for s in range(0, data.shape[0], chunk):
        d, c = data[s : s + chunk], ctf2[s : s + chunk]
        scores = coarse_scores(
            c_grid.voxels.take(d), c_grid.voxels.take(c), proj, c_grid, log_prior
        )
        prob = torch.softmax(scores.reshape(scores.shape[0], -1), dim=1)
        sig = significant_mask(prob, search.fraction, search.max_significant).reshape(scores.shape)
        del scores, prob
        per_sample = 8 * 8 * len(f_grid.voxels)  # 8 children, complex64
        for g0, g1 in _union_groups(sig, per_sample, per_sample, search.budget_bytes):
            parts.append(
                fine_search(
                    f_grid.voxels.take(d[g0:g1]),
                    f_grid.voxels.take(c[g0:g1]),
                    refs_full,
                    sig[g0:g1],
                    f_grid,
                    prior_t_fine,
                    prior_ko_fine,
                    search.fraction,
                    search.budget_bytes,
                )
            )
            starts.append(s + g0)
    return _cat(parts, starts)
