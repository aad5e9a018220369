"""The report of a job, its ChimeraX script, and flip-hand.

A fake job directory holds RELION-named outputs (4 written iterations, 2 classes, model/data/
optimiser STAR files with RELION's labels); the page is rendered in headless Chromium, which must
show every image, and the screenshot must not be blank.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from denovo3d.chimerax import (
    SymmetryAxis,
    enclosing_level,
    expected_volume_a3,
    point_group_axes,
    symmetry_axes_from_files,
)
from denovo3d.cli import main as cli_main
from denovo3d.cli.flip_hand import flip_hand
from denovo3d.io.mrc import read_mrc, write_mrc
from denovo3d.io.star import write_star
from denovo3d.report import convergence_table, find_job, pose_changes

BOX, APIX, N_PARTICLES = 32, 4.0, 60
ITERATIONS = [0, 10, 20, 30]


def blobs(centres_px: list[tuple[float, float, float]], sigma_px: float = 2.5) -> np.ndarray:
    """Gaussian blobs at xyz centres (pixels from the box centre) in a ``(z, y, x)`` box."""
    z, y, x = np.meshgrid(*(np.arange(BOX) - BOX // 2,) * 3, indexing="ij")
    out = np.zeros((BOX, BOX, BOX), np.float32)
    for cx, cy, cz in centres_px:
        out += np.exp(-((x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2) / (2 * sigma_px**2))
    return out


TRUTH = {  # an asymmetric "L" of blobs, and a different shape for class 2
    1: blobs([(0, 0, 0), (6, 0, 0), (0, 5, 0), (0, 0, 4)]),
    2: blobs([(-4, -4, 0), (4, 4, 0), (0, 0, 3)], sigma_px=3.0),
}


def make_job(job: Path, symmetry: bool = True) -> Path:
    """A RELION-named job directory: run_itNNN_{classKKK.mrc,model,data,optimiser}.star."""
    rng = np.random.default_rng(0)
    job.mkdir(parents=True, exist_ok=True)
    names = [f"Subtomograms/sub_{i:04d}.mrc" for i in range(N_PARTICLES)]
    rot, psi = (rng.uniform(-180, 180, N_PARTICLES) for _ in range(2))
    tilt = np.rad2deg(np.arccos(rng.uniform(-1, 1, N_PARTICLES)))
    for n, it in enumerate(ITERATIONS):
        emerge = n / (len(ITERATIONS) - 1)
        for k, truth in TRUTH.items():
            noise = rng.normal(0, 0.6 * (1 - emerge) + 0.05, truth.shape)
            write_mrc(job / f"run_it{it:03d}_class{k:03d}.mrc", emerge * truth + noise, APIX)
        fractions = [0.5 + 0.2 * emerge, 0.5 - 0.2 * emerge]
        general = {
            "rlnReferenceDimensionality": 3,
            "rlnDataDimensionality": 3,
            "rlnOriginalImageSize": BOX,
            "rlnCurrentResolution": 40.0 - 8 * n,
            "rlnCurrentImageSize": BOX,
            "rlnPixelSize": APIX,
            "rlnNrClasses": 2,
            "rlnTau2FudgeFactor": 1.0 + n,
            "rlnLogLikelihood": 1e7 + n,
            "rlnAveragePmax": 0.2 + 0.2 * n,
        }
        classes = pd.DataFrame(
            {
                "rlnReferenceImage": [f"run_it{it:03d}_class{k:03d}.mrc" for k in TRUTH],
                "rlnClassDistribution": fractions,
                "rlnAccuracyRotations": [10.0, 12.0],
                "rlnAccuracyTranslationsAngst": [4.0, 4.0],
                "rlnEstimatedResolution": [36.0 - 7 * n, 38.0 - 6 * n],
                "rlnOverallFourierCompleteness": [1.0, 1.0],
            }
        )
        write_star(
            job / f"run_it{it:03d}_model.star", {"model_general": general, "model_classes": classes}
        )
        rot = (rot + rng.normal(0, 30 * (1 - emerge), N_PARTICLES) + 180) % 360 - 180
        particles = pd.DataFrame(
            {
                "rlnImageName": names,
                "rlnOpticsGroup": 1,
                "rlnAngleRot": rot,
                "rlnAngleTilt": tilt,
                "rlnAnglePsi": psi,
                "rlnOriginXAngst": 0.0,
                "rlnOriginYAngst": 0.0,
                "rlnOriginZAngst": 0.0,
                "rlnClassNumber": np.where(np.arange(N_PARTICLES) < 0.6 * N_PARTICLES, 1, 2),
                "rlnMaxValueProbDistribution": 0.5,
            }
        )
        optics = pd.DataFrame(
            {
                "rlnOpticsGroup": [1],
                "rlnOpticsGroupName": ["optics1"],
                "rlnImagePixelSize": [APIX],
                "rlnImageSize": [BOX],
                "rlnImageDimensionality": [3],
            }
        )
        write_star(job / f"run_it{it:03d}_data.star", {"optics": optics, "particles": particles})
        optimiser = {
            "rlnOutputRootName": "run",
            "rlnCurrentIteration": it,
            "rlnNumberOfIterations": ITERATIONS[-1],
            "rlnGradCurrentStepsize": 0.9 - 0.1 * n,
            "rlnParticleDiameter": 100.0,
            "rlnChangesOptimalOrientations": 30.0 * (1 - emerge),
        }
        write_star(job / f"run_it{it:03d}_optimiser.star", {"optimiser_general": optimiser})
    if symmetry:
        write_mrc(job / "initial_model.mrc", TRUTH[1], APIX)
        scores = {
            "best_group": "D2",
            "scores": [
                {"group": "C1", "score": 0.0},
                {"group": "C2", "score": 0.61},
                {"group": "D2", "score": 0.74},
            ],
        }
        (job / "symmetry_scores.json").write_text(json.dumps(scores))
    return job


@pytest.fixture(scope="module")
def reported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    job = make_job(tmp_path_factory.mktemp("report") / "InitialModel" / "job012")
    assert cli_main(["report", str(job)]) == 0
    return job


def test_report_files_and_numbers(reported: Path) -> None:
    assert (reported / "report.html").is_file()
    pngs = sorted(p.name for p in (reported / "report_files").glob("*.png"))
    assert pngs == [
        "angular_distribution.png",
        "class001_iterations.png",
        "class002_iterations.png",
        "convergence.png",
        "fsc_successive.png",
        "initial_model.png",
    ]
    table = convergence_table(find_job(reported))
    assert list(table["iteration"]) == ITERATIONS
    assert table["class1_fraction"].iloc[-1] == pytest.approx(0.7)
    assert table["orientation_change_deg"].iloc[1] > table["orientation_change_deg"].iloc[-1]
    page = (reported / "report.html").read_text()
    assert "D2" in page and "0.74" in page  # the symmetry scores table


def test_report_tolerates_missing_files(tmp_path: Path) -> None:
    job = make_job(tmp_path / "job", symmetry=False)
    (job / "run_it010_data.star").unlink()
    (job / "run_it020_optimiser.star").unlink()
    (job / "run_it020_class002.mrc").write_bytes(b"not a map")
    assert cli_main(["report", str(job), "--o", str(tmp_path / "r.html")]) == 0
    page = (tmp_path / "r.html").read_text()
    assert "no run_itNNN_data.star for iteration(s) 010" in page
    assert "no initial_model.mrc" in page and "not run" in page
    assert "run_it020_class002.mrc: not a readable MRC file" in page
    assert len(list((tmp_path / "r_files").glob("class*_iterations.png"))) == 2


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _chromium_args(profile: Path) -> list[str]:
    return [
        _chromium() or "chromium",
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=5000",
    ]


@pytest.mark.skipif(_chromium() is None, reason="chromium not installed (apt-get install chromium)")
def test_report_renders_in_chromium(reported: Path, tmp_path: Path) -> None:
    url = (reported / "report.html").resolve().as_uri()
    dom = subprocess.run(
        [*_chromium_args(tmp_path / "p1"), "--dump-dom", url],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    check = re.search(r'id="image-check" data-loaded="(\d+)" data-total="(\d+)"', dom)
    assert check, "the page's image check did not run"
    loaded, total = map(int, check.groups())
    assert total == 6 and loaded == total
    shot = tmp_path / "report.png"
    subprocess.run(
        [*_chromium_args(tmp_path / "p2"), f"--screenshot={shot}", "--window-size=1280,2400", url],
        capture_output=True,
        timeout=120,
        check=True,
    )
    from matplotlib.image import imread

    pixels = imread(shot)[..., :3]
    assert pixels.shape[:2] == (2400, 1280)
    assert pixels.std() > 0.05  # not blank
    assert (pixels.mean(axis=-1) < 0.5).mean() > 0.01  # dark content: maps, text, lines


def test_view_cxc_names_existing_files_and_draws_axes(reported: Path) -> None:
    text = (reported / "view.cxc").read_text()
    opened = re.findall(r'^open "([^"]+)"', text, flags=re.M)
    assert opened == ["initial_model.mrc", "run_it030_class001.mrc", "run_it030_class002.mrc"]
    assert all((reported / name).is_file() for name in opened)
    levels = [float(v) for v in re.findall(r"^volume #\d+ level (\S+)", text, flags=re.M)]
    assert len(levels) == 3 and 0 < levels[0] < TRUTH[1].max()
    assert len(re.findall(r"^shape cylinder ", text, flags=re.M)) == 3  # D2: three 2-folds


def test_point_group_axes_counts() -> None:
    for group, folds in {
        "C5": [5],
        "D3": [2, 2, 2, 3],
        "T": [2] * 3 + [3] * 4,
        "O": [2] * 6 + [3] * 4 + [4] * 3,
        "I": [2] * 15 + [3] * 10 + [5] * 6,
    }.items():
        assert sorted(a.fold for a in point_group_axes(group)) == folds


def test_flip_hand_mirrors_and_is_an_involution(tmp_path: Path) -> None:
    volume = TRUTH[1]  # blobs at x = +6 (and y = +5, z = +4) from the centre
    write_mrc(tmp_path / "a.mrc", volume, APIX)
    assert (
        cli_main(["flip-hand", "--i", str(tmp_path / "a.mrc"), "--o", str(tmp_path / "b.mrc")]) == 0
    )
    assert (
        cli_main(["flip-hand", "--i", str(tmp_path / "b.mrc"), "--o", str(tmp_path / "c.mrc")]) == 0
    )
    once, voxel = read_mrc(tmp_path / "b.mrc")
    twice, _ = read_mrc(tmp_path / "c.mrc")
    assert voxel == pytest.approx(APIX)
    np.testing.assert_array_equal(twice, volume)
    c = BOX // 2
    assert once[c, c, c - 6] == pytest.approx(volume[c, c, c + 6])  # the x = +6 blob moved to -6
    assert once[c, c, c + 6] < 0.1
    np.testing.assert_array_equal(once[:, :, c], volume[:, :, c])  # the centre plane stays
    for axis in "zyx":
        np.testing.assert_array_equal(flip_hand(flip_hand(volume, axis), axis), volume)


def test_axes_read_from_what_the_symmetry_step_wrote(tmp_path: Path) -> None:
    (tmp_path / "symmetry.json").write_text(json.dumps({"axes": [{"axis": [0, 0, 2], "fold": 6}]}))
    axes, source = symmetry_axes_from_files([tmp_path / "symmetry.json"])
    assert axes == [SymmetryAxis((0.0, 0.0, 1.0), 6)] and "symmetry.json" in source
    table = pd.DataFrame({"rlnAxisX": [1.0, 0.0], "rlnAxisY": [0.0, 0.0], "rlnAxisZ": [0.0, 1.0]})
    write_star(tmp_path / "axes.star", {"symmetry_axes": table})
    axes, _ = symmetry_axes_from_files([tmp_path / "axes.star"])
    assert [a.direction_xyz for a in axes] == [(1.0, 0.0, 0.0), (0.0, 0.0, 1.0)]
    write_star(tmp_path / "sym.star", {"symmetry": {"rlnSymmetryGroup": "C3"}})
    axes, source = symmetry_axes_from_files([tmp_path / "sym.star"])
    assert [a.fold for a in axes] == [3] and "C3" in source


def test_enclosing_level_encloses_the_expected_volume() -> None:
    volume = TRUTH[1]
    level = enclosing_level(volume, APIX, expected_volume_a3(60.0))
    enclosed_a3 = (volume >= level).sum() * APIX**3
    assert enclosed_a3 == pytest.approx(expected_volume_a3(60.0), rel=0.01)


def test_report_of_a_missing_directory_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli_main(["report", str(tmp_path / "nowhere")]) == 2
    assert "not a directory" in capsys.readouterr().err


def test_angular_plot_of_many_particles_is_a_density() -> None:
    from denovo3d.report._figures import angular_figure, png_bytes

    rng = np.random.default_rng(2)
    n = 2000
    poses = pd.DataFrame(
        {
            "rlnAngleRot": rng.uniform(-180, 180, n),
            "rlnAngleTilt": np.rad2deg(np.arccos(rng.uniform(-1, 1, n))),
        }
    )
    fig = angular_figure(poses, 7)
    assert fig is not None and "equal-area bins" in fig.axes[0].get_title()
    assert png_bytes(fig)[:8] == b"\x89PNG\r\n\x1a\n"


def test_flip_hand_matches_relion_invert_hand_on_even_boxes() -> None:
    # image_handler.cpp: dest_x = (j == 0) ? 0 : (XSIZE - j), out[k][i][j] = in[k][i][dest_x]
    volume = np.arange(4 * 6 * 6, dtype=np.float32).reshape(4, 6, 6)
    relion = volume[:, :, [0, 5, 4, 3, 2, 1]]
    np.testing.assert_array_equal(flip_hand(volume, "x"), relion)
    odd = np.arange(5, dtype=np.float32).reshape(1, 1, 5)
    np.testing.assert_array_equal(flip_hand(odd, "x")[0, 0], [4, 3, 2, 1, 0])


def test_pose_changes_measure_the_rotation_between_poses() -> None:
    before = pd.DataFrame(
        {
            "rlnImageName": ["a", "b", "c"],
            "rlnAngleRot": [10.0, -50.0, 120.0],
            "rlnAngleTilt": [30.0, 90.0, 150.0],
            "rlnAnglePsi": [0.0, 45.0, -170.0],
            "rlnClassNumber": [1, 1, 2],
        }
    )
    after = before.iloc[::-1].copy()  # other row order: matched by name
    after["rlnAnglePsi"] += 12.0  # an in-plane turn of 12° for every particle
    after.loc[after["rlnImageName"] == "a", "rlnClassNumber"] = 2
    mean_deg, changed_pct = pose_changes(before, after)
    assert mean_deg == pytest.approx(12.0) and changed_pct == pytest.approx(100 / 3)
