"""Data parallelism: ranks from the launchers' environments, shares of a mini-batch, and a
2-rank gloo run (torchrun, particles from a --scratch_dir copy) that gives the single-process
result (particles read from their files)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from denovo3d import distributed
from denovo3d.cli import main as cli_main
from denovo3d.cli.refine import _max_memory
from denovo3d.errors import InputError
from denovo3d.io.mrc import read_mrc
from denovo3d.io.star import read_star
from denovo3d.phantoms import make_phantom
from tests.refine_synthetic import make_particles, write_project


def test_ranks_from_torchrun_then_slurm_then_single() -> None:
    torchrun = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "SLURM_PROCID": "0"}
    assert distributed.from_env(torchrun) == distributed.Ranks(3, 4, 1)
    slurm = {"SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": "1"}
    assert distributed.from_env({**slurm, "SLURM_NTASKS": "8"}) == distributed.Ranks(5, 8, 1)
    batch_script = {"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_LOCALID": "0"}
    assert distributed.from_env(batch_script) == distributed.SINGLE  # not started by srun
    assert distributed.from_env({}) == distributed.SINGLE
    assert distributed.SINGLE.is_writer and not distributed.SINGLE.active
    assert not distributed.Ranks(1, 2).is_writer
    with pytest.raises(ValueError, match="rank 2 outside a world of 2"):
        distributed.from_env({"RANK": "2", "WORLD_SIZE": "2"})


def test_processes_per_node_share_the_memory() -> None:
    assert distributed.local_world_size({"LOCAL_WORLD_SIZE": "4"}) == 4
    assert distributed.local_world_size({"SLURM_STEP_TASKS_PER_NODE": "8(x2)"}) == 8
    assert distributed.local_world_size({}) == 1


@pytest.mark.parametrize("n", [0, 1, 7, 10])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_shares_cover_the_batch_once_in_order(n: int, world: int) -> None:
    rows = np.arange(100, 100 + n)
    parts = [distributed.share(rows, distributed.Ranks(r, world)) for r in range(world)]
    assert np.array_equal(np.concatenate(parts), rows)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1


def test_max_memory_sizes() -> None:
    assert _max_memory("8G") == 8 << 30
    assert _max_memory("512M") == 512 << 20
    assert _max_memory("1.5GiB") == 3 << 29
    assert _max_memory(str(100 << 20)) == 100 << 20
    assert _max_memory(None) >= 256 << 20
    for bad in ("lots", "1M", "-2G"):
        with pytest.raises(InputError, match="--max_memory"):
            _max_memory(bad)


def _refine_args(star: Path, out: Path) -> list[str]:
    return [
        "refine",
        "--i",
        str(star),
        "--o",
        str(out),
        "--iter",
        "3",
        "--K",
        "2",
        "--particle_diameter",
        "220",
        "--flatten_solvent",
        "--grad_ini_subset",
        "15",
        "--grad_fin_subset",
        "21",
        "--random_seed",
        "5",
        "--write_iter",
        "1",
        "--j",
        "1",
        "--max_memory",
        "1G",
    ]


def _two_ranks(*argv: str) -> subprocess.CompletedProcess:
    """``denovo3d ARGV`` as 2 gloo ranks through torchrun (one thread each), output captured."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[1] / "src"), *sys.path])
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    return subprocess.run(
        [*launch, "-m", "denovo3d", *argv], env=env, capture_output=True, text=True, timeout=600
    )


def test_two_gloo_ranks_equal_one_process(tmp_path: Path) -> None:
    box, px = 24, 11.0
    parts = make_particles(make_phantom("asymmetric", box, px), 30, 2000.0, 1.0, seed=8)
    star = write_project(tmp_path / "project", parts, px)
    one = tmp_path / "one" / "run"
    assert cli_main(_refine_args(star, one)) == 0
    two, scratch = tmp_path / "two" / "run", tmp_path / "scratch"  # ranks read a scratch copy
    result = _two_ranks(*_refine_args(star, two), "--scratch_dir", str(scratch))
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(list(scratch.glob("*.particles"))) == 1
    for it in (1, 2, 3):
        for k in (1, 2):
            a, _ = read_mrc(f"{one}_it{it:03d}_class{k:03d}.mrc")
            b, _ = read_mrc(f"{two}_it{it:03d}_class{k:03d}.mrc")
            scale = float(np.abs(a).max())
            assert np.abs(a - b).max() <= 1e-4 * scale, (it, k, np.abs(a - b).max() / scale)
    for it in (1, 2, 3):  # 1, 2: the mini-batch's poses (gathered); 3: every particle's
        poses_a = read_star(f"{one}_it{it:03d}_data.star")["particles"]
        poses_b = read_star(f"{two}_it{it:03d}_data.star")["particles"]
        assert len(poses_a) == len(poses_b) == 30
        for label in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst"):
            np.testing.assert_allclose(poses_b[label], poses_a[label], atol=1e-3, err_msg=label)
        np.testing.assert_array_equal(poses_b["rlnClassNumber"], poses_a["rlnClassNumber"])
        np.testing.assert_allclose(
            poses_b["rlnMaxValueProbDistribution"],
            poses_a["rlnMaxValueProbDistribution"],
            atol=1e-3,
        )
    model_a = read_star(f"{one}_it002_model.star")["model_general"]
    model_b = read_star(f"{two}_it002_model.star")["model_general"]
    for label in ("rlnLogLikelihood", "rlnAveragePmax", "rlnCurrentImageSize"):
        assert float(model_b[label]) == pytest.approx(float(model_a[label]), rel=1e-5), label
    assert (tmp_path / "two" / "initial_model.mrc").is_file()


