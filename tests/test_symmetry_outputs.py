"""The de novo job's symmetry step: initial_model.mrc, initial_model_symmetry.star, the report."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from denovo3d import symmetry_align
from denovo3d.geometry.euler import euler_to_matrix, random_rotations
from denovo3d.geometry.symmetry import point_group, rotate_map, symmetrise
from denovo3d.io.mrc import read_mrc
from denovo3d.io.relion_outputs import write_initial_model
from denovo3d.io.star import read_star
from denovo3d.report import find_job
from denovo3d.report._page import _symmetry_html
from denovo3d.symmetry_search import orientation_error_deg
from tests.symmetry_phantoms import phantom

APIX = 3.5


def _run(tmp_path: Path, volume: torch.Tensor, sym: str) -> SimpleNamespace:
    """write_initial_model on a one-class run whose class is ``volume``."""
    cfg = SimpleNamespace(
        symmetry=sym, output_root=str(tmp_path / "run"), random_seed=3, particle_diameter_a=91.0
    )
    state = SimpleNamespace(refs=volume[None].float(), pdf_class=torch.ones(1))
    ps = SimpleNamespace(pixel_size_a=APIX, box=volume.shape[-1])
    lines: list[str] = []
    path = write_initial_model(cfg, state, ps, lines.append)
    return SimpleNamespace(path=path, star=tmp_path / "initial_model_symmetry.star", log=lines)


def _corr(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x - x.mean(), y - y.mean()
    return float((x * y).sum() / (x.norm() * y.norm()))


def test_symmetry_step_writes_aligned_map_and_record_the_report_shows(tmp_path: Path) -> None:
    truth = random_rotations(1, torch.Generator().manual_seed(7))[0]
    shift = torch.tensor([1.5, -1.0, 0.5], dtype=torch.float64)
    volume = phantom("C4", 32, seed=2, rotation=truth, shift_px=shift, max_radius_px=11.0)
    diameters = []

    def spy(v: torch.Tensor, sym: str, params: symmetry_align.AlignParams):
        diameters.append(params.mask_diameter_px)
        return symmetry_align.align_requested(v, sym, params)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("denovo3d.io.relion_outputs.align_requested", spy)
        out = _run(tmp_path, volume, "C4")
    assert diameters == [pytest.approx(26.0)]  # the job's --particle_diameter, 91 Å at 3.5 Å
    aligned, angpix = read_mrc(out.path)
    assert angpix == pytest.approx(APIX)
    blocks = read_star(out.star)
    general = blocks["symmetry_general"]
    assert general["rlnSymmetryGroup"] == "C4" and general["denovoSymmetryRequested"] == "C4"
    angles = [torch.tensor(float(general[f"rlnAngle{a}"])) for a in ("Rot", "Tilt", "Psi")]
    rotation = euler_to_matrix(*angles).double()
    assert float(orientation_error_deg(rotation, truth, point_group("C4"))) < 2.0
    # the centre shift in Å puts the symmetry axis where the phantom's was
    centre = torch.tensor([float(general[f"rlnOrigin{a}Angst"]) for a in "XYZ"]) / APIX
    axis = truth @ torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    miss = centre.double() - shift
    assert float((miss - (miss @ axis) * axis).norm()) < 0.5
    # the map written is the input turned and shifted as recorded, then symmetrised
    expected = symmetrise(rotate_map(volume, rotation, centre.double()), "C4")
    assert _corr(torch.from_numpy(aligned.copy()).double(), expected) > 0.999
    ops = blocks["symmetry_operators"]
    assert isinstance(ops, pd.DataFrame) and len(ops) == 3
    assert sorted(ops["denovoOperatorAngleDeg"].round().tolist()) == [90.0, 90.0, 180.0]
    assert (ops["denovoOperatorCorrelation"] > 0.9).all()
    page = _symmetry_html(find_job(tmp_path))
    assert "initial_model_symmetry.star" in page and "denovoOperatorCorrelation" in page
    assert "<td>C4</td>" in page and "unreadable" not in page
    # the job's log says what was found, in the numbers of the STAR file
    (line,) = out.log
    assert line.startswith("symmetry: C4 axes at rot ") and "mean correlation" in line
    assert f"tilt {float(general['rlnAngleTilt']):.2f}" in line


def test_auto_on_an_asymmetric_map_says_c1_names_runner_up_and_keeps_the_map(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a few candidates keep this fast; calibration over all of them: test_symmetry_recovery.py
    monkeypatch.setattr(symmetry_align, "CANDIDATES", ("C2", "C3", "C4"))
    # seed 5: of seeds 0-9 of this small subunit, seed 4 alone has a near 2-fold at the band
    # that boxes under 64 have kept since 2026-12-01 (3-12 cycles; C2 0.49 at significance 10.2,
    # the others at most 0.33 and 4.3), and this test is about the C1 path, not calibration
    volume = phantom("C1", 32, seed=5, max_radius_px=11.0)
    out = _run(tmp_path, volume, "auto")
    aligned, _ = read_mrc(out.path)
    assert torch.equal(torch.from_numpy(aligned.copy()), volume.float())
    blocks = read_star(out.star)
    general = blocks["symmetry_general"]
    assert general["rlnSymmetryGroup"] == "C1" and general["denovoDetectedGroup"] == "C1"
    assert general["denovoSymmetryRequested"] == "auto"
    assert general["denovoSymmetryRunnerUp"] in blocks["symmetry_detection"]["denovoGroup"].values
    assert general["denovoSymmetryAlsoHolds"] == "none"  # only a verdict Dn names its Cn
    runner = general["denovoSymmetryRunnerUp"]
    assert out.log == [
        f"symmetry: no clear group (the most significant: {runner}, evidence "
        f"{general['denovoSymmetryEvidence']:.1f}): the map is kept as it is"
    ]
    assert "symmetry_operators" not in blocks
    page = _symmetry_html(find_job(tmp_path))
    assert "denovoGroupSignificance" in page and "denovoSymmetryRunnerUp" in page
