"""denovo3d inside a RELION project: the GUI's command line unchanged, the pipeline-control files
(exit markers, the abort button), the External-job protocol, and outputs RELION's own programs
read (relion_reconstruct, relion_align_symmetry; Debian's RELION 3.1, skipped where absent)."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import torch

from denovo3d.cli import main as cli_main
from denovo3d.cli import refine as refine_cli
from denovo3d.io.star import read_star
from denovo3d.particles import load_particle_set
from denovo3d.phantoms import make_phantom
from denovo3d.pipeline_control import (
    ABORT_NOW,
    EXIT_ABORTED,
    EXIT_FAILURE,
    EXIT_SUCCESS,
    NODE_MAP,
    NODE_OPTIMISATION_SET,
    NODE_PARTICLES,
)
from denovo3d.simulate import SimulationConfig, simulate_project

BOX, PIXEL = 20, 15.0

# RELION 5.0.1's GUI, tomography "3D initial model" job (pipeline_jobs.cpp, getCommandsInimodelJob),
# with the program name changed; only --iter is short.
GUI_COMMAND = (
    "denovo3d refine --o InitialModel/job008/run --ios sim/optimisation_set.star --iter 2 "
    "--grad --denovo_3dref --ctf --K 1 --sym C6 --flatten_solvent --zero_mask "
    "--dont_combine_weights_via_disc --pool 30 --pad 1 --skip_gridding --particle_diameter 230 "
    "--oversampling 1 --healpix_order 1 --offset_range 6 --offset_step 2 --auto_sampling "
    '--tau2_fudge 4 --preread_images --scratch_dir /tmp --j 1 --gpu "" '
    "--pipeline_control InitialModel/job008/"
)

# Every flag the GUI can write for this job (RELION 4.0.2 and 5.0.1), with a value where it
# takes one. "honoured": changes what denovo3d does; "no effect" / "ignored": logged once.
GUI_FLAGS: list[tuple[str, str | None, str]] = [
    ("--o", "Job/run", "honoured"),
    ("--iter", "3", "honoured"),
    ("--grad", None, "honoured"),
    ("--denovo_3dref", None, "honoured"),
    ("--i", "particles.star", "honoured"),
    ("--ios", "optimisation_set.star", "honoured"),
    ("--tomograms", "tomograms.star", "honoured"),
    ("--trajectories", "motion.star", "honoured"),
    ("--sigma_tilt", "10", "ignored"),
    ("--ctf", None, "honoured"),
    ("--ctf_intact_first_peak", None, "ignored"),
    ("--K", "2", "honoured"),
    ("--sym", "D7", "honoured"),
    ("--flatten_solvent", None, "honoured"),
    ("--zero_mask", None, "honoured"),
    ("--dont_combine_weights_via_disc", None, "no effect"),
    ("--no_parallel_disc_io", None, "no effect"),
    ("--preread_images", None, "honoured"),
    ("--scratch_dir", "/ssd", "honoured"),
    ("--pool", "30", "no effect"),
    ("--pad", "1", "no effect"),
    ("--skip_gridding", None, "no effect"),
    ("--particle_diameter", "230", "honoured"),
    ("--oversampling", "1", "honoured"),
    ("--healpix_order", "2", "honoured"),
    ("--offset_range", "4", "honoured"),
    ("--offset_step", "1", "honoured"),
    ("--auto_sampling", None, "no effect"),
    ("--tau2_fudge", "2", "honoured"),
    ("--j", "4", "honoured"),
    ("--gpu", "", "honoured"),
    ("--pipeline_control", "Job/", "honoured"),
    ("--continue", "Job/run_it010_optimiser.star", "honoured"),
    # the GUI's "Additional arguments" most often carry these
    ("--grad_ini_subset", "300", "honoured"),
    ("--grad_fin_subset", "3000", "honoured"),
    ("--grad_stepsize", "0.3", "honoured"),
    ("--grad_write_iter", "5", "honoured"),
    ("--mu", "0.8", "honoured"),
    ("--maxsig", "50", "honoured"),
    ("--random_seed", "7", "honoured"),
    ("--class_inactivity_threshold", "0.1", "honoured"),
]


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny RELION-4 pseudo-subtomogram project in ``sim/`` (and classic subtomograms)."""
    root = tmp_path_factory.mktemp("relion_project")
    config = SimulationConfig(
        n_particles=24, box=BOX, pixel_size_a=PIXEL, snr=1.0, classic=True, seed=4, n_tomograms=2
    )
    simulate_project(root / "sim", make_phantom("c6_hexamer", BOX, PIXEL), config)
    return root


