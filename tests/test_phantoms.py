"""Phantoms: deterministic, protein-like in extent, with exactly the symmetry they claim."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as nnf

from denovo3d.fourier import rfft_radius
from denovo3d.phantoms import PHANTOMS, make_phantom, phantom_atoms

BOX, PIXEL = 48, 8.0


def _low_pass(volume: torch.Tensor, resolution_a: float, pixel_a: float) -> torch.Tensor:
    box = volume.shape[-1]
    k = rfft_radius(box) / (box * pixel_a)  # 1/Å
    ft = torch.fft.rfftn(volume.double()) * torch.exp(-2 * (k * resolution_a) ** 2)
    return torch.fft.irfftn(ft, s=volume.shape)


def _rotate(volume: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """``out(x) = volume(Rᵀ x)`` about voxel box//2 (xyz), trilinear."""
    s = volume.shape[-1]
    c = torch.arange(s, dtype=torch.float64) - s // 2
    zz, yy, xx = torch.meshgrid(c, c, c, indexing="ij")
    source = torch.stack([xx, yy, zz], -1) @ R.double()
    grid = (source + s // 2) / (s - 1) * 2 - 1
    return nnf.grid_sample(volume[None, None].double(), grid[None], align_corners=True)[0, 0]


def _axis_rotation(axis: str, angle_deg: float) -> torch.Tensor:
    c, s = math.cos(math.radians(angle_deg)), math.sin(math.radians(angle_deg))
    if axis == "z":
        return torch.tensor([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])
    if axis == "x":
        return torch.tensor([[1.0, 0, 0], [0, c, -s], [0, s, c]])
    return torch.tensor([[c, 0, s], [0, 1.0, 0], [-s, 0, c]])


def _cc(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


@pytest.fixture(scope="module")
def maps() -> dict[str, torch.Tensor]:
    return {name: _low_pass(make_phantom(name, BOX, PIXEL), 15.0, PIXEL) for name in PHANTOMS}


def test_deterministic() -> None:
    for name in PHANTOMS:
        assert torch.equal(make_phantom(name, 32, 12.0), make_phantom(name, 32, 12.0))


def test_protein_like_and_inside_the_sphere(maps: dict[str, torch.Tensor]) -> None:
    for name in PHANTOMS:
        atoms = phantom_atoms(name)
        assert len(atoms) > 400  # hundreds of residues, not a few blobs
        steps = torch.from_numpy(atoms[1:] - atoms[:-1]).norm(dim=1)
        assert float(steps.median()) < 6.0  # a chain of residues
        volume = make_phantom(name, BOX, PIXEL)
        assert volume.dtype == torch.float32 and volume.shape == (BOX,) * 3
        c = torch.arange(BOX) - BOX // 2
        r = torch.sqrt(c[:, None, None] ** 2 + c[None, :, None] ** 2 + c[None, None, :] ** 2)
        assert float(volume[r > 0.35 * BOX].max()) < 1e-3


def test_scale_aware_same_protein_at_any_sampling() -> None:
    coarse = make_phantom("asymmetric", 32, 12.0)
    fine = make_phantom("asymmetric", 48, 8.0)
    # Fourier-crop the fine map to the coarse sampling (same 384 Å box)
    ft = torch.fft.fftshift(torch.fft.fftn(torch.fft.ifftshift(fine.double())))
    cropped = ft[8:40, 8:40, 8:40]
    resampled = torch.fft.fftshift(torch.fft.ifftn(torch.fft.ifftshift(cropped))).real
    assert _cc(_low_pass(resampled, 30.0, 12.0), _low_pass(coarse, 30.0, 12.0)) > 0.98


def test_c6_hexamer_symmetry(maps: dict[str, torch.Tensor]) -> None:
    v = maps["c6_hexamer"]
    assert PHANTOMS["c6_hexamer"].symmetry == "C6"
    assert _cc(v, _rotate(v, _axis_rotation("z", 60.0))) > 0.99
    assert _cc(v, _rotate(v, _axis_rotation("z", 120.0))) > 0.99
    for axis, angle in (("z", 30.0), ("x", 180.0), ("y", 180.0), ("x", 90.0)):
        assert _cc(v, _rotate(v, _axis_rotation(axis, angle))) < 0.9, (axis, angle)


def test_d2_tetramer_symmetry(maps: dict[str, torch.Tensor]) -> None:
    v = maps["d2_tetramer"]
    for axis in "zxy":
        assert _cc(v, _rotate(v, _axis_rotation(axis, 180.0))) > 0.99, axis
    assert _cc(v, _rotate(v, _axis_rotation("z", 90.0))) < 0.9


def test_asymmetric_has_no_symmetry(maps: dict[str, torch.Tensor]) -> None:
    v = maps["asymmetric"]
    for axis, angle in (("z", 180.0), ("x", 180.0), ("y", 180.0), ("z", 120.0), ("x", 90.0)):
        assert _cc(v, _rotate(v, _axis_rotation(axis, angle))) < 0.8, (axis, angle)


def test_too_small_a_box_is_refused() -> None:
    with pytest.raises(ValueError, match="use a box of at least"):
        make_phantom("c6_hexamer", 16, 8.0)
    with pytest.raises(ValueError, match="unknown phantom"):
        make_phantom("sphere", 32, 8.0)
