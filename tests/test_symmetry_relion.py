"""Our symmetrise against RELION's own ``relion_image_handler --sym`` (Debian package, 3.1)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import torch

from denovo3d.geometry.symmetry import symmetrise
from denovo3d.io.mrc import write_mrc
from tests.symmetry_phantoms import phantom

HANDLER = shutil.which("relion_image_handler")
FIXTURE = Path("/work/shared/reference/relion-symmetry-operators.json")
GROUPS = sorted(json.loads(FIXTURE.read_text())["groups"]) if FIXTURE.is_file() else ["C2", "D7"]
GROUPS = [g for g in GROUPS if g != "C1"] + ["I", "IH", "I1H", "I2H", "I3H", "I4H"]

pytestmark = [
    pytest.mark.relion,
    pytest.mark.skipif(
        HANDLER is None, reason="relion_image_handler not installed (Debian relion)"
    ),
]


@pytest.fixture(scope="module")
def asymmetric_map(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    volume = phantom("C1", 32, seed=11, max_radius_px=11).float().numpy()
    path = tmp_path_factory.mktemp("sym") / "asym.mrc"
    write_mrc(path, volume, 4.0)
    return path, volume


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


@pytest.mark.parametrize("group", GROUPS)
def test_symmetrise_matches_relion_image_handler(
    group: str, asymmetric_map: tuple[Path, np.ndarray], tmp_path: Path
) -> None:
    src, volume = asymmetric_map
    out = tmp_path / f"{group}.mrc"
    subprocess.run(
        [str(HANDLER), "--i", str(src), "--o", str(out), "--sym", group],
        check=True,
        capture_output=True,
    )
    with mrcfile.open(out, permissive=True) as mrc:  # RELION 3.1 marks volumes as stacks (ispg 0)
        relion = np.asarray(mrc.data, dtype=np.float32).reshape(volume.shape)
    ours = symmetrise(torch.from_numpy(volume), group).numpy()
    corr = _correlation(ours, relion)
    print(f"{group}: correlation with relion_image_handler --sym {corr:.5f}")
    assert corr > 0.999
