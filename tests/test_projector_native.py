"""The fused C++ projector and its adjoint (:mod:`denovo3d.engine.native`) against the torch paths
they replace on the CPU: same cube, same cells (base clamped to [0, 2r-1], zeros past the
volume's edge), same samples and sums; dispatch, ``out=``, threads, and the fallback when the
kernels cannot be built."""

from __future__ import annotations

import math
import os
import shutil
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from denovo3d.engine import native, projector
from denovo3d.engine.projector import (
    _cube,
    _rotate_torch,
    _splat_torch,
    full_centred,
    gather,
    rotate,
    splat,
)
from denovo3d.fourier import rfft_coords
from denovo3d.geometry.euler import random_rotations


@pytest.fixture(scope="module")
def op() -> Callable[..., None]:
    """The compiled kernel; a test machine with g++ and ninja must be able to build it."""
    if not native.enabled():
        pytest.skip("DENOVO3D_NATIVE=0 asks for the torch path")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kernel = native.load()
    if kernel is None:
        if shutil.which("g++") and shutil.which("ninja"):
            pytest.fail(f"g++ and ninja exist but the native kernel failed: {native.failure()}")
        pytest.skip(f"no toolchain for the native kernel: {native.failure()}")
    return kernel


def _volumes(box: int, K: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """``K`` random full centred volumes ``(K, 2, S, S, S)``."""
    g = torch.Generator().manual_seed(seed)
    half = torch.fft.rfftn(torch.randn(K, box, box, box, generator=g, dtype=dtype), dim=(1, 2, 3))
    return full_centred(half)


def _away_from_integers(coords: torch.Tensor, rot: torch.Tensor, r: int) -> torch.Tensor:
    """Keep the points whose rotated cube coordinates lie off the integers for every rotation:
    past the cube's edge the clamped cell makes the samples jump there, and the two paths may
    round a coordinate to either side."""
    p = coords.double() @ rot.double() + r  # (O, V, 3)
    off = ((p - p.round()).abs() > 1e-4).all(dim=-1).all(dim=0)
    return coords[off].contiguous()


def _torch_path(full: torch.Tensor, rot: torch.Tensor, coords: torch.Tensor, radius: float):
    r = max(1, math.ceil(radius))
    table = _cube(full, r)
    out = torch.empty((full.shape[0], rot.shape[0], coords.shape[0]), dtype=table.dtype)
    return _rotate_torch(table, rot, coords, r, 1 << 17, out)


def _spy(monkeypatch: pytest.MonkeyPatch, name: str = "_rotate_torch") -> list[int]:
    """Count the calls of a torch path (the native kernel must leave it alone)."""
    calls: list[int] = []
    torch_path = getattr(projector, name)

    def counted(*args, **kwargs):
        calls.append(1)
        return torch_path(*args, **kwargs)

    monkeypatch.setattr(projector, name, counted)
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_native_equals_torch_path(op, monkeypatch: pytest.MonkeyPatch, dtype) -> None:
    """K = 2 classes, odd and even and small radii (cubes past the volume's edge at box 8),
    points inside, on the cube's faces and outside it, both builds of the float loop."""
    calls = _spy(monkeypatch)
    tol = 2e-5 if dtype == torch.float32 else 1e-12
    gen = torch.Generator().manual_seed(1)
    for box, radius in ((8, 1.0), (8, 2.0), (8, 2.5), (8, 5.0), (9, 3.0), (16, 7.5), (17, 8.0)):
        full = _volumes(box, 2, dtype)
        r = max(1, math.ceil(radius))
        rot = random_rotations(6, gen).to(dtype)
        inside = (torch.rand(300, 3, generator=gen, dtype=dtype) * 2 - 1) * radius
        inside = inside[inside.norm(dim=1) < radius]
        outside = (torch.rand(300, 3, generator=gen, dtype=dtype) * 2 - 1) * 1.6 * r
        coords = _away_from_integers(torch.cat([inside, outside]), rot, r)
        scale = float(full.abs().max())
        expected = _torch_path(full, rot, coords, radius)
        got = rotate(full, rot, coords, radius)
        torch.testing.assert_close(got, expected, rtol=0, atol=tol * scale)
        # grid points on the cube's faces and edges, axis-aligned rotations: exact in both paths
        axis = torch.arange(-r, r + 1, dtype=dtype)
        grid = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)
        face = grid[(grid.abs() == r).any(dim=1)].contiguous()
        turns = torch.stack([torch.eye(3, dtype=dtype), torch.eye(3, dtype=dtype)[[1, 2, 0]]])
        expected = _torch_path(full, turns, face, radius)
        torch.testing.assert_close(rotate(full, turns, face, radius), expected, rtol=0, atol=0)
        if dtype == torch.float32:  # the baseline (SSE2 / scalar) build as well as the AVX2 one
            table = _cube(full, r)
            plain = torch.empty_like(got)
            op(torch.view_as_real(table), rot, coords, r, torch.view_as_real(plain), False)
            torch.testing.assert_close(plain, got, rtol=0, atol=tol * scale)
    assert calls == []