def _parser():
    import argparse

    parser = argparse.ArgumentParser(allow_abbrev=False)
    refine_cli.add_args(parser)
    return parser


@pytest.mark.parametrize(("flag", "value", "kind"), GUI_FLAGS, ids=[f[0] for f in GUI_FLAGS])
def test_every_gui_flag_is_accepted(flag: str, value: str | None, kind: str) -> None:
    argv = [flag] if value is None else [flag, value]
    args, extras = _parser().parse_known_args(argv)
    assert extras == []
    listed = " ".join(refine_cli.accepted_without_effect(args))
    assert (flag + ":" in listed) == (kind != "honoured")
    if kind != "honoured":
        assert kind in listed


def test_unknown_flag_is_an_error_naming_the_closest(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["refine", "--i", "x.star", "--o", "J/run", "--particle_diameter", "100"]
    assert cli_main([*argv, "--flaten_solvent"]) == 2
    assert "unknown option --flaten_solvent (did you mean --flatten_solvent?)" in (
        capsys.readouterr().err
    )
    assert cli_main([*argv, "--offest_step", "2"]) == 2
    assert "did you mean --offset_step?" in capsys.readouterr().err
    assert cli_main([*argv, "--sym", "C6x"]) == 2  # before any work, not after the run
    assert "--sym C6x: unknown symmetry group" in capsys.readouterr().err


def test_gui_command_line_runs_unchanged(
    project: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(project)
    argv = shlex.split(GUI_COMMAND)
    assert argv[0] == "denovo3d"
    assert cli_main(argv[1:]) == 0
    job = Path("InitialModel/job008")
    assert (job / EXIT_SUCCESS).is_file() and not (job / EXIT_FAILURE).exists()
    for name in ("run_it002_class001.mrc", "run_it002_model.star", "run_it002_data.star"):
        assert (job / name).is_file()
    with mrcfile.open(job / "initial_model.mrc") as mrc:
        assert mrc.data.shape == (BOX,) * 3
        assert float(mrc.voxel_size.x) == pytest.approx(PIXEL)
    log = (job / "run.log").read_text()
    for flag in ("--pool", "--pad", "--skip_gridding", "--dont_combine_weights_via_disc"):
        assert log.count(f"  {flag}: no effect") == 1
    assert "it 2/2" in log and "ETA" in log
    assert "$ denovo3d refine --o InitialModel/job008/run --ios sim/optimisation_set.star" in log
    # the optimisation set handed on reads back: particles with poses, the map as reference
    opt = read_star(job / "run_optimisation_set.star")[""]
    assert opt["rlnTomoParticlesFile"] == "InitialModel/job008/run_it002_data.star"
    assert opt["rlnTomoReferenceMap1File"] == "InitialModel/job008/initial_model.mrc"
    assert opt["rlnTomoTomogramsFile"] == "sim/tomograms.star"
    handed_on = load_particle_set(job / "run_optimisation_set.star")
    assert handed_on.n == 24 and "rlnAngleTilt" in handed_on.table.columns
    # the GUI's continuation: --continue run_itNNN_optimiser.star, same root, its --iter
    again = ["refine", "--continue", "InitialModel/job008/run_it002_optimiser.star"]
    assert cli_main([*again, "--o", "InitialModel/job008/run", "--iter", "5", "--quiet"]) == 0
    assert "--iter 5 ignored" in (job / "run.log").read_text()
    assert not (job / "run_it005_data.star").exists()
    # the RELION 4 form: --i particles.star instead of --ios
    relion4 = [
        "--i" if a == "--ios" else "sim/particles.star" if a.endswith("set.star") else a
        for a in argv[1:]
    ]
    relion4 = [a.replace("job008", "job009") for a in relion4]
    assert cli_main(relion4) == 0
    assert Path("InitialModel/job009", EXIT_SUCCESS).is_file()


def _refine_argv(out: Path, n_iter: int) -> list[str]:
    return [
        "refine",
        "--i",
        "sim/particles.star",
        "--o",
        str(out),
        "--iter",
        str(n_iter),
        "--particle_diameter",
        "230",
        "--grad_ini_subset",
        "8",
        "--grad_fin_subset",
        "12",
        "--random_seed",
        "5",
        "--quiet",
    ]


def test_abort_file_stops_the_run_then_continue_finishes_it(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(project)
    n_iter = 6
    killed, full = Path("Abort/job001/run"), Path("Abort/job002/run")
    command = [sys.executable, "-m", "denovo3d", *_refine_argv(killed, n_iter)]
    command += ["--pipeline_control", "Abort/job001/"]
    # the code under test, whatever the working directory (a relative PYTHONPATH would not be)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"), *sys.path]),
    }
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    checkpoint, trigger = Path(f"{killed}_checkpoint.pt"), Path("Abort/job001", ABORT_NOW)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if checkpoint.is_file() and torch.load(checkpoint, weights_only=False)["state"].iteration:
            trigger.touch()  # the GUI's abort button
            break
        time.sleep(0.1)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 3, err
    assert Path("Abort/job001", EXIT_ABORTED).is_file() and not trigger.exists()
    assert not Path("Abort/job001", EXIT_SUCCESS).exists()
    stopped_at = torch.load(checkpoint, weights_only=False)["state"].iteration
    assert 1 <= stopped_at < n_iter
    assert "aborted" in Path("Abort/job001/run.log").read_text()
    resumed = [*_refine_argv(killed, n_iter), "--pipeline_control", "Abort/job001/"]
    assert cli_main([*resumed, "--continue"]) == 0
    assert Path("Abort/job001", EXIT_SUCCESS).is_file()
    assert not Path("Abort/job001", EXIT_ABORTED).exists()
    assert cli_main(_refine_argv(full, n_iter)) == 0
    a = mrcfile.read(f"{killed}_it{n_iter:03d}_class001.mrc")
    b = mrcfile.read(f"{full}_it{n_iter:03d}_class001.mrc")
    assert np.array_equal(a, b)


def test_bad_input_writes_the_failure_marker(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(project)
    argv = ["refine", "--i", "missing.star", "--o", "Fail/job001/run", "--particle_diameter", "230"]
    assert cli_main([*argv, "--pipeline_control", "Fail/job001/"]) == 2
    assert Path("Fail/job001", EXIT_FAILURE).is_file()
    assert not Path("Fail/job001", EXIT_SUCCESS).exists()


def test_external_job_writes_its_output_nodes(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(project)
    argv = [
        "external",
        "--o",
        "External/job012/",
        "--in_parts",
        "sim/optimisation_set.star",
        "--iter",
        "2",
        "--K",
        "2",
        "--particle_diameter",
        "230",
        "--flatten_solvent",
        "Yes",
        "--zero_mask",
        "No",
        "--grad_ini_subset",
        "12",
        "--j",
        "1",
    ]
    assert cli_main(argv) == 0
    job = Path("External/job012")
    assert (job / EXIT_SUCCESS).is_file()
    nodes = read_star(job / "RELION_OUTPUT_NODES.star")["output_nodes"]
    kinds = dict(zip(nodes["rlnPipeLineNodeName"], nodes["rlnPipeLineNodeTypeLabel"], strict=True))
    assert kinds == {
        "External/job012/initial_model.mrc": NODE_MAP,
        "External/job012/run_it002_data.star": NODE_PARTICLES,
        "External/job012/run_optimisation_set.star": NODE_OPTIMISATION_SET,
        "External/job012/run_it002_class001.mrc": NODE_MAP,
        "External/job012/run_it002_class002.mrc": NODE_MAP,
    }
    for name in kinds:
        assert Path(name).is_file(), name
    optimiser = Path("External/job012/run_it002_optimiser.star").read_text()
    assert "--flatten_solvent" in optimiser.splitlines()[1]  # the command line, as called
    cfg = torch.load("External/job012/run_checkpoint.pt", weights_only=False)["config"]
    assert cfg["flatten_solvent"] and not cfg["zero_mask"] and cfg["n_classes"] == 2


relion = pytest.mark.skipif(
    shutil.which("relion_reconstruct") is None,
    reason="RELION's programs not on PATH (install Debian package relion)",
)


def _finished_run(project: Path, star: str, out: str) -> str:
    argv = ["refine", "--i", star, "--o", out, "--iter", "8", "--particle_diameter", "230"]
    argv += ["--grad_ini_subset", "12", "--random_seed", "2", "--quiet"]
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(project)
        assert cli_main(argv) == 0
    return out


@pytest.fixture(scope="module")
def classic_run(project: Path) -> str:
    """A finished run on classic subtomograms (RELION 3.1's relion_reconstruct reads them)."""
    return _finished_run(project, "sim/particles_classic.star", "Classic/job001/run")


def _relion_reconstruct_version_4() -> bool:
    """RELION >= 4's relion_reconstruct reads pseudo-subtomogram weights and takes 3D CTF
    volumes as CTF² unless told --ctf3d_not_squared (3.1's hold CTF, as ours do)."""
    done = subprocess.run(["relion_reconstruct"], capture_output=True, text=True, timeout=60)
    return "--ctf3d_not_squared" in done.stdout + done.stderr


def _same_map_as_relion(project: Path, run: str, extra: list[str]) -> tuple[float, float]:
    command = ["relion_reconstruct", "--i", f"{run}_it008_data.star", "--o", f"{run}_relion.mrc"]
    done = subprocess.run(
        [*command, "--ctf", "--3d_rot", *extra], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]
    ours = torch.from_numpy(mrcfile.read(f"{run}_it008_class001.mrc").astype(np.float32))
    theirs = torch.from_numpy(mrcfile.read(f"{run}_relion.mrc").astype(np.float32))
    corr = _masked_correlation(ours, theirs, radius=BOX / 2 - 1, lowpass_shell=BOX // 4)
    mirrored = _masked_correlation(ours, theirs.flip(0), radius=BOX / 2 - 1, lowpass_shell=BOX // 4)
    print(f"relion_reconstruct of {run}_it008_data.star vs our map: {corr:.3f} ({mirrored:.3f})")
    return corr, mirrored


@relion
def test_relion_reconstruct_of_our_data_star_is_our_map(
    project: Path, classic_run: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """relion_reconstruct of run_it008_data.star as written (classic subtomograms) gives our
    final map in the same frame (no alignment); a mirrored copy does not (hands differ)."""
    monkeypatch.chdir(project)
    extra = ["--ctf3d_not_squared"] if _relion_reconstruct_version_4() else []
    corr, mirrored = _same_map_as_relion(project, classic_run, extra)
    assert corr > 0.9 and mirrored < 0.8


@relion
def test_relion_reconstruct_of_our_pseudo_subtomogram_run(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same with pseudo-subtomograms, our main input: RELION >= 4 reads their weights."""
    if not _relion_reconstruct_version_4():
        pytest.skip("RELION 3.1's relion_reconstruct reads no pseudo-subtomogram weights")
    run = _finished_run(project, "sim/particles.star", "Pseudo/job001/run")
    monkeypatch.chdir(project)
    corr, mirrored = _same_map_as_relion(project, run, [])
    assert corr > 0.9 and mirrored < 0.8


def _align_symmetry_reads_model_star() -> bool:
    """RELION >= 4's relion_align_symmetry takes a model.star; 3.1's reads maps only."""
    if shutil.which("relion_align_symmetry") is None:
        return False
    done = subprocess.run(["relion_align_symmetry"], capture_output=True, text=True, timeout=60)
    return "--select_largest_class" in done.stdout + done.stderr


def test_model_star_has_what_relion_align_symmetry_reads(
    project: Path, classic_run: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """RELION 4/5's align_symmetry.cpp reads data_model_classes: rlnReferenceImage (a path from
    the project directory), rlnClassDistribution and rlnEstimatedResolution. Where such a
    RELION is installed it is also run on our model.star."""
    monkeypatch.chdir(project)
    model = f"{classic_run}_it008_model.star"
    classes = read_star(model)["model_classes"]
    for label in ("rlnReferenceImage", "rlnClassDistribution", "rlnEstimatedResolution"):
        assert label in classes.columns
    largest = classes.loc[classes["rlnClassDistribution"].idxmax(), "rlnReferenceImage"]
    with mrcfile.open(largest) as mrc:
        assert mrc.data.shape == (BOX,) * 3
        assert float(mrc.voxel_size.x) == pytest.approx(PIXEL)
    if not _align_symmetry_reads_model_star():
        pytest.skip("this relion_align_symmetry (RELION 3.1) reads no model.star; RELION >= 4 does")
    command = ["relion_align_symmetry", "--i", model, "--o", "Classic/aligned.mrc"]
    command += ["--sym", "C6", "--apply_sym", "--select_largest_class"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    with mrcfile.open("Classic/aligned.mrc") as mrc:
        assert mrc.data.shape == (BOX,) * 3


def _masked_correlation(
    a: torch.Tensor, b: torch.Tensor, radius: float, lowpass_shell: int
) -> float:
    """Correlation inside a sphere after both maps are low-passed to ``lowpass_shell`` (our map
    is limited to the resolution the run reached; RELION's reconstruction is not)."""
    from denovo3d.fourier import centred_irfft, centred_rfft, rfft_radius

    s = a.shape[-1]
    keep = rfft_radius(s, a.device) <= lowpass_shell
    a = centred_irfft(centred_rfft(a.double()) * keep, s)
    b = centred_irfft(centred_rfft(b.double()) * keep, s)
    grid = torch.arange(s, dtype=torch.float64) - s // 2
    r = (grid[:, None, None] ** 2 + grid[None, :, None] ** 2 + grid[None, None] ** 2).sqrt()
    inside = r <= radius
    x, y = a[inside] - a[inside].mean(), b[inside] - b[inside].mean()
    return float((x * y).sum() / (x.norm() * y.norm()))
