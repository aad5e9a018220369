"""STAR and MRC writing: RELION-readable, lossless where it matters, atomic."""

from __future__ import annotations

from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest

from denovo3d.io.mrc import read_header, read_mrc, write_mrc
from denovo3d.io.star import read_star, write_star

EXAMPLES = Path(__file__).resolve().parents[2] / "shared" / "reference" / "star-examples"


def test_star_round_trip_keeps_small_values_and_names(tmp_path: Path) -> None:
    table = pd.DataFrame(
        {
            "rlnTomoName": ["01", "002"],
            "rlnSigma2Noise": [3.234e-06, 2.3e-07],
            "rlnClassNumber": [1, 2],
        }
    )
    path = write_star(
        tmp_path / "model.star", {"model_general": {"rlnPixelSize": 5.4}, "model_class_1": table}
    )
    text = path.read_text()
    assert text.startswith("# version 50001") and "Created by" not in text
    back = read_star(path)
    assert back["model_general"]["rlnPixelSize"] == pytest.approx(5.4)
    assert back["model_class_1"]["rlnTomoName"].tolist() == ["01", "002"]
    np.testing.assert_allclose(
        back["model_class_1"]["rlnSigma2Noise"], [3.234e-06, 2.3e-07], rtol=1e-7
    )


def test_star_refuses_nan_and_leaves_nothing(tmp_path: Path) -> None:
    path = tmp_path / "data.star"
    with pytest.raises(ValueError, match="NaN"):
        write_star(path, {"particles": pd.DataFrame({"rlnAngleRot": [1.0, np.nan]})})
    assert list(tmp_path.iterdir()) == []


def test_failed_write_keeps_the_old_file(tmp_path: Path) -> None:
    path = write_star(tmp_path / "a.star", {"x": pd.DataFrame({"rlnClassNumber": [1]})})
    before = path.read_text()

    class Boom(pd.DataFrame):
        def to_numpy(self, *a, **k):  # type: ignore[override]
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_star(path, {"x": Boom({"rlnClassNumber": [2]})})
    assert path.read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.star"]


@pytest.mark.skipif(not EXAMPLES.is_dir(), reason="shared reference STAR examples not present")
@pytest.mark.parametrize(
    "name", sorted(p.name for p in EXAMPLES.glob("*.star")) if EXAMPLES.is_dir() else []
)
def test_real_relion_star_files_round_trip(tmp_path: Path, name: str) -> None:
    blocks = read_star(EXAMPLES / name)
    back = read_star(write_star(tmp_path / name, blocks))
    assert list(back) == list(blocks)
    for key, block in blocks.items():
        if isinstance(block, pd.DataFrame):
            pd.testing.assert_frame_equal(back[key], block, check_dtype=False, rtol=1e-7)
        else:
            assert (
                back[key] == pytest.approx(block)
                if all(isinstance(v, float) for v in block.values())
                else back[key] == block
            )


def test_mrc_round_trip_with_voxel_size_and_zero_origin(tmp_path: Path) -> None:
    data = np.random.default_rng(0).normal(size=(8, 10, 12)).astype(np.float32)
    path = write_mrc(tmp_path / "map.mrc", data, 5.4)
    back, voxel = read_mrc(path)
    np.testing.assert_array_equal(back, data)
    assert voxel == pytest.approx(5.4)
    header = read_header(path)
    assert header.shape == (8, 10, 12) and header.mode == 2
    with mrcfile.open(path) as mrc:
        assert tuple(mrc.header.origin.item()) == (0.0, 0.0, 0.0)
        assert mrc.header.ispg == 1  # a volume, not an image stack
    with open(tmp_path / "validation.txt", "w") as report:
        assert mrcfile.validate(path, print_file=report)


def test_cube_with_stack_space_group_reads_as_a_volume(tmp_path: Path) -> None:
    # RELION 3.1 writes maps with space group 0, which MRC-2014 reserves for image stacks.
    path = tmp_path / "relion31_map.mrc"
    volume = np.arange(8**3, dtype=np.float32).reshape(8, 8, 8)
    with mrcfile.new(path) as mrc:
        mrc.set_data(volume)
        mrc.set_image_stack()
        mrc.voxel_size = 4.2
    data, voxel = read_mrc(path)
    np.testing.assert_array_equal(data, volume)
    assert voxel == pytest.approx(4.2)


def test_written_files_follow_the_umask(tmp_path: Path) -> None:
    import os

    old = os.umask(0o027)
    try:
        path = write_mrc(tmp_path / "map.mrc", np.zeros((4, 4, 4), np.float32), 1.0)
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o640
