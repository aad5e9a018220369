"""E-step conventions: GEMM scores vs a direct per-pose sum, true poses win, the gather/scatter
pair is adjoint, the memory budget does not change results."""

from __future__ import annotations

import torch

from denovo3d.engine.expectation import (
    PassGrid,
    Search,
    align,
    coarse_scores,
    fine_search,
    project,
    significant_mask,
)
from denovo3d.engine.projector import backproject, full_centred, gather, rotate, splat
from denovo3d.engine.voxels import VoxelSet, hermitian_complete
from denovo3d.fourier import centred_rfft, phase_shift, rfft_radius, sample_rfft, splat_rfft
from denovo3d.geometry.euler import random_rotations
from denovo3d.geometry.sampling import (
    OrientationGrid,
    offset_children,
    offset_grid,
    orientation_children,
)
from tests.refine_synthetic import make_particles


def _blobs(box: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    axis = torch.arange(box, dtype=torch.float64) - box // 2
    z, y, x = torch.meshgrid(axis, axis, axis, indexing="ij")
    vol = torch.zeros(box, box, box, dtype=torch.float64)
    for _ in range(6):
        c = (torch.rand(3, generator=g, dtype=torch.float64) - 0.5) * box * 0.4
        vol += torch.exp(-((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2) / 4.0)
    return vol


def test_gemm_scores_equal_a_direct_sum_per_pose() -> None:
    box, radius = 12, 5.0
    refs = torch.stack([_blobs(box, 1), _blobs(box, 2)])
    refs_ft = centred_rfft(refs) * (rfft_radius(box) < radius)
    data = torch.randn(3, box, box, box // 2 + 1, dtype=torch.complex128)
    ctf2 = torch.rand(3, box, box, box // 2 + 1, dtype=torch.float64)
    vox = VoxelSet.build(box, radius, dtype=torch.float64)
    sigma2 = torch.rand(box // 2 + 1, dtype=torch.float64) + 0.5
    inv = vox.friedel / sigma2[vox.shell]
    rot = random_rotations(4, torch.Generator().manual_seed(3))
    offsets = torch.tensor([[0.0, 0.0, 0.0], [1.5, -2.0, 0.5]], dtype=torch.float64)
    grid = PassGrid(rot, offsets, vox, inv, box)
    proj = project(full_centred(refs_ft), rot, vox).reshape(8, -1)
    prior = torch.randn(2, 8, dtype=torch.float64)
    got = coarse_scores(vox.take(data), vox.take(ctf2), proj, grid, prior)
    expected = torch.empty(3, 2, 8, dtype=torch.float64)
    for i in range(3):
        for t in range(2):
            for k in range(2):
                for o in range(4):
                    p = sample_rfft(refs_ft[k], vox.coords @ rot[o])
                    p_t = phase_shift(p, offsets[t], vox.coords / box)
                    d, c = vox.take(data[i]), vox.take(ctf2[i])
                    cross = ((d.conj() * p_t).real * inv).sum()
                    norm = 0.5 * (c * p.abs() ** 2 * inv).sum()
                    expected[i, t, k * 4 + o] = cross - norm + prior[t, k * 4 + o]
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)


def test_projector_matches_sample_rfft_and_splat_is_its_adjoint() -> None:
    box = 16
    half = centred_rfft(_blobs(box, 4)) * (rfft_radius(box) < 7)
    q = (torch.rand(5, 200, 3, dtype=torch.float64) - 0.5) * 12
    torch.testing.assert_close(gather(full_centred(half[None])[0], q), sample_rfft(half, q))
    v = torch.randn(5, 200, dtype=torch.complex128)
    f = torch.randn(box, box, box // 2 + 1, dtype=torch.complex128)
    lhs = (sample_rfft(f, q).conj() * v).real.sum()
    rhs = (f.conj() * splat_rfft(v, q, box)).real.sum()
    torch.testing.assert_close(lhs, rhs)
    torch.testing.assert_close(backproject(v, q, box), hermitian_complete(splat_rfft(v, q, box)))


def test_rotate_equals_grid_sample_and_sample_rfft() -> None:
    """The E-step's projector against the straightforward samplers: even and odd boxes, a
    radius below the box's, both precisions, chunks that split the orientations."""
    for box, radius, dtype in (
        (16, 8.0, torch.float64),
        (15, 7.5, torch.float64),
        (20, 6.0, torch.float32),
    ):
        half = centred_rfft(_blobs(box, 5)).to(dtype=torch.complex128)
        half = (half * (rfft_radius(box) < radius)).to(
            torch.complex64 if dtype == torch.float32 else torch.complex128
        )
        full = full_centred(torch.stack([half, 2 * half]))
        vox = VoxelSet.build(box, radius, dtype=dtype)
        rot = random_rotations(5, torch.Generator().manual_seed(6)).to(dtype)
        got = rotate(full, rot, vox.coords, radius, chunk_points=2 * len(vox))
        split = rotate(full, rot, vox.coords, radius, chunk_points=len(vox) // 3)  # voxels
        torch.testing.assert_close(split, got)
        expected = torch.stack([gather(full[k], vox.coords @ rot) for k in range(2)])
        direct = sample_rfft(half.to(torch.complex128), (vox.coords @ rot).double())
        scale = float(direct.abs().max())
        tol = 1e-12 if dtype == torch.float64 else 1e-5  # float32: rounding of the positions
        torch.testing.assert_close(got, expected, rtol=0, atol=tol * scale)
        err_rotate = (got[0].to(direct) - direct).abs().max()
        err_gather = (expected[0].to(direct) - direct).abs().max()
        assert err_rotate <= max(2 * err_gather, 1e-13 * scale)


def test_splat_equals_grid_sample_backprojection() -> None:
    """The M-step's scatter (complex values and real weights at once) against the adjoint of
    ``grid_sample``, folded the same way: even and odd boxes, a voxel set smaller than the
    volume, chunks that split orientations and voxels."""
    for box, size, dtype in (
        (16, 12, torch.float64),
        (15, 15, torch.float64),
        (20, 20, torch.float32),
    ):
        vox = VoxelSet.build(size, size / 2, dtype=dtype)
        gen = torch.Generator().manual_seed(7)
        rot = random_rotations(4, gen).to(dtype)
        cdtype = torch.complex64 if dtype == torch.float32 else torch.complex128
        values = torch.randn(4, len(vox), dtype=cdtype, generator=gen)
        weights = torch.rand(4, len(vox), dtype=dtype, generator=gen)
        radius = min(vox.radius, vox.box / 2)
        for chunk in (len(vox) // 3, 2 * len(vox)):
            d, w = splat(values, weights, rot, vox.coords, radius, box, chunk_points=chunk)
            q = vox.coords @ rot
            torch.testing.assert_close(d, backproject(values, q, box))
            torch.testing.assert_close(w, backproject(weights, q, box))


def _search(box: int, sigma2: float, budget: int = 1 << 30) -> Search:
    coarse = OrientationGrid.build(1)
    fine = orientation_children(coarse)
    t_c = offset_grid(2.0, 2.0)
    vox = VoxelSet.build(box, box / 2)
    inv = vox.friedel / sigma2
    return Search(
        PassGrid(coarse.matrices().float(), t_c.float(), VoxelSet.build(box, 6), inv[:0], box),
        PassGrid(fine.matrices().float(), offset_children(t_c, 2.0).float(), vox, inv, box),
        torch.zeros(1),
        100.0,
        budget_bytes=budget,
    )


def _with_inv(search: Search, sigma2: float) -> Search:
    c = search.coarse
    inv = c.voxels.friedel / sigma2
    return Search(
        PassGrid(c.rotations, c.offsets_px, c.voxels, inv, c.box_px),
        search.fine,
        search.log_pdf_class,
        search.sigma2_offset_px,
        budget_bytes=search.budget_bytes,
    )


def test_true_pose_wins_on_noiseless_data() -> None:
    box = 24
    vol = _blobs(box, 7).float()
    fine = orientation_children(OrientationGrid.build(1))
    pick = torch.tensor([5, 900, 2500, 4000])
    t_f = offset_children(offset_grid(2.0, 2.0), 2.0)
    pick_t = torch.tensor([0, 17, 40, 55])
    parts = make_particles(vol, 4, 0.0, 0.0, seed=2)
    # re-make the particles at grid poses and grid offsets
    from denovo3d.fourier import rfft_coords

    ft = centred_rfft(vol.double())
    k = rfft_coords(box).double().reshape(-1, 3)
    data = []
    for o, t in zip(pick.tolist(), pick_t.tolist(), strict=True):
        p = sample_rfft(ft, k @ fine.matrices()[o])
        data.append(phase_shift(p, t_f[t], k / box).reshape(box, box, box // 2 + 1))
    data = torch.stack(data).to(torch.complex64) * parts["ctf2"]
    refs_full = full_centred(centred_rfft(vol)[None].to(torch.complex64))
    # a flat coarse pass (many significant samples, as noisy data give), a sharp fine pass
    search = _with_inv(_search(box, 1.0), 1e6)
    al = align(data, parts["ctf2"], refs_full, search)
    assert al.best_ko.tolist() == pick.tolist()
    assert al.best_offset.tolist() == pick_t.tolist()
    small = _with_inv(_search(box, 1.0, budget=1 << 20), 1e6)
    al2 = align(data, parts["ctf2"], refs_full, small)
    assert al2.best_ko.tolist() == pick.tolist()
    torch.testing.assert_close(al2.max_prob, al.max_prob)


def test_significant_mask_keeps_the_weight_fraction() -> None:
    prob = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.97, 0.01, 0.01, 0.01]])
    keep = significant_mask(prob, 0.9, 10)
    assert keep.tolist() == [[True, True, True, False], [True, False, False, False]]
    assert significant_mask(prob, 0.999, 2).sum(dim=1).tolist() == [2, 2]


def test_significant_mask_equals_sorting_whole_rows() -> None:
    """The candidates' path (max_count large against a row) keeps what sorting every sample
    would, on peaked rows, flat rows (topk of the whole rows) and rows mixing both."""
    gen = torch.Generator().manual_seed(3)
    for scale in (30.0, 1.0, 8.0):
        prob = torch.softmax(scale * torch.randn(9, 5000, generator=gen, dtype=torch.float64), 1)
        for fraction, max_count in ((0.999, 5000), (0.9, 5000), (0.999, 3), (0.999, 100)):
            top_p, order = prob.sort(dim=1, descending=True)
            keep = (top_p.cumsum(dim=1) - top_p) < fraction
            keep[:, 0], keep[:, max_count:] = True, False
            want = torch.zeros_like(keep).scatter(1, order, keep)
            assert torch.equal(significant_mask(prob, fraction, max_count), want)


def test_fine_search_equals_the_dense_scores_of_each_particles_children() -> None:
    """The orientation-major fine pass (chunks of projections, working groups, padded slots,
    phases as parent × child) against the straightforward formula: every fine pose scored by
    :func:`coarse_scores`, each particle restricted to the children of its significant coarse
    orientations and offsets; a tiny budget (many chunks and blocks) changes nothing."""
    box, radius, K, O_c, b = 12, 5.0, 2, 5, 6
    gen = torch.Generator().manual_seed(11)
    refs = torch.stack([_blobs(box, 8), _blobs(box, 9)])
    refs_full = full_centred(centred_rfft(refs) * (rfft_radius(box) < radius))
    vox = VoxelSet.build(box, radius, dtype=torch.float64)
    sigma2 = torch.rand(box // 2 + 1, generator=gen, dtype=torch.float64) + 0.5
    inv = vox.friedel / sigma2[vox.shell]
    t_c = torch.tensor([[0.0, 0.0, 0.0], [1.0, -1.0, 0.0], [0.0, 1.0, 1.0]], dtype=torch.float64)
    grid = PassGrid(random_rotations(8 * O_c, gen), offset_children(t_c, 1.0), vox, inv, box)
    data = vox.take(torch.randn(b, box, box, box // 2 + 1, dtype=torch.complex128, generator=gen))
    ctf2 = vox.take(torch.rand(b, box, box, box // 2 + 1, dtype=torch.float64, generator=gen))
    sig = torch.rand(b, 3, K * O_c, generator=gen) < 0.15
    sig[torch.arange(b), torch.arange(b) % 3, (3 * torch.arange(b)) % (K * O_c)] = True
    prior_t = -(grid.offsets_px**2).sum(1) / 4.0
    prior_ko = torch.randn(K * 8 * O_c, generator=gen, dtype=torch.float64)
    proj = project(refs_full, grid.rotations, vox).reshape(K * 8 * O_c, -1)
    dense = coarse_scores(data, ctf2, proj, grid, prior_t[:, None] + prior_ko[None, :])
    t_ok = sig.any(dim=2).repeat_interleave(8, dim=1)  # (b, T_f)
    o_ok = sig.any(dim=1).repeat_interleave(8, dim=1)  # (b, KO_f)
    dense = dense.masked_fill(~(t_ok[:, :, None] & o_ok[:, None, :]), float("-inf"))
    log_ev = torch.logsumexp(dense.reshape(b, -1), dim=1)
    prob = torch.exp(dense.reshape(b, -1) - log_ev[:, None])
    best = prob.argmax(dim=1)
    n_f = K * 8 * O_c
    for budget in (1 << 30, 3 * 8 * len(vox) * 16 * 2):
        al = fine_search(data, ctf2, refs_full, sig, grid, prior_t, prior_ko, 0.999, budget)
        torch.testing.assert_close(al.log_evidence, log_ev, rtol=1e-10, atol=1e-8)
        torch.testing.assert_close(al.max_prob, prob.max(dim=1).values, rtol=1e-8, atol=1e-10)
        assert al.best_ko.tolist() == (best % n_f).tolist()
        assert al.best_offset.tolist() == (best // n_f).tolist()
        got = torch.zeros(b, 8 * 3, n_f, dtype=torch.float64)
        got[al.particle, al.offset, al.ko] = al.weight
        keep = significant_mask(prob, 0.999, prob.shape[1])
        expected = torch.where(keep, prob, 0.0)
        expected = (expected / expected.sum(dim=1, keepdim=True)).reshape(got.shape)
        torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-10)


def test_chunk_order_is_a_permutation_sorted_within_chunks_that_keeps_particles_together() -> None:
    """The fine pass's union order: every position once, ascending within each chunk (the
    projector takes a class's parents together), and two particles with disjoint orientations
    spread over the sorted union each land in one chunk."""
    from denovo3d.engine.expectation import _chunk_order

    # particle 0 uses union positions 0, 2, 4; particle 1 uses 1, 3, 5; padded with n_union
    o_pos = torch.tensor([[0, 2, 4, 6], [1, 3, 5, 6]])
    o_ok = o_pos < 6
    order = _chunk_order(o_pos, o_ok, 6, 3)
    assert sorted(order.tolist()) == list(range(6))
    assert order[:3].tolist() == [0, 2, 4] and order[3:].tolist() == [1, 3, 5]


def test_fine_search_without_the_native_kernel_takes_the_torch_path_with_the_same_scores(
    monkeypatch,
) -> None:
    """Float32 fine pass with the native ``fine_scores`` kernel and without it (as where it
    cannot be built): the torch path (data rows and batched GEMMs) runs only then, and both
    give the same posteriors within float32 rounding."""
    from denovo3d.engine import expectation, native

    box, radius, K, O_c, b = 12, 5.0, 2, 5, 8
    gen = torch.Generator().manual_seed(12)
    refs = torch.stack([_blobs(box, 3), _blobs(box, 4)])
    refs_full = full_centred(centred_rfft(refs) * (rfft_radius(box) < radius)).float()
    vox = VoxelSet.build(box, radius)
    inv = vox.friedel / 4.0
    t_c = torch.tensor([[0.0, 0.0, 0.0], [1.0, -1.0, 0.0], [0.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
    grid = PassGrid(
        random_rotations(8 * O_c, gen).float(), offset_children(t_c, 1.0), vox, inv, box
    )
    data = vox.take(torch.randn(b, box, box, box // 2 + 1, dtype=torch.complex64, generator=gen))
    ctf2 = vox.take(torch.rand(b, box, box, box // 2 + 1, generator=gen))
    sig = torch.rand(b, 4, K * O_c, generator=gen) < 0.2
    sig[torch.arange(b), torch.arange(b) % 4, (3 * torch.arange(b)) % (K * O_c)] = True
    prior_t = -(grid.offsets_px**2).sum(1) / 4.0
    prior_ko = torch.zeros(K * 8 * O_c)
    calls: list[int] = []
    rows = expectation._ShiftedRows.rows

    def counted(self, *args, **kwargs):
        calls.append(1)
        return rows(self, *args, **kwargs)

    monkeypatch.setattr(expectation._ShiftedRows, "rows", counted)
    results = []
    for budget in (1 << 30, 3 * 8 * len(vox) * 16):
        with_kernel = fine_search(
            data, ctf2, refs_full, sig, grid, prior_t, prior_ko, 0.999, budget
        )
        if expectation._fused_op(data, ctf2, refs_full) is not None:  # the kernel, not rows
            assert calls == []
        monkeypatch.setattr(native, "load_fine_scores", lambda: None)
        without = fine_search(data, ctf2, refs_full, sig, grid, prior_t, prior_ko, 0.999, budget)
        monkeypatch.undo()
        monkeypatch.setattr(expectation._ShiftedRows, "rows", counted)
        assert calls and len(calls) > 0
        calls.clear()
        results.append((with_kernel, without))
    for one, two in results:
        torch.testing.assert_close(one.log_evidence, two.log_evidence, rtol=1e-5, atol=1e-3)
        torch.testing.assert_close(one.max_prob, two.max_prob, rtol=1e-4, atol=1e-4)
        assert one.best_ko.tolist() == two.best_ko.tolist()
        assert one.best_offset.tolist() == two.best_offset.tolist()


def test_phases_are_unit_complex_exponentials_in_the_voxels_dtype() -> None:
    """``VoxelSet.phases`` (one cos over interleaved phases) equals ``exp(+2πi k·t/box)`` to
    float rounding, in the voxels' dtype whatever the offsets' dtype."""
    for dtype, tol in ((torch.float32, 1e-5), (torch.float64, 1e-12)):
        vox = VoxelSet.build(24, 12.0, dtype=dtype)
        offsets = torch.tensor([[0.0, 0.0, 0.0], [1.5, -2.0, 3.25], [-6.0, 0.5, 2.0]])
        for t in (offsets, offsets.double()):
            got = vox.phases(t, 24)
            assert got.dtype == dtype.to_complex()
            angle = (2 * torch.pi / 24) * (t.double() @ vox.coords.double().T)
            want = torch.polar(torch.ones_like(angle), angle)
            assert (got.to(torch.complex128) - want).abs().max() < tol
            out = torch.full_like(got, float("nan"))
            assert vox.phases(t, 24, out=out) is out and torch.equal(out, got)