def test_two_ranks_stop_together_on_the_abort_file(tmp_path: Path) -> None:
    """The GUI's abort button with 2 ranks: polled collectively between iterations, so both
    ranks stop (no rank left waiting in a collective), rank 0 writes RELION_JOB_EXIT_ABORTED and
    keeps the last finished iteration; --continue on 2 ranks then ends where one uninterrupted
    process does."""
    box, px = 24, 11.0
    parts = make_particles(make_phantom("asymmetric", box, px), 16, 2000.0, 1.0, seed=3)
    star = write_project(tmp_path / "project", parts, px)
    out = tmp_path / "job" / "run"
    (tmp_path / "job").mkdir()
    (tmp_path / "job" / "RELION_JOB_ABORT_NOW").touch()  # pressed before the first mini-batch
    result = _two_ranks(*_refine_args(star, out))
    assert result.returncode != 0  # torchrun reports the ranks' exit code 3 as a failure
    assert (tmp_path / "job" / "RELION_JOB_EXIT_ABORTED").is_file()
    assert not (tmp_path / "job" / "RELION_JOB_ABORT_NOW").exists()
    assert not (tmp_path / "job" / "RELION_JOB_EXIT_SUCCESS").exists()
    assert Path(f"{out}_it000_class001.mrc").is_file()
    assert not Path(f"{out}_it001_class001.mrc").exists()
    again = _two_ranks(*_refine_args(star, out), "--continue")  # the same 2 ranks
    assert again.returncode == 0, again.stderr[-3000:]
    assert (tmp_path / "job" / "RELION_JOB_EXIT_SUCCESS").is_file()
    one = tmp_path / "one" / "run"  # uninterrupted, one process
    assert cli_main(_refine_args(star, one)) == 0
    for k in (1, 2):
        a, _ = read_mrc(f"{one}_it003_class{k:03d}.mrc")
        b, _ = read_mrc(f"{out}_it003_class{k:03d}.mrc")
        assert np.abs(a - b).max() <= 1e-4 * float(np.abs(a).max()), k


def test_a_bad_particle_on_one_rank_stops_both_with_one_message(tmp_path: Path) -> None:
    """A particle that only rank 1 reads (NaN voxels: found when read, not from the header)
    stops both ranks after that mini-batch: rank 0 names the rank, the file and the problem,
    writes RELION_JOB_EXIT_FAILURE, and no rank dies on a closed connection."""
    from denovo3d.config import RefineConfig
    from denovo3d.io.mrc import write_mrc
    from denovo3d.refine import _generator

    box, px = 24, 11.0
    parts = make_particles(make_phantom("asymmetric", box, px), 30, 2000.0, 1.0, seed=8)
    star = write_project(tmp_path / "project", parts, px)
    cfg = RefineConfig(input_path="", output_root="", random_seed=5, n_classes=2)
    initial = set(torch.randperm(30, generator=_generator(cfg, 0))[:20].tolist())
    batch = torch.randperm(30, generator=_generator(cfg, 1))[:15].numpy()
    rank1 = distributed.share(batch, distributed.Ranks(1, 2))
    bad = next(int(r) for r in rank1 if int(r) not in initial)  # read by rank 1 only
    path = tmp_path / "project" / read_star(star)["particles"]["rlnImageName"].iloc[bad]
    data, voxel = read_mrc(path)
    data = data.copy()
    data[3, 3, 3] = np.nan
    with pytest.warns(RuntimeWarning, match="NaN"):  # mrcfile's own warning on writing it
        write_mrc(path, data, voxel)
    out = tmp_path / "job" / "run"
    result = _two_ranks(*_refine_args(star, out))
    assert result.returncode != 0
    expected = f"error: rank 1: {path}: 1 voxel(s) are NaN or Inf"
    assert result.stderr.count("denovo3d refine: error:") == 1, result.stderr[-3000:]
    assert expected in result.stderr, result.stderr[-3000:]
    assert "Connection closed" not in result.stderr
    assert (tmp_path / "job" / "RELION_JOB_EXIT_FAILURE").is_file()
    assert expected in (tmp_path / "job" / "run.log").read_text()
    assert not Path(f"{out}_it001_class001.mrc").exists()
