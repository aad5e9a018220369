"""Fast trilinear rotation (gather, :func:`rotate`) and back-projection (scatter).

References are held as full, centred Fourier volumes with re/im as two channels,
``(K, 2, S, S, S)`` float, index ``k + S/2`` (z, y, x). :func:`gather` samples at ``k @ A`` with
one ``grid_sample`` call (trilinear, zeros outside); :func:`rotate` computes the same samples for
many rotations many times faster (the E-step's hot path: on the CPU one fused C++ loop from
:mod:`denovo3d.engine.native`; on CUDA, or without a compiler, one GEMM for the coordinates,
eight 1-D gathers of complex corners, three ``lerp``); back-projection is ``grid_sample``'s adjoint
(``grid_sampler_3d_backward``) followed by a Friedel fold to the ``rfftn`` half grid. All match
:func:`denovo3d.fourier.sample_rfft` / :func:`~denovo3d.fourier.splat_rfft` (+ the ``kx = 0``
completion) inside the Nyquist sphere, at a fraction of the cost.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator

import torch
from torch.nn import functional

from denovo3d.engine import native
from denovo3d.fourier import rfft_coords

__all__ = ["backproject", "full_centred", "gather", "rotate", "splat"]

_NATIVE_MAX_SIDE = 1290  # the native kernels' int32 cube index: side³ < 2³¹


def _full_coords(box: int, device) -> torch.Tensor:
    axis = torch.arange(box, device=device) - box // 2
    kz, ky, kx = torch.meshgrid(axis, axis, axis, indexing="ij")
    return torch.stack([kx, ky, kz], -1)  # (S, S, S, 3) xyz


def full_centred(half: torch.Tensor) -> torch.Tensor:
    """Half grids ``(K, S, S, S//2+1)`` complex -> full centred ``(K, 2, S, S, S)`` real."""
    box = half.shape[-2]
    k = _full_coords(box, half.device)
    flip = k[..., 0] < 0
    src = torch.where(flip[..., None], -k, k) % box
    flat = (src[..., 2] * box + src[..., 1]) * (box // 2 + 1) + src[..., 0]
    values = half.reshape(half.shape[0], -1)[:, flat.reshape(-1)].reshape(-1, box, box, box)
    values = torch.where(flip, values.conj(), values)
    return torch.view_as_real(values).permute(0, 4, 1, 2, 3).contiguous()


def _grid(coords: torch.Tensor, box: int, dtype: torch.dtype) -> torch.Tensor:
    """Frequencies ``(..., 3)`` -> grid_sample's normalised coordinates (align_corners)."""
    return ((coords + box // 2) * (2.0 / (box - 1)) - 1.0).to(dtype)


def gather(full: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Samples of one full centred volume ``(C, S, S, S)`` at ``coords (O, V, 3)`` ->
    ``(O, V)`` complex (C = 2) or real (C = 1)."""
    box = full.shape[-1]
    grid = _grid(coords, box, full.dtype)[None, :, :, None, :]  # (1, O, V, 1, 3)
    out = functional.grid_sample(
        full[None], grid, mode="bilinear", padding_mode="zeros", align_corners=True
    )
    out = out[0, :, :, :, 0]  # (C, O, V)
    if full.shape[0] == 2:
        return torch.complex(out[0], out[1])
    return out[0]


def _cube(full: torch.Tensor, r: int) -> torch.Tensor:
    """``(K, 2, S, S, S)`` -> ``(K, (2r+1)³)`` complex: the cube ``|k_xyz| ≤ r`` around the
    centre, flattened (z, y, x), zero where it passes the volume's edges."""
    S = full.shape[-1]
    lo, hi = S // 2 - r, S // 2 + r + 1
    cube = full[..., max(lo, 0) : hi, max(lo, 0) : hi, max(lo, 0) : hi]
    cube = functional.pad(cube, (max(-lo, 0), max(hi - S, 0)) * 3)
    return torch.view_as_complex(cube.movedim(1, -1).contiguous()).reshape(full.shape[0], -1)


def _cells(
    rotations: torch.Tensor, coords: torch.Tensor, r: int, chunk_points: int
) -> Iterator[tuple[slice, slice, torch.Tensor, torch.Tensor]]:
    """Chunks of the points ``coords @ A_o`` in the cube of :func:`_cube` (side ``2r+1``):
    ``(orientations, voxels, idx (o·n,), frac (o, 3, n, 2))``, the flat index of each point's
    cell and its fractions along x, y, z (each twice: lerp weights for re and im). About
    ``chunk_points`` points a chunk, so that the temporaries stay in cache."""
    V, side = coords.shape[0], 2 * r + 1
    # float32 holds the flat index exactly below 2^24
    idx_dtype = coords.dtype if side**3 < 1 << 24 else torch.float64
    strides = torch.tensor([1, side, side * side], dtype=idx_dtype, device=coords.device)
    # each frequency twice (weights for re and im without a copy); ones add r inside the GEMM
    ones = torch.ones((1, 2 * V), dtype=coords.dtype, device=coords.device)
    coords_h = torch.cat([coords.T.repeat_interleave(2, dim=1), ones])  # (4, 2V)
    step = max(1, chunk_points // max(V, 1))  # orientations a chunk
    pieces = -(-V // max(chunk_points, 1))  # one orientation passing the chunk: equal pieces
    span = -(-V // pieces)
    for o0 in range(0, rotations.shape[0], step):
        rot = rotations[o0 : o0 + step].to(coords)
        o = rot.shape[0]
        shift = torch.full((3 * o, 1), float(r), dtype=coords.dtype, device=coords.device)
        rot_h = torch.cat([rot.transpose(1, 2).reshape(3 * o, 3), shift], dim=1)
        for v0 in range(0, V, span):
            n = min(span, V - v0)
            p = (rot_h @ coords_h[:, 2 * v0 : 2 * (v0 + n)]).view(o, 3, n, 2)
            frac = torch.frac(p)
            base = (p[..., 0] - frac[..., 0]).clamp_(0, 2 * r - 1)  # p ∈ (0, 2r): for rounding
            idx = torch.matmul(strides, base.to(idx_dtype)).reshape(o * n).long()
            yield slice(o0, o0 + o), slice(v0, v0 + n), idx, frac


def _corner_offsets(side: int) -> list[int]:
    """Flat offsets of a cell's eight corners, ``dz·4 + dy·2 + dx`` order."""
    return [(dz * side + dy) * side + dx for dz in (0, 1) for dy in (0, 1) for dx in (0, 1)]


def rotate(
    full: torch.Tensor,
    rotations: torch.Tensor,
    coords: torch.Tensor,
    radius: float,
    chunk_points: int = 1 << 17,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Trilinear samples of full centred volumes ``(K, 2, S, S, S)`` at ``coords @ A_o``:
    rotations ``(O, 3, 3)``, frequencies ``coords (V, 3)`` xyz with ``|k| < radius`` ->
    ``(K, O, V)`` complex (written into ``out`` if given); equals :func:`gather` (zeros outside
    the volume).

    On the CPU (float32 or float64) one fused C++ loop does it (:mod:`.native`: coordinate,
    cell, eight corners, three lerps per sample, about 10x faster); elsewhere, or where that
    kernel cannot be built or ``DENOVO3D_NATIVE=0``, the torch path :func:`_rotate_torch` with
    the same cube and cells (``chunk_points`` sizes its chunks).
    """
    K, V = full.shape[0], coords.shape[0]
    r = max(1, math.ceil(radius))
    table = _cube(full, r)  # (K, side³)
    if out is None:
        out = torch.empty((K, rotations.shape[0], V), dtype=table.dtype, device=full.device)
    op = _native_op(table, coords, out) if 2 * r + 1 <= _NATIVE_MAX_SIDE else None
    if op is None:
        return _rotate_torch(table, rotations, coords, r, chunk_points, out)
    rot = rotations.to(coords).contiguous()
    op(torch.view_as_real(table), rot, coords.contiguous(), r, torch.view_as_real(out))
    return out


def _native_op(
    table: torch.Tensor, coords: torch.Tensor, out: torch.Tensor
) -> Callable[..., None] | None:
    """The compiled kernel where it applies (CPU, float32/64 throughout, no autograd, voxels
    contiguous in ``out``), else ``None``."""
    if not (
        _native_applies(table, coords, out)
        and table.dtype in (torch.complex64, torch.complex128)
        and out.dtype == table.dtype
        and coords.dtype == table.real.dtype
        and out.dim() == 3
        and out.stride(-1) == 1
    ):
        return None
    return native.load()


def _native_applies(*tensors: torch.Tensor) -> bool:
    """What both native kernels need of their tensors: on the CPU and, under grad mode, none
    requiring a gradient (the kernels have no backward); and ``DENOVO3D_NATIVE`` not 0."""
    return (
        all(t.device.type == "cpu" for t in tensors)
        and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
        and native.enabled()
    )


def _rotate_torch(
    table: torch.Tensor,
    rotations: torch.Tensor,
    coords: torch.Tensor,
    r: int,
    chunk_points: int,
    out: torch.Tensor,
) -> torch.Tensor:
    """:func:`rotate` from torch ops (the CUDA path): the corners of a cell are eight 1-D gathers
    from the flattened cube ``table (K, (2r+1)³)`` (offset views: no index arithmetic per
    corner), weighted by three ``lerp``; orientations (or voxels) go by chunks of about
    ``chunk_points`` samples so that the temporaries stay in cache."""
    K = table.shape[0]
    offsets = _corner_offsets(2 * r + 1)
    n_base = table.shape[1] - offsets[-1]
    for o_sl, v_sl, idx, frac in _cells(rotations, coords, r, chunk_points):
        wx, wy, wz = frac.unbind(1)  # (o, n, 2) each
        for k in range(K):
            corners = torch.empty((8, idx.numel()), dtype=table.dtype, device=table.device)
            for c, off in enumerate(offsets):
                torch.index_select(table[k, off : off + n_base], 0, idx, out=corners[c])
            g = torch.view_as_real(corners).view(8, *wx.shape)  # corner dz·4 + dy·2 + dx
            a = torch.lerp(g[0::2], g[1::2], wx)  # along x -> (4, o, n, 2)
            b = torch.lerp(a[0::2], a[1::2], wy)  # along y -> (2, o, n, 2)
            torch.lerp(b[0], b[1], wz, out=torch.view_as_real(out[k, o_sl, v_sl]))
    return out


def splat(
    values: torch.Tensor,
    weights: torch.Tensor,
    rotations: torch.Tensor,
    coords: torch.Tensor,
    radius: float,
    box: int,
    chunk_points: int = 1 << 17,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Adjoint of :func:`rotate` for complex ``values`` and real ``weights`` ``(O, V)`` at once,
    folded onto the half grid like :func:`backproject` -> ``(S, S, S//2+1)`` complex and real
    (``S = box``).

    The three channels (re, im, weight) are spread over the eight corners by the lerp weights'
    adjoint and added into the flattened cube around the centre: on the CPU by one fused C++
    loop (:mod:`.native`), elsewhere (or with ``DENOVO3D_NATIVE=0``) with ``scatter_add_``
    (:func:`_splat_torch`), several times faster than ``grid_sampler_3d_backward``.
    """
    r = max(1, math.ceil(radius))
    side = 2 * r + 1
    acc = torch.zeros((3, side**3), dtype=weights.dtype, device=weights.device)
    op = _native_splat_op(values, weights, coords) if side <= _NATIVE_MAX_SIDE else None
    if op is None:
        _splat_torch(values, weights, rotations, coords, r, chunk_points, acc)
    else:
        rot = rotations.to(coords).contiguous()
        op(torch.view_as_real(values), weights, rot, coords.contiguous(), r, acc)
    full = torch.zeros((3, box, box, box), dtype=acc.dtype, device=acc.device)
    lo = box // 2 - r
    a, b = max(lo, 0), min(lo + side, box)  # the cube's part inside the volume
    cube = acc.view(3, side, side, side)[:, a - lo : b - lo, a - lo : b - lo, a - lo : b - lo]
    full[:, a:b, a:b, a:b] = cube
    return _fold(torch.complex(full[0], full[1])), _fold(full[2])


def _native_splat_op(
    values: torch.Tensor, weights: torch.Tensor, coords: torch.Tensor
) -> Callable[..., None] | None:
    """The compiled scatter where it applies (CPU, float32/64 throughout, no autograd, voxels
    contiguous), else ``None``."""
    if not (
        _native_applies(values, weights, coords)
        and weights.dtype in (torch.float32, torch.float64)
        and values.dtype == weights.dtype.to_complex()
        and coords.dtype == weights.dtype
        and values.dim() == 2
        and values.stride(-1) == 1
        and weights.dim() == 2
        and weights.stride(-1) == 1
    ):
        return None
    return native.load_splat()


def _splat_torch(
    values: torch.Tensor,
    weights: torch.Tensor,
    rotations: torch.Tensor,
    coords: torch.Tensor,
    r: int,
    chunk_points: int,
    acc: torch.Tensor,
) -> None:
    """:func:`splat` from torch ops into ``acc (3, (2r+1)³)`` (the CUDA path)."""
    offsets = _corner_offsets(2 * r + 1)
    n_base = acc.shape[1] - offsets[-1]
    for o_sl, v_sl, idx, frac in _cells(rotations, coords, r, chunk_points):
        ch = torch.stack([values[o_sl, v_sl].real, values[o_sl, v_sl].imag, weights[o_sl, v_sl]])
        wx, wy, wz = frac[..., 0].unbind(1)  # (o, n) each
        c = ch.new_empty((2, 2, 2, *ch.shape))  # corners dz, dy, dx: lerp's adjoint, in place
        torch.mul(ch, wz, out=c[1, 0, 0])
        torch.sub(ch, c[1, 0, 0], out=c[0, 0, 0])
        torch.mul(c[:, 0, 0], wy, out=c[:, 1, 0])
        c[:, 0, 0] -= c[:, 1, 0]
        torch.mul(c[:, :, 0], wx, out=c[:, :, 1])
        c[:, :, 0] -= c[:, :, 1]
        corners = c.view(8, 3, -1)
        index = idx.expand(3, -1)
        for k, off in enumerate(offsets):
            acc[:, off : off + n_base].scatter_add_(1, index, corners[k])


def backproject(values: torch.Tensor, coords: torch.Tensor, box: int) -> torch.Tensor:
    """Adjoint of :func:`gather`, folded onto the half grid: ``values (O, V)`` at ``coords
    (O, V, 3)`` -> ``(S, S, S//2+1)`` with ``H(k) = Full(k) + conj(Full(-k))``.

    A voxel of the particle's half grid stands for itself and its Friedel mate, so the caller
    scales values by half the Friedel weight (1 for ``kx > 0``, ½ on ``kx = 0``).
    """
    if values.is_complex():
        grad = torch.stack([values.real, values.imag])[None, :, :, :, None]
    else:
        grad = values[None, None, :, :, None]
    dtype = grad.dtype
    channels = grad.shape[1]
    grid = _grid(coords, box, dtype)[None, :, :, None, :]
    shape = (1, channels, box, box, box)
    dummy = torch.zeros(shape, dtype=dtype, device=values.device)
    full, _ = torch.ops.aten.grid_sampler_3d_backward(
        grad.contiguous(), dummy, grid, 0, 0, True, [True, False]
    )
    full = full[0]
    vol = torch.complex(full[0], full[1]) if channels == 2 else full[0]
    return _fold(vol)


@functools.lru_cache(maxsize=8)
def _fold_index(box: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices into a full centred ``(S, S, S)`` grid of ``+k`` and ``-k`` for every
    half-grid voxel ``k`` (``-S/2`` wraps), kept per box: building them cost 13 ms a call at
    box 64, twice per :func:`splat`."""
    k = rfft_coords(box, device).long()  # (S, S, H, 3)
    pos = (k + box // 2) % box
    neg = (-k + box // 2) % box
    return tuple(((p[..., 2] * box + p[..., 1]) * box + p[..., 0]).reshape(-1) for p in (pos, neg))


def _fold(full: torch.Tensor) -> torch.Tensor:
    """Full centred ``(S, S, S)`` -> half grid with the Friedel mates added."""
    box = full.shape[-1]
    pos, neg = _fold_index(box, full.device)
    flat = full.reshape(-1)
    a, b = flat.index_select(0, pos), flat.index_select(0, neg)
    return (a + (b.conj() if full.is_complex() else b)).view(box, box, box // 2 + 1)
