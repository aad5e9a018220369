"""Point groups against RELION 5.0.1's operators; closure, order; symmetrise."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from denovo3d.geometry.symmetry import (
    UnknownGroupError,
    point_group,
    rotate_map,
    symmetrise,
)
from tests.symmetry_phantoms import phantom

FIXTURE = Path("/work/shared/reference/relion-symmetry-operators.json")
RELION = json.loads(FIXTURE.read_text())["groups"] if FIXTURE.is_file() else {}


def _set_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest distance from a matrix of one set to the nearest of the other (both ways)."""
    d = (a[:, None] - b[None]).abs().amax((-1, -2))
    return max(float(d.min(1).values.max()), float(d.min(0).values.max()))


@pytest.mark.skipif(not RELION, reason=f"{FIXTURE} not found")
@pytest.mark.parametrize("name", sorted(RELION))
def test_operators_match_relion(name: str) -> None:
    ref = torch.tensor(RELION[name], dtype=torch.float64)
    ours = point_group(name).operators
    assert ours.shape == ref.shape
    assert _set_distance(ours, ref) < 1e-5
    # The fixture's matrices as printed, or transposed: a group holds each element's inverse
    # (= transpose), so both readings give the same set; pin that too.
    assert _set_distance(ours, ref.transpose(1, 2)) < 1e-5
    assert torch.allclose(ours[0], torch.eye(3, dtype=torch.float64))


ALL = [f"C{n}" for n in (1, 2, 5, 12, 17)] + ["CI", "CS", "C3V", "C5H", "S4", "S10"]
ALL += ["D2", "D7", "D5V", "D6H", "T", "TD", "TH", "O", "OH", "I", "I1", "I2", "I3", "I4"]
ALL += ["IH", "I1H", "I3H", "I4H"]
ORDER = {"I": 60, "IH": 120, "T": 12, "TD": 24, "TH": 24, "O": 24, "OH": 48, "CI": 2, "CS": 2}


@pytest.mark.parametrize("name", ALL)
def test_closed_orthogonal_right_order(name: str) -> None:
    g = point_group(name)
    ops = g.operators
    eye = torch.eye(3, dtype=torch.float64)
    assert torch.allclose(ops @ ops.transpose(1, 2), eye.expand_as(ops), atol=1e-9)
    products = (ops[:, None] @ ops[None]).reshape(-1, 3, 3)
    assert _set_distance(products, ops) < 1e-6  # closed
    n = int("".join(c for c in name if c.isdigit()) or 0)
    expected = ORDER.get(name)
    if name.startswith("I") and expected is None:
        expected = 120 if name.endswith("H") else 60
    if expected is None:
        kind = name[0] + "".join(c for c in name[1:] if not c.isdigit())
        expected = {"C": n, "CV": 2 * n, "CH": 2 * n, "S": n, "D": 2 * n, "DV": 4 * n, "DH": 4 * n}
        expected = expected[kind]
    assert g.order == expected
    dets = torch.linalg.det(ops)
    assert g.is_proper == bool((dets > 0).all())


@pytest.mark.parametrize("bad", ["C0", "X3", "S3", "I5", "D", "C123", ""])
def test_unknown_group_is_clear(bad: str) -> None:
    with pytest.raises(UnknownGroupError, match="symmetry"):
        point_group(bad)


def test_case_insensitive() -> None:
    assert point_group("d7").name == "D7"
    assert torch.equal(point_group("i").operators, point_group("I2").operators)


@pytest.mark.parametrize("name", ["C7", "D2", "T", "I"])
def test_symmetrise_keeps_symmetric_map_and_is_idempotent(name: str) -> None:
    p = phantom(name, 48, seed=3, max_radius_px=16)
    s = symmetrise(p, name)
    assert float((s - p).norm() / p.norm()) < 0.01
    ss = symmetrise(s, name)
    assert float((ss - s).norm() / s.norm()) < 0.01


def test_symmetrise_commutes_with_group_operators() -> None:
    """S(g·V) = S(V) for g in G, and S(R·V) = R·S'(V) with the conjugated group R ᵀGR."""
    v = phantom("C1", 48, seed=4, max_radius_px=16)
    g = point_group("D3")
    sv = symmetrise(v, g)
    gv = rotate_map(v, g.operators[4])
    assert float((symmetrise(gv, g) - sv).norm() / sv.norm()) < 0.03  # two interpolations
    r = torch.tensor([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    conj = type(g)("conj", r.T @ g.operators @ r)
    lhs = symmetrise(rotate_map(v, r), g)
    rhs = rotate_map(symmetrise(v, conj), r)
    assert float((lhs - rhs).norm() / lhs.norm()) < 0.03
