"""Bad input: one clear line naming the file, the row or label and the problem; exit code 2.

Each rule has its own test, run through the real command line (``denovo3d inspect``).
"""

from __future__ import annotations

from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile

from denovo3d.cli import main
from denovo3d.errors import InputError
from denovo3d.io.atomic import ensure_writable_dir
from tests.relion_layout import make_pseudo_subtomo_project, write_volume


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    monkeypatch.chdir(tmp_path)
    return make_pseudo_subtomo_project(tmp_path, n=4)


def _fails(args: list[str], capsys: pytest.CaptureFixture[str], *expected: str) -> str:
    code = main(["inspect", *args, "--sample", "0"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for text in expected:
        assert text in err, f"{text!r} not in {err!r}"
    return err


def _edit(path: Path, block: str, edit) -> None:
    blocks = starfile.read(path, always_dict=True)
    blocks[block] = edit(blocks[block])
    starfile.write(blocks, path)


def test_missing_star_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _fails([str(tmp_path / "nope.star")], capsys, "nope.star", "file not found")


def test_unreadable_star_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.star"
    bad.write_bytes(b"\x00\xff garbage \x00")
    _fails([str(bad)], capsys, "bad.star")


def test_missing_volume_file(project: dict, capsys: pytest.CaptureFixture[str]) -> None:
    (Path.cwd() / project["job"] / "Subtomograms/TS_03/2_data.mrc").unlink()
    _fails([str(project["particles"])], capsys, "2_data.mrc", "row 2", "file not found")


def test_unreadable_volume_file(project: dict, capsys: pytest.CaptureFixture[str]) -> None:
    (Path.cwd() / project["job"] / "Subtomograms/TS_01/3_data.mrc").write_bytes(b"not an mrc")
    _fails([str(project["particles"])], capsys, "3_data.mrc", "not a readable MRC file")


@pytest.mark.parametrize("label", ["rlnImageName", "rlnCtfImage"])
def test_missing_required_label(
    project: dict, capsys: pytest.CaptureFixture[str], label: str
) -> None:
    _edit(project["particles"], "particles", lambda df: df.drop(columns=[label]))
    _fails([str(project["particles"])], capsys, "particles.star", label, "required label missing")


def test_two_dimensional_data_declared(project: dict, capsys: pytest.CaptureFixture[str]) -> None:
    _edit(project["particles"], "optics", lambda df: df.assign(rlnImageDimensionality=2))
    _fails(
        [str(project["particles"])],
        capsys,
        "particles.star",
        "rlnImageDimensionality",
        "3D subtomograms are needed",
    )


def test_two_dimensional_stack_file(project: dict, capsys: pytest.CaptureFixture[str]) -> None:
    path = Path.cwd() / project["job"] / "Subtomograms/TS_01/1_data.mrc"
    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(np.zeros((41, 16, 16), np.float32))
        mrc.set_image_stack()
        mrc.voxel_size = 5.4
    _fails([str(project["particles"])], capsys, "1_data.mrc", "row 1", "2D image or stack")


def test_relion5_two_dimensional_stacks(project: dict, capsys: pytest.CaptureFixture[str]) -> None:
    blocks = starfile.read(project["particles"], always_dict=True)
    starfile.write({"general": {"rlnTomoSubTomosAre2DStacks": 1}, **blocks}, project["particles"])
    _fails([str(project["particles"])], capsys, "particles.star", "2D tilt stacks")


def test_box_inconsistent_with_optics(project: dict, capsys: pytest.CaptureFixture[str]) -> None:
    path = Path.cwd() / project["job"] / "Subtomograms/TS_03/4_data.mrc"
    write_volume(path, np.zeros((20, 20, 20), np.float32), 5.4)
    _fails(
        [str(project["particles"])],
        capsys,
        "4_data.mrc",
        "row 4",
        "(20, 20, 20)",
        "rlnImageSize 16",
    )


def test_pixel_size_inconsistent_with_optics(
    project: dict, capsys: pytest.CaptureFixture[str]
) -> None:
    path = Path.cwd() / project["job"] / "Subtomograms/TS_01/3_data.mrc"
    write_volume(path, np.zeros((16, 16, 16), np.float32), 2.7)
    _fails(
        [str(project["particles"])],
        capsys,
        "3_data.mrc",
        "row 3",
        "voxel size 2.7",
        "5.4 Å in data_optics",
    )


def test_pixel_size_inconsistent_across_optics_groups(
    project: dict, capsys: pytest.CaptureFixture[str]
) -> None:
    def two_groups(df: pd.DataFrame) -> pd.DataFrame:
        second = df.assign(rlnOpticsGroup=2, rlnImagePixelSize=4.0)
        return pd.concat([df, second], ignore_index=True)

    _edit(project["particles"], "optics", two_groups)
    _fails([str(project["particles"])], capsys, "particles.star", "row 2", "differ in pixel size")


def test_weights_of_wrong_shape(project: dict, capsys: pytest.CaptureFixture[str]) -> None:
    path = Path.cwd() / project["job"] / "Subtomograms/TS_03/2_weights.mrc"
    write_volume(path, np.ones((16, 16, 9), np.float32), 1 / 5.4)
    _fails(
        [str(project["particles"])], capsys, "2_weights.mrc", "row 2", "(16, 16, 9)", "(32, 16, 9)"
    )


@pytest.mark.filterwarnings("ignore:Data array contains NaN")
def test_nan_voxels(project: dict, capsys: pytest.CaptureFixture[str]) -> None:
    path = Path.cwd() / project["job"] / "Subtomograms/TS_01/3_data.mrc"
    data = np.zeros((16, 16, 16), np.float32)
    data[3, 4, 5] = np.nan
    data[1, 1, 1] = np.inf
    write_volume(path, data, 5.4)
    _fails([str(project["particles"])], capsys, "3_data.mrc", "2 voxel(s) are NaN or Inf")


def test_negative_multiplicity(project: dict, capsys: pytest.CaptureFixture[str]) -> None:
    path = Path.cwd() / project["job"] / "Subtomograms/TS_03/4_weights.mrc"
    weights = np.ones((32, 16, 9), np.float32)
    weights[20, 2, 2] = -1.0
    write_volume(path, weights, 1 / 5.4)
    _fails([str(project["particles"])], capsys, "4_weights.mrc", "row 4", "negative multiplicity")


def test_empty_particle_table(project: dict, capsys: pytest.CaptureFixture[str]) -> None:
    _edit(project["particles"], "particles", lambda df: df.iloc[:0])
    _fails([str(project["particles"])], capsys, "particles.star", "has no rows")


def test_unknown_optics_group(project: dict, capsys: pytest.CaptureFixture[str]) -> None:
    def bad_group(df: pd.DataFrame) -> pd.DataFrame:
        df = df.copy()
        df.loc[2, "rlnOpticsGroup"] = 7
        return df

    _edit(project["particles"], "particles", bad_group)
    _fails([str(project["particles"])], capsys, "particles.star", "row 3", "optics group 7")


def test_optimisation_set_naming_missing_particles(
    project: dict, capsys: pytest.CaptureFixture[str]
) -> None:
    project["particles"].unlink()
    _fails(
        [str(project["optimisation_set"])],
        capsys,
        "optimisation_set.star",
        "particles file it names was not found",
    )


def test_output_directory_not_writable(tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(InputError, match=r"a_file/job.*output directory is not writable"):
        ensure_writable_dir(blocker / "job")


def test_refine_into_an_unwritable_place_fails_before_work(
    project: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    argv = ["refine", "--i", str(project["particles"]), "--o", str(blocker / "job" / "run")]
    assert main([*argv, "--particle_diameter", "100", "--iter", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "a_file/job" in err and "not writable" in err, err
