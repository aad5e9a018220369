"""E-step: pose scores as matrix products, posteriors, significance pruning, coarse-to-fine.

The exact pseudo-subtomogram log-likelihood (DESIGN §4) of particle i at pose (class, rotation
o, offset t), summed over the voxels of a :class:`VoxelSet` with Friedel weights f:

    L = Σ_k f·[ Re(conj(D_i(k)·e^{+2πi k·t/s}) · P_o(k)) − ½ C_i(k)·|P_o(k)|² ] / σ²(|k|)

with ``P_o(k) = F(k @ A_o)`` the rotated reference. Pass 1 (coarse grid, coarse voxels): cross
terms by one real GEMM ``[b·T, 2V] @ [2V, K·O]``, norms by ``[b, V] @ [V, K·O]``. Pass 2 (fine):
for each particle the children of its significant coarse rotations × the children of its
significant coarse offsets, as a batched GEMM over particles (on the CPU one native kernel,
``torch.ops.denovo3d.fine_scores``, that builds each particle's data rows block by block in
cache). Posteriors are a softmax per particle; the kept samples carry ``fraction`` of the
weight.

Orientation indices run over classes: ``ko = k·O + o`` (coarse and fine grids alike), and fine
indices are children of coarse ones: ``fine = 8·coarse + child``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import torch

from denovo3d.engine import native
from denovo3d.engine.projector import rotate
from denovo3d.engine.voxels import VoxelSet
from denovo3d.memory import WORKING_SET_BYTES, Workspace

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


_KEPT_PHASES = 1 << 21  # complex entries (16 MB): a grid keeps its phase table up to this size


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
        """``(T, V)`` complex ``exp(+2πi k·t/box_px)`` (only offsets ``index`` if given; all of
        them kept by the grid when small, as the coarse pass's: it asks for every chunk)."""
        if index is not None:
            return self.phases_at(self.offsets_px[index])
        if self.offsets_px.shape[0] * len(self.voxels) <= _KEPT_PHASES:
            return self._all_phases
        return self.phases_at(self.offsets_px)

    @cached_property
    def _all_phases(self) -> torch.Tensor:
        return self.phases_at(self.offsets_px)

    def phases_at(self, offsets_px: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``(T, V)`` complex ``exp(+2πi k·t/box_px)`` for any offsets ``(T, 3)`` px (into
        ``out`` if given)."""
        return self.voxels.phases(offsets_px, self.box_px, out=out)


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


def project(
    refs_full: torch.Tensor,
    rotations: torch.Tensor,
    voxels: VoxelSet,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rotated references ``P[k, o, v] = F_k(k_v @ A_o)``: full centred references
    ``(K, 2, S, S, S)`` (:func:`~denovo3d.engine.projector.full_centred`), rotations
    ``(O, 3, 3)`` -> ``(K, O, V)`` complex (trilinear, :func:`~.projector.rotate`; into ``out``
    if given)."""
    radius = min(voxels.radius, voxels.box / 2)
    return rotate(refs_full, rotations, voxels.coords, radius, out=out)


def _real(z: torch.Tensor) -> torch.Tensor:
    """``(..., V)`` complex -> ``(..., 2V)`` real (re, im interleaved)."""
    return torch.view_as_real(z).reshape(*z.shape[:-1], 2 * z.shape[-1])


def coarse_scores(
    data: torch.Tensor,
    ctf2: torch.Tensor,
    proj: torch.Tensor,
    grid: PassGrid,
    log_prior: torch.Tensor,
    power: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scores ``(b, T, KO)`` of every coarse pose.

    ``data (b, V)`` complex and ``ctf2 (b, V)`` on ``grid.voxels``; ``proj (KO, V)``;
    ``log_prior (T, KO)`` (offset + class/orientation priors); ``power (V, KO)`` = ``|proj|²``
    transposed if the caller has it (made once for all its chunks), else made here.
    """
    b, T = data.shape[0], grid.offsets_px.shape[0]
    phases = grid.phases()  # (T, V)
    shape = (b, T, phases.shape[1])  # both expanded: 2.5x faster than the broadcast product
    shifted = (data * grid.inv_sigma2)[:, None, :].expand(shape) * phases.expand(shape)
    cross = _real(shifted).reshape(b * T, -1) @ _real(proj).T  # one real GEMM
    power = _power(proj).T if power is None else power
    norm = (0.5 * ctf2 * grid.inv_sigma2) @ power  # (b, KO)
    return cross.view(b, T, -1).sub_(norm[:, None, :]).add_(log_prior)  # in place: no copies


def _power(proj: torch.Tensor) -> torch.Tensor:
    """``|proj|²`` (real), as ``re² + im²``."""
    return proj.real**2 + proj.imag**2


def significant_mask(prob: torch.Tensor, fraction: float, max_count: int) -> torch.Tensor:
    """``prob (b, N)`` normalised rows -> bool ``(b, N)``: the largest samples whose weights sum
    to ``fraction`` (the one that crosses it included), at most ``max_count`` per row (only the
    ``max_count`` largest are sorted).

    Only samples with ``p >= (1 - fraction) / N`` can be kept (the ones below, with all the
    smaller ones, sum to less than ``1 - fraction``; half that bound leaves a margin for
    rounding): where ``max_count`` is not small against ``N`` (the fine posteriors: all of
    them), those few per row are gathered and sorted, not the whole row (9x faster on the estep
    benchmark's coarse rows of 70,848; with ``max_count`` 100 topk is the faster)."""
    b, n = prob.shape
    n_max = n
    if 64 * max_count > n and b:
        cand = prob >= 0.5 * (1.0 - fraction) / n
        counts = cand.sum(dim=1)
        n_max = int(counts.max())
    if 4 * n_max > n:  # max_count small, or flat rows: topk of the whole rows
        top_p, order = prob.topk(min(max_count, n), dim=1)
        cols = order
    else:
        rows, col = torch.nonzero(cand, as_tuple=True)  # row-major: a row's run in order
        pos = torch.arange(rows.numel(), device=prob.device) - (counts.cumsum(0) - counts)[rows]
        values = prob.new_full((b, n_max), -1.0).index_put_((rows, pos), prob[rows, col])
        index = col.new_full((b, n_max), n).index_put_((rows, pos), col)  # pads: column n
        top_p, order = values.topk(min(max_count, n_max), dim=1)
        cols = index.gather(1, order)
    keep_sorted = (top_p.cumsum(dim=1) - top_p) < fraction
    keep_sorted &= top_p >= 0  # not a pad (pads sort last: the cumulative sums before them hold)
    keep_sorted[:, 0] = True
    mask = torch.zeros((b, n + 1), dtype=torch.bool, device=prob.device)
    return mask.scatter_(1, cols, keep_sorted)[:, :n]


def _padded_rows(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Column indices of the True entries per row, padded: ``(b, n_max)`` index and valid mask."""
    n_max = int(mask.sum(dim=1).max())
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :n_max]
    return order, mask.gather(1, order)


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
    workspace: Workspace | None = None,
) -> Alignment:
    """Pass 2 around the significant coarse samples ``coarse_sig (b, T_c, KO_c)`` bool: every
    child of a particle's significant coarse orientations × every child of its significant
    coarse offsets.

    ``data, ctf2 (b, V)`` on ``grid.voxels`` (fine); ``grid.rotations (O_f, 3, 3)`` fine grid of
    one class (children order); ``grid.offsets_px (8·T_c, 3)`` children of the coarse offsets;
    ``log_prior_offset (T_f,)``; ``log_prior_ko (KO_f,)``. Particle indices of the result are
    rows of ``data``.

    Orientation-major: the union of all particles' orientations is projected once, by chunks
    of parents under the budget (with the powers ``|P|²``); for each chunk, the particles with
    orientations in it score them by batched GEMMs into one padded score array ``(b, n_t, n_o)``.
    A particle's rows are its coarse offsets' shifted data times the eight children's phases
    (the phase of ``t_c + δ`` is ``e(t_c)·e(δ)``: no table over all fine offsets). Particles
    whose score arrays together pass a quarter of the budget go in several blocks. A block's
    weighted data, the chunks' projections and the groups' data rows live in ``workspace``
    (buffers "fine block", "projections", "data rows"; kept by the caller from call to call),
    else in a new one. On the CPU (float32/64, compiler at hand, ``DENOVO3D_NATIVE`` not 0)
    the native ``fine_scores`` kernel scores each chunk's particles instead of the batched
    GEMMs: no powers, no data rows in memory (the same scores within float rounding).
    """
    workspace = Workspace() if workspace is None else workspace
    flags = coarse_sig.view(torch.uint8)  # amax of bytes: 6x faster than any over dim 1
    o_sig, t_sig = flags.amax(dim=1).bool(), flags.amax(dim=2).bool()  # (b, KO_c), (b, T_c)
    n_o, n_t = o_sig.sum(dim=1), t_sig.sum(dim=1)
    order = torch.argsort(n_o * n_t)  # similar sizes share a block: little padding
    sizes = torch.stack([n_o[order], n_t[order]], dim=1)
    # scores (with a spare block), probabilities, their sorted copy, int64 ranks, cumulative
    # sums and masks: about 32 bytes a fine pose
    limit = budget_bytes // 4
    parts = []
    groups = _working_groups(sizes, lambda m, n: 32 * 64 * (m + 1) * n, limit)
    for g0, g1, _, _ in groups:
        rows = order[g0:g1]
        shapes = [(rows.numel(), data.shape[1])] * 2
        block = workspace.take("fine block", shapes, [data.dtype, ctf2.dtype], data.device)
        if len(groups) == 1:  # the whole batch: in its order (one pass each, no gather)
            rows = torch.arange(data.shape[0], device=data.device)
            weighted = torch.mul(data, grid.inv_sigma2, out=block[0])  # D/σ²
            half_c = torch.mul(ctf2, grid.inv_sigma2, out=block[1]).mul_(0.5)  # ½C/σ²
        else:
            weighted = torch.index_select(data, 0, rows, out=block[0]).mul_(grid.inv_sigma2)
            half_c = torch.index_select(ctf2, 0, rows, out=block[1]).mul_(grid.inv_sigma2)
            half_c.mul_(0.5)
        args = (weighted, half_c, refs_full, o_sig[rows], t_sig[rows], grid)
        priors = (log_prior_offset, log_prior_ko)
        part = _fine_block(*args, *priors, fraction, budget_bytes, workspace)
        parts.append((part, rows))
    return _merge(parts, data.shape[0])


def _fine_block(
    weighted: torch.Tensor,
    half_c: torch.Tensor,
    refs_full: torch.Tensor,
    o_sig: torch.Tensor,
    t_sig: torch.Tensor,
    grid: PassGrid,
    log_prior_offset: torch.Tensor,
    log_prior_ko: torch.Tensor,
    fraction: float,
    budget_bytes: int,
    workspace: Workspace,
) -> Alignment:
    """:func:`fine_search` for particles whose score arrays fit together: ``weighted (b, V)``
    = D/σ², ``half_c (b, V)`` = ½C/σ²; ``o_sig (b, KO_c)``, ``t_sig (b, T_c)`` bool: the coarse
    orientations and offsets of the particles' significant samples."""
    b, V = weighted.shape[0], len(grid.voxels)
    o_par, o_ok = _padded_rows(o_sig)  # (b, n_oc) coarse ko
    t_par, t_ok = _padded_rows(t_sig)  # (b, n_tc) coarse offsets
    union = torch.unique(o_par[o_ok])  # coarse ko, sorted
    n_union, n_oc, n_tc = union.numel(), o_par.shape[1], t_par.shape[1]
    o_pos = torch.searchsorted(union, o_par.contiguous()).masked_fill_(~o_ok, n_union)
    itemsize = half_c.element_size()
    step = max(1, (budget_bytes // 2) // (8 * V * 3 * itemsize))
    in_order = _chunk_order(o_pos, o_ok, n_union, step)
    union = union[in_order]
    new_pos = torch.empty_like(in_order).scatter_(
        0, in_order, torch.arange(n_union, device=in_order.device)
    )
    o_pos = torch.cat([new_pos, new_pos.new_full((1,), n_union)])[o_pos]
    t_union = torch.unique(t_par[t_ok])
    t_fine = grid.offsets_px.reshape(-1, 8, 3)
    t_coarse = t_fine.mean(dim=1)  # the parents: children are t_c ± step/4 per axis
    # (T_used, V): up to 36 MB at box 64, above the mmap threshold: kept in the workspace
    (t_phases,) = workspace.take(
        "offset phases", [(t_union.numel(), V)], [weighted.dtype], weighted.device
    )
    rows_data = _ShiftedRows(
        weighted,
        grid.phases_at(t_coarse[t_union], out=t_phases),  # (T_used, V)
        grid.phases_at(t_fine[0] - t_coarse[0]),  # (8, V)
        torch.searchsorted(t_union, t_par.contiguous()).clamp_(max=t_union.numel() - 1),
    )
    # one spare block of 8 columns takes the padded slots' scores
    scores = half_c.new_full((b, 8 * n_tc, 8 * n_oc + 8), float("-inf"))
    eight = torch.arange(8, device=half_c.device)
    fused = _fused_op(weighted, half_c, refs_full)
    if fused is not None:
        n_t_all = t_ok.sum(dim=1)
        data_r = [torch.view_as_real(x.contiguous()) for x in (weighted, *rows_data.phases())]

    def group_cost(m: torch.Tensor, n: torch.Tensor) -> torch.Tensor:  # P, |P|², data rows
        return V * itemsize * (24 * m + 18 * n)

    for u0 in range(0, n_union, step):
        u1 = min(n_union, u0 + step)
        parents = union[u0:u1]
        proj_c, power_c = _project_children(refs_full, parents, grid, workspace, fused is None)
        inside = (o_pos >= u0) & (o_pos < u1)  # (b, n_oc)
        n_in, n_t_all = inside.sum(dim=1), t_ok.sum(dim=1)
        rows_in = torch.nonzero(n_in).squeeze(1)
        rows_in = rows_in[torch.argsort(n_in[rows_in] * n_t_all[rows_in])]  # little padding
        slots, slot_ok = _padded_rows(inside[rows_in])  # (g_c, m): the particle's slots here
        par = (o_pos[rows_in[:, None], slots] - u0).clamp_(0, u1 - u0 - 1)
        slots = slots.masked_fill(~slot_ok, n_oc)  # padded slots -> the spare block
        if fused is not None:  # all the chunk's particles in one native call
            idx = (rows_data.parent_pos, n_t_all, rows_in, par, n_in[rows_in], slots.contiguous())
            fused(torch.view_as_real(proj_c), data_r[0], half_c, *data_r[1:], *idx, scores)
            continue
        proj_r = torch.view_as_real(proj_c).view(u1 - u0, 16 * V)
        power_r = power_c.view(u1 - u0, 8 * V)
        sizes = torch.stack([n_in[rows_in], n_t_all[rows_in]], dim=1)
        for g0, g1, m, n_t in _working_groups(sizes, group_cost, WORKING_SET_BYTES):
            rows = rows_in[g0:g1]
            proj, power = _group_projections(proj_r, power_r, par[g0:g1, :m])
            y = rows_data.rows(rows, n_t, workspace)  # (g, 8·n_t, 2V)
            cross = torch.bmm(y, proj.transpose(1, 2))  # (g, 8·n_t, 8·m)
            norm = torch.bmm(half_c[rows, None, :], power.transpose(1, 2))  # (g, 1, 8·m)
            _put_scores(scores, cross - norm, rows, slots[g0:g1, :m], eight)
    o_idx = (8 * o_par[:, :, None] + eight).reshape(b, -1)
    t_idx = (8 * t_par[:, :, None] + eight).reshape(b, -1)
    scores = scores[:, :, : 8 * n_oc] + log_prior_offset[t_idx][:, :, None]
    scores += log_prior_ko[o_idx][:, None, :]
    valid = t_ok.repeat_interleave(8, dim=1)[:, :, None] & o_ok.repeat_interleave(8, dim=1)[:, None]
    return _posteriors(scores.masked_fill_(~valid, float("-inf")), o_idx, t_idx, fraction)


def _fused_op(
    weighted: torch.Tensor, half_c: torch.Tensor, refs_full: torch.Tensor
) -> Callable[..., None] | None:
    """The native fine-pass kernel where it applies (CPU, float32/64 throughout, no autograd,
    ``DENOVO3D_NATIVE`` not 0), else ``None`` (the torch path). ``fine_scores``: per particle
    and block of 64 voxels its data rows (the eight children in the AVX2 lanes) built in
    cache and summed against its parents' children's projections, the norms on the fly; the
    batched GEMMs instead write rows of tens of MB a particle and read them once (estep
    benchmark: the fine pass's scoring 2.0 -> 0.4 CPU s)."""
    tensors = (weighted, half_c, refs_full)
    if not (
        all(t.device.type == "cpu" for t in tensors)
        and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
        and half_c.dtype in (torch.float32, torch.float64)
        and weighted.dtype == half_c.dtype.to_complex()
        and refs_full.dtype == half_c.dtype
        and native.enabled()
    ):
        return None
    return native.load_fine_scores()


def _chunk_order(o_pos: torch.Tensor, o_ok: torch.Tensor, n_union: int, step: int) -> torch.Tensor:
    """The union's positions in the order of its chunks of ``step`` (sorted within a chunk: the
    projector takes a class's parents together). Each orientation goes with the first particle
    that uses it, particles ranked by their first orientation (``o_pos (b, n_oc)``, positions
    in the sorted union, ``n_union`` where not ``o_ok``): a particle's orientations mostly fall
    in one chunk, so its data rows are built and streamed through the GEMM fewer times (estep
    benchmark: 1.86 -> 1.35 and 1.48 -> 1.05 chunks a particle against the sorted order)."""
    b, device = o_pos.shape[0], o_pos.device
    rank = torch.empty(b, dtype=torch.long, device=device)
    rank[torch.argsort(o_pos[:, 0], stable=True)] = torch.arange(b, device=device)
    users = rank[:, None].expand_as(o_pos)[o_ok]
    first_user = torch.full((n_union,), b, dtype=torch.long, device=device)
    first_user.scatter_reduce_(0, o_pos[o_ok], users, "amin")
    order = torch.argsort(first_user, stable=True)
    chunk = torch.arange(n_union, device=device) // step
    return order[torch.argsort(chunk * n_union + order)]


def _group_projections(
    proj_r: torch.Tensor, power_r: torch.Tensor, par: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """A group's projections ``(g, 8·m, 2V)`` real and powers ``(g, 8·m, V)``: rows ``par (g, m)``
    of the chunk's ``proj_r (U, 16V)`` and ``power_r (U, 8V)``. Views, not copies, for a lone
    particle whose orientations are consecutive in the chunk: at full size a particle's data
    rows alone fill the working set, so most groups are one particle, most with one or two
    orientations in a chunk."""
    g, m = par.shape
    first, last = par[0, [0, -1]].tolist()
    if g == 1 and last - first == m - 1:
        proj, power = proj_r[first : last + 1], power_r[first : last + 1]
    else:
        flat = par.reshape(-1)
        proj, power = proj_r.index_select(0, flat), power_r.index_select(0, flat)
    return proj.view(g, 8 * m, -1), power.view(g, 8 * m, -1)


def _put_scores(
    scores: torch.Tensor,
    values: torch.Tensor,
    rows: torch.Tensor,
    slots: torch.Tensor,
    eight: torch.Tensor,
) -> None:
    """``scores[row, r, 8·slot + c] = values (g, R, 8·m)`` for the group's particles ``rows
    (g,)`` and their slots ``(g, m)``. A lone particle's slots in a chunk are consecutive (its
    orientations are sorted, the chunk is a range of the sorted union): a slice, no scatter."""
    g, n_rows, n_cols = values.shape
    first, last = slots[0, [0, -1]].tolist()
    if g == 1 and last - first == n_cols // 8 - 1:
        scores[int(rows[0]), :n_rows, 8 * first : 8 * last + 8] = values[0]
        return
    cols = (8 * slots[:, :, None] + eight).reshape(g, 1, n_cols)
    t_rows = torch.arange(n_rows, device=values.device)[None, :, None]
    scores[rows[:, None, None], t_rows, cols] = values


@dataclass(frozen=True)
class _ShiftedRows:
    """The fine pass's data rows: ``weighted (b, V)`` = D/σ², phases of the coarse offsets in
    use ``(T_used, V)``, of the eight children's steps ``(8, V)``, and each particle's coarse
    offsets as rows of the first table ``(b, n_tc)``."""

    weighted: torch.Tensor
    parent_phases: torch.Tensor
    child_phases: torch.Tensor
    parent_pos: torch.Tensor

    def phases(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The two phase tables, contiguous (for the native kernel)."""
        return self.parent_phases.contiguous(), self.child_phases.contiguous()

    def rows(self, rows: torch.Tensor, n_tc: int, workspace: Workspace) -> torch.Tensor:
        """``(g, 8·n_tc, 2V)`` real: D·e(t_c)·e(δ) for the first ``n_tc`` coarse offsets of the
        particles ``rows``, children innermost (row ``8j + c``), in ``workspace``'s "data rows"
        (one particle's alone can pass 32 MB)."""
        g, V = rows.numel(), self.weighted.shape[1]
        pos = self.parent_pos[rows, :n_tc].reshape(-1)
        shifted = self.parent_phases.index_select(0, pos).view(g, n_tc, V)
        shifted *= self.weighted[rows, None, :]
        (y,) = workspace.take("data rows", [(g, n_tc, 8, V)], [shifted.dtype], shifted.device)
        torch.mul(shifted[:, :, None, :], self.child_phases, out=y)
        return torch.view_as_real(y).view(g, 8 * n_tc, 2 * V)


def _working_groups(
    sizes: torch.Tensor, cost: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], limit: int
) -> list[tuple[int, int, int, int]]:
    """Consecutive groups ``(g0, g1, m, n)`` of particles with ``sizes (P, 2)`` = (coarse
    orientations, coarse offsets) each: ``m, n`` the group's maxima (the padding), the group's
    bytes (``cost(m, n)`` per particle) under ``limit`` (one particle alone may pass it). The
    cost of a growing group never falls (running maxima), so each group is the prefix that
    fits: one vectorised test per group, no loop over particles."""
    groups, g0, n_p = [], 0, sizes.shape[0]
    while g0 < n_p:
        m = torch.cummax(sizes[g0:, 0], dim=0).values
        n = torch.cummax(sizes[g0:, 1], dim=0).values
        count = torch.arange(1, n_p - g0 + 1, device=sizes.device)
        fits = int((count * cost(m, n) <= limit).sum())
        g1 = g0 + max(1, fits)
        groups.append((g0, g1, int(m[g1 - g0 - 1]), int(n[g1 - g0 - 1])))
        g0 = g1
    return groups


def _project_children(
    refs_full: torch.Tensor,
    parents: torch.Tensor,
    grid: PassGrid,
    workspace: Workspace,
    with_power: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Projections ``(U, 8, V)`` complex of the eight fine children ``8p + c`` of each coarse
    ``ko`` in ``parents (U,)`` sorted (the children of a parent share its class), and their
    powers ``|P|²`` (real, left unset unless ``with_power``: the native kernel sums them
    itself), each computed while its chunk is in cache; both are views of ``workspace``'s
    "projections" (hundreds of MB: a new array's pages would be faulted in at every call)."""
    n_orient, V, K = grid.rotations.shape[0], len(grid.voxels), refs_full.shape[0]
    dtype = torch.complex64 if refs_full.dtype == torch.float32 else torch.complex128
    shape = (parents.numel(), 8, V)
    kinds = [dtype, refs_full.dtype]
    proj, power = workspace.take("projections", [shape, shape], kinds, refs_full.device)
    kids = 8 * parents[:, None] + torch.arange(8, device=parents.device)
    class_start = torch.arange(K + 1, device=parents.device) * (n_orient // 8)
    bounds = torch.searchsorted(parents, class_start).tolist()
    # with the powers: chunks that stay in cache for them; without: one call (one cube) a class
    step = max(1, WORKING_SET_BYTES // (8 * V * proj.element_size())) if with_power else shape[0]
    for k in range(K):
        for u0 in range(bounds[k], bounds[k + 1], step):
            u1 = min(u0 + step, bounds[k + 1])
            rot = grid.rotations[kids[u0:u1].reshape(-1) % n_orient]
            project(refs_full[k : k + 1], rot, grid.voxels, out=proj[u0:u1].view(1, -1, V))
            if not with_power:
                continue
            re, im = proj[u0:u1].real, proj[u0:u1].imag  # re² then += im²: the same sums
            torch.mul(re, re, out=power[u0:u1]).add_(im * im)  # as re² + im², 1.7x faster
    return proj, power


def _posteriors(
    scores: torch.Tensor,
    o_idx: torch.Tensor,
    t_idx: torch.Tensor,
    fraction: float,
) -> Alignment:
    """Softmax of ``scores (g, n_t, n_o)`` per particle, the kept samples and the best one
    (particle indices ``0..g-1``)."""
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
        particle=local,
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
    """Groups of particles ``(alignment, rows)`` (the group's particle ``i`` is row ``rows[i]``
    of a batch of ``b``) -> one batch Alignment."""
    fields = {}
    for name in Alignment.__dataclass_fields__:
        values = torch.cat([getattr(p, name) for p, _ in parts])
        if name == "particle":
            values = torch.cat([rows[p.particle] for p, rows in parts])
        elif name in _PER_PARTICLE:
            out = values.new_empty(b)
            out[torch.cat([rows for _, rows in parts])] = values
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


def align(
    data: torch.Tensor,
    ctf2: torch.Tensor,
    refs_full: torch.Tensor,
    search: Search,
    workspace: Workspace | None = None,
) -> Alignment:
    """Coarse then fine search for a batch.

    ``data (b, s, s, s//2+1)`` complex and ``ctf2`` (same shape) at the box both VoxelSets index;
    ``refs_full (K, 2, S, S, S)`` the references' full centred transforms (zero beyond the
    current radius). Temporaries stay under ``search.budget_bytes``: coarse scores by chunks of
    particles, the fine pass by chunks of the union of their orientations (:func:`fine_search`),
    its buffers in ``workspace`` when given (a caller that aligns batch after batch keeps one:
    the pages of a buffer this size are faulted in again whenever it is allocated anew); the
    fine pass's voxels of the batch in its buffer "fine data", free again on return.
    """
    workspace = Workspace() if workspace is None else workspace
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
    power = _power(proj).T  # (V, KO): once, not per chunk
    # coarse scores by working-set chunks; the fine pass over as many particles as their coarse
    # significance (a byte a pose) allows, so that their projections are shared
    sub = max(1, min(search.budget_bytes, WORKING_SET_BYTES) // (4 * (T * KO * 3 + T * V * 6)))
    chunk = max(1, search.budget_bytes // (T * KO))
    parts = []
    for s in range(0, data.shape[0], chunk):
        d, c = data[s : s + chunk], ctf2[s : s + chunk]
        sig = []
        for i in range(0, d.shape[0], sub):
            dc, cc = c_grid.voxels.take(d[i : i + sub]), c_grid.voxels.take(c[i : i + sub])
            scores = coarse_scores(dc, cc, proj, c_grid, log_prior, power=power)
            prob = torch.softmax(scores.reshape(scores.shape[0], -1), dim=1)
            mask = significant_mask(prob, search.fraction, search.max_significant)
            sig.append(mask.reshape(scores.shape))
        shapes = [(d.shape[0], len(f_grid.voxels))] * 2
        fine = workspace.take("fine data", shapes, [data.dtype, ctf2.dtype], data.device)
        part = fine_search(
            f_grid.voxels.take(d, out=fine[0]),
            f_grid.voxels.take(c, out=fine[1]),
            refs_full,
            torch.cat(sig),
            f_grid,
            prior_t_fine,
            prior_ko_fine,
            search.fraction,
            search.budget_bytes,
            workspace,
        )
        parts.append((part, torch.arange(s, s + d.shape[0], device=data.device)))
    return _merge(parts, data.shape[0])