def test_native_equals_gather_inside_the_sphere(op, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _spy(monkeypatch)
    box, radius = 15, 7.5
    full = _volumes(box, 2, torch.float32, seed=2)
    k = rfft_coords(box).reshape(-1, 3).float()
    coords = k[k.norm(dim=1) < radius].contiguous()
    rot = random_rotations(5, torch.Generator().manual_seed(3)).float()
    got = rotate(full, rot, coords, radius)
    expected = torch.stack([gather(full[c], coords @ rot) for c in range(2)])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5 * float(full.abs().max()))
    assert calls == []


def test_native_writes_into_out_and_threads_agree(op, monkeypatch: pytest.MonkeyPatch) -> None:
    """``out`` a strided view into a larger buffer (as the E-step passes it): written in place,
    the rest untouched; 1 and 2 threads give the same samples."""
    calls = _spy(monkeypatch)
    full = _volumes(12, 2, torch.float32, seed=4)
    k = rfft_coords(12).reshape(-1, 3).float()
    coords = k[k.norm(dim=1) < 6].contiguous()
    rot = random_rotations(7, torch.Generator().manual_seed(5)).float()
    buffer = torch.full((2, 10, len(coords)), 3.0 + 1j, dtype=torch.complex64)
    view = buffer[:, 2:9]
    assert not view.is_contiguous()
    assert rotate(full, rot, coords, 6.0, out=view) is view
    scale = float(full.abs().max())
    expected = _torch_path(full, rot, coords, 6.0)
    torch.testing.assert_close(view, expected, rtol=0, atol=2e-5 * scale)
    assert bool((buffer[:, :2] == 3.0 + 1j).all()) and bool((buffer[:, 9:] == 3.0 + 1j).all())
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = rotate(full, rot, coords, 6.0)
        torch.set_num_threads(2)
        two = rotate(full, rot, coords, 6.0)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(one, two, rtol=0, atol=0)
    assert calls == []


def test_disabled_native_takes_the_torch_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """``DENOVO3D_NATIVE=0``: the kernel is never asked for, the torch path gives the result."""
    calls = _spy(monkeypatch)

    def refuse():
        raise AssertionError("the native kernel was asked for")

    monkeypatch.setenv("DENOVO3D_NATIVE", "0")
    monkeypatch.setattr(native, "load", refuse)
    full = _volumes(8, 1, torch.float32)
    coords = rfft_coords(8).reshape(-1, 3)[:50].float().contiguous()
    rot = random_rotations(3, torch.Generator().manual_seed(6)).float()
    got = rotate(full, rot, coords, 4.0)
    assert calls == [1]
    torch.testing.assert_close(got, _torch_path(full, rot, coords, 4.0), rtol=0, atol=0)


def test_failed_build_warns_once_and_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _spy(monkeypatch)

    def no_compiler():
        raise RuntimeError("Error building extension: g++: command not found")

    monkeypatch.setenv("DENOVO3D_NATIVE", "1")
    monkeypatch.setattr(native, "_build", no_compiler)
    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.setattr(native, "_op", None)
    monkeypatch.setattr(native, "_failure", None)
    full = _volumes(8, 1, torch.float32)
    coords = rfft_coords(8).reshape(-1, 3)[:50].float().contiguous()
    rot = random_rotations(3, torch.Generator().manual_seed(7)).float()
    with pytest.warns(RuntimeWarning, match="pure-torch path is used.*g\\+\\+: command not found"):
        first = rotate(full, rot, coords, 4.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = rotate(full, rot, coords, 4.0)
    assert calls == [1, 1]
    assert native.failure() is not None and "command not found" in native.failure()
    torch.testing.assert_close(first, second, rtol=0, atol=0)


def test_rotate_on_each_device_equals_the_cpu_kernel(device: str) -> None:
    """CUDA keeps the torch path; it agrees with the CPU's kernel."""
    full = _volumes(10, 2, torch.float32, seed=8)
    k = rfft_coords(10).reshape(-1, 3).float()
    coords = k[k.norm(dim=1) < 5].contiguous()
    rot = random_rotations(4, torch.Generator().manual_seed(9)).float()
    cpu = rotate(full, rot, coords, 5.0)
    got = rotate(full.to(device), rot.to(device), coords.to(device), 5.0).cpu()
    torch.testing.assert_close(got, cpu, rtol=0, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_native_splat_equals_torch_scatter(op, monkeypatch: pytest.MonkeyPatch, dtype) -> None:
    """The adjoint: small and odd radii, cubes past the volume's edge, points outside the cube,
    both builds of the float loop; 1, 2 and 3 threads (slabs of the cube) give the same bits."""
    calls = _spy(monkeypatch, "_splat_torch")
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    gen = torch.Generator().manual_seed(10)
    threads = torch.get_num_threads()
    cases = ((8, 1.0), (8, 2.5), (8, 5.0), (9, 3.0), (16, 7.5), (17, 8.0))
    try:
        for box, radius in cases:
            r = max(1, math.ceil(radius))
            rot = random_rotations(5, gen).to(dtype)
            points = (torch.rand(400, 3, generator=gen, dtype=dtype) * 2 - 1) * 1.4 * r
            coords = _away_from_integers(points, rot, r)
            values = torch.randn(5, len(coords), generator=gen, dtype=dtype.to_complex())
            weights = torch.rand(5, len(coords), generator=gen, dtype=dtype)
            with monkeypatch.context() as torch_only:
                torch_only.setenv("DENOVO3D_NATIVE", "0")
                expected = splat(values, weights, rot, coords, radius, box)
            scale = float(expected[1].abs().max())
            torch.set_num_threads(1)
            got = splat(values, weights, rot, coords, radius, box)
            torch.testing.assert_close(got, expected, rtol=0, atol=tol * scale)
            for n_threads in (2, 3):
                torch.set_num_threads(n_threads)
                again = splat(values, weights, rot, coords, radius, box)
                torch.testing.assert_close(again, got, rtol=0, atol=0)
            if dtype == torch.float32:  # the baseline build against the torch scatter
                acc = torch.zeros((3, (2 * r + 1) ** 3), dtype=dtype)
                _splat_torch(values, weights, rot, coords, r, 1 << 17, acc)
                plain = torch.zeros_like(acc)
                real = torch.view_as_real(values)
                op_splat = torch.ops.denovo3d.splat
                op_splat(real, weights, rot, coords, r, plain, False)
                torch.testing.assert_close(plain, acc, rtol=0, atol=tol * scale)
    finally:
        torch.set_num_threads(threads)
    assert len(calls) == len(cases)  # the expected sums only


def test_a_stale_build_lock_is_removed(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A lock left by a process killed while building would make torch's loader wait forever: it
    goes once it is old enough; a younger one is waited for."""
    from torch.utils.cpp_extension import _get_build_directory

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    lock = Path(_get_build_directory("denovo3d_native_test", verbose=False)) / "lock"
    lock.touch()
    old = time.time() - 2 * native._STALE_LOCK_S
    os.utime(lock, (old, old))
    native._await_build_lock("denovo3d_native_test")
    assert not lock.exists()
    lock.touch()
    start = time.perf_counter()
    native._await_build_lock("denovo3d_native_test", stale_s=0.3, poll_s=0.05)
    assert not lock.exists() and time.perf_counter() - start >= 0.25


def _fine_reference(proj, w, hc, pp, cp, t_pos, n_t, rows, par, n_par, slots, scores) -> None:
    """The fine pass's scores straight from the formula, in float64: rows D·e(t_j)·e(δ_c)
    against the children's projections, minus ½C/σ²·|P|²."""
    for i, row in enumerate(rows.tolist()):
        n, m = int(n_t[row]), int(n_par[i])
        y = (pp[t_pos[row, :n]] * w[row])[:, None, :] * cp  # (n, 8, V)
        p = proj[par[i, :m]].reshape(8 * m, -1)
        y_r = torch.view_as_real(y).reshape(8 * n, -1).double()
        cross = y_r @ torch.view_as_real(p).reshape(8 * m, -1).double().T
        norm = (hc[row].double() * p.abs().double() ** 2).sum(dim=1)
        for s in range(m):
            col = 8 * int(slots[i, s])
            scores[row, : 8 * n, col : col + 8] = (cross - norm)[:, 8 * s : 8 * s + 8]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n_voxels", [3, 130, 1001])
def test_fine_scores_kernel_equals_the_formula(dtype, n_voxels: int) -> None:
    """``fine_scores`` (AVX2 and baseline builds) against :func:`_fine_reference`: 1 to 4
    offsets and 1 to 3 parents per particle, padded slots left alone, voxel counts that leave a
    tail past the vector loop and span several blocks; 1, 2 and 3 threads give the same bits."""
    kernel = torch.ops.denovo3d.fine_scores if native.load() is not None else None
    if kernel is None or not native.enabled():
        pytest.skip("no native kernel")
    g = torch.Generator().manual_seed(n_voxels)
    cd = dtype.to_complex()
    b, U, T, n_tc, m = 6, 5, 7, 4, 3

    def randc(*shape):
        return torch.randn(*shape, dtype=cd, generator=g)

    proj, w, pp, cp = (
        randc(U, 8, n_voxels),
        randc(b, n_voxels),
        randc(T, n_voxels),
        randc(8, n_voxels),
    )
    hc = torch.rand(b, n_voxels, dtype=dtype, generator=g)
    t_pos = torch.randint(0, T, (b, n_tc), generator=g)
    n_t = torch.tensor([1, 3, 2, 4, 2, 3])  # pairs of offsets and a single one
    rows = torch.tensor([4, 0, 2, 5, 1])
    par = torch.randint(0, U, (5, m), generator=g)
    n_par = torch.tensor([3, 1, 2, 3, 1])
    slots = torch.stack([torch.randperm(5, generator=g)[:m] for _ in range(5)])
    expected = torch.full((b, 8 * n_tc, 48), float("-inf"), dtype=torch.float64)
    _fine_reference(proj, w, hc, pp, cp, t_pos, n_t, rows, par, n_par, slots, expected)
    real = [torch.view_as_real(x) for x in (proj, w)]
    args = (*real, hc, torch.view_as_real(pp), torch.view_as_real(cp), t_pos, n_t, rows, par)
    tol = {"rtol": 1e-5, "atol": 1e-3} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-9}
    for simd in (True, False):
        got = torch.full((b, 8 * n_tc, 48), float("-inf"), dtype=dtype)
        kernel(*args, n_par, slots, got, simd)
        assert torch.equal(torch.isfinite(got), torch.isfinite(expected))  # pads untouched
        fin = torch.isfinite(expected)
        torch.testing.assert_close(got[fin].double(), expected[fin], **tol)
        threads = torch.get_num_threads()
        try:  # particles are handed out by work, largest first: who scores one changes nothing
            for n in (1, 3):
                torch.set_num_threads(n)
                again = torch.full_like(got, float("-inf"))
                kernel(*args, n_par, slots, again, simd)
                assert torch.equal(again, got)
        finally:
            torch.set_num_threads(threads)
