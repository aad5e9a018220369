"""RELION's per-iteration outputs of a VDAM run (relion-vdam-notes §1.9), all written atomically:
``run_itNNN_classKKK.mrc``, ``run_itNNN_model.star``, ``run_itNNN_data.star``,
``run_itNNN_optimiser.star``, ``run_itNNN_sampling.star``; ``initial_model.mrc`` (with
``initial_model_symmetry.star`` when a symmetry step ran) and ``run_optimisation_set.star``
(RELION 5's hand-on to the next tomography job)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from denovo3d.io.atomic import atomic_path
from denovo3d.io.mrc import write_mrc
from denovo3d.io.star import write_star
from denovo3d.io.symmetry_star import symmetry_star_path, write_symmetry_star
from denovo3d.symmetry_align import AlignParams, align_requested, apply_alignment

__all__ = [
    "iteration_root",
    "optimisation_set_path",
    "write_initial_model",
    "write_iteration",
    "write_optimisation_set",
]


def iteration_root(output_root: str, iteration: int) -> str:
    return f"{output_root}_it{iteration:03d}"


def _class_maps(root: str, state, pixel_size_a: float) -> list[str]:
    names = []
    refs = state.refs.detach().cpu().numpy()
    for k in range(refs.shape[0]):
        name = f"{root}_class{k + 1:03d}.mrc"
        write_mrc(name, refs[k], pixel_size_a)
        names.append(name)
    return names


def _resolution_a(ssnr_row: np.ndarray, box: int, pixel_size_a: float) -> float:
    last = 0
    for i in range(1, len(ssnr_row)):
        if ssnr_row[i] < 1:
            break
        last = i
    return 999.0 if last == 0 else box * pixel_size_a / last


def _model_blocks(cfg, state, ps, schedule, class_names: list[str]) -> dict:
    box, px = ps.box, ps.pixel_size_a
    n_shells = box // 2 + 1
    ssnr = state.ssnr.double().numpy()
    fsc = state.fsc.double().numpy()
    sigma2 = state.sigma2.detach().cpu().double().numpy()
    refs_power = _shell_power(state.refs)
    current_res = box * px / max(1, state.current_size // 2)
    general = {
        "rlnReferenceDimensionality": 3,
        "rlnDataDimensionality": 3,
        "rlnOriginalImageSize": box,
        "rlnCurrentResolution": current_res,
        "rlnCurrentImageSize": state.current_size,
        "rlnPaddingFactor": 1.0,
        "rlnIsHelix": 0,
        "rlnFourierSpaceInterpolator": 1,
        "rlnMinRadiusNnInterpolation": 10,
        "rlnPixelSize": px,
        "rlnNrClasses": cfg.n_classes,
        "rlnNrBodies": 1,
        "rlnNrGroups": 1,
        "rlnNrOpticsGroups": 1,
        "rlnTau2FudgeFactor": schedule.tau2(max(1, state.iteration)),
        "rlnNormCorrectionAverage": 1.0,
        "rlnSigmaOffsetsAngst": float(np.sqrt(state.sigma2_offset_px)) * px,
        "rlnOrientationalPriorMode": 0,
        "rlnSigmaPriorRotAngle": 0.0,
        "rlnSigmaPriorTiltAngle": 0.0,
        "rlnSigmaPriorPsiAngle": 0.0,
        "rlnLogLikelihood": state.log_likelihood,
        "rlnAveragePmax": state.average_pmax,
    }
    classes = pd.DataFrame(
        {
            "rlnReferenceImage": list(class_names),
            "rlnClassDistribution": state.pdf_class.detach().cpu().double().numpy(),
            "rlnAccuracyRotations": 999.0,
            "rlnAccuracyTranslationsAngst": 999.0,
            "rlnEstimatedResolution": [_resolution_a(r, box, px) for r in ssnr],
            "rlnOverallFourierCompleteness": 1.0,
        }
    )
    shells = np.arange(n_shells)
    freq = shells / (box * px)
    ang = np.where(shells > 0, box * px / np.maximum(shells, 1), 999.0)
    blocks: dict = {"model_general": general, "model_classes": classes}
    for k in range(cfg.n_classes):
        blocks[f"model_class_{k + 1}"] = pd.DataFrame(
            {
                "rlnSpectralIndex": shells,
                "rlnResolution": freq,
                "rlnAngstromResolution": ang,
                "rlnSsnrMap": ssnr[k],
                "rlnGoldStandardFsc": fsc[k],
                "rlnFourierCompleteness": 1.0,
                "rlnReferenceSigma2": sigma2,
                "rlnReferenceTau2": refs_power[k],
            }
        )
    blocks["model_groups"] = pd.DataFrame(
        {
            "rlnGroupNumber": [1],
            "rlnGroupName": ["group_1"],
            "rlnGroupNrParticles": [ps.n],
            "rlnGroupScaleCorrection": [1.0],
        }
    )
    blocks["model_optics_group_1"] = pd.DataFrame(
        {"rlnSpectralIndex": shells, "rlnResolution": freq, "rlnSigma2Noise": sigma2}
    )
    return blocks


def _shell_power(refs) -> np.ndarray:
    """Reference power per shell ``(K, n)``: mean |F|²/2 (RELION's tau2)."""
    import torch

    from denovo3d.engine.voxels import VoxelSet, shell_means
    from denovo3d.fourier import centred_rfft

    box = refs.shape[-1]
    vox = VoxelSet.build(box, box / 2, refs.device)
    ft = centred_rfft(refs.detach().double())
    power = shell_means(vox.take(ft.abs() ** 2), vox.shell, box // 2 + 1) / 2
    return torch.as_tensor(power).cpu().numpy()


def _paths_from_here(table: pd.DataFrame, project_dir: Path | None) -> pd.DataFrame:
    """File names resolved against the project the input came from, rewritten relative to the
    directory the job runs in (RELION's project directory), so the STAR file we write reads from
    there even when the input was read from elsewhere."""
    if project_dir is None or Path(project_dir).resolve() == Path.cwd().resolve():
        return table
    for label in ("rlnImageName", "rlnCtfImage"):
        if label in table.columns:
            table[label] = [_project_relative(Path(project_dir) / n) for n in table[label]]
    return table


def _data_blocks(state, ps) -> dict:
    tables = getattr(ps, "tables", None)
    table = _paths_from_here(ps.table.copy(), getattr(tables, "project_dir", None))
    p = state.poses
    px = ps.pixel_size_a
    table["rlnAngleRot"] = p["rot"]
    table["rlnAngleTilt"] = p["tilt"]
    table["rlnAnglePsi"] = p["psi"]
    table["rlnOriginXAngst"] = p["origin_px"][:, 0] * px
    table["rlnOriginYAngst"] = p["origin_px"][:, 1] * px
    table["rlnOriginZAngst"] = p["origin_px"][:, 2] * px
    table["rlnClassNumber"] = p["class_number"].astype(int)
    table["rlnNormCorrection"] = 1.0
    table["rlnLogLikeliContribution"] = p["log_likelihood"]
    table["rlnMaxValueProbDistribution"] = p["max_prob"]
    table["rlnNrOfSignificantSamples"] = p["n_significant"].astype(int)
    return {"optics": ps.optics, "particles": table}


def _optimiser_blocks(cfg, state, schedule, root: str) -> dict:
    return {
        "optimiser_general": {
            "rlnOutputRootName": cfg.output_root,
            "rlnModelStarFile": f"{root}_model.star",
            "rlnExperimentalDataStarFile": f"{root}_data.star",
            "rlnOrientSamplingStarFile": f"{root}_sampling.star",
            "rlnCurrentIteration": state.iteration,
            "rlnNumberOfIterations": cfg.n_iter,
            "rlnDoSplitRandomHalves": 0,
            "rlnAdaptiveOversampleOrder": 1,
            "rlnAdaptiveOversampleFraction": cfg.adaptive_fraction,
            "rlnRandomSeed": cfg.random_seed,
            "rlnParticleDiameter": cfg.particle_diameter_a,
            "rlnWidthMaskEdge": cfg.mask_edge_px,
            "rlnDoZeroMask": int(cfg.zero_mask),
            "rlnDoSolventFlattening": int(cfg.flatten_solvent),
            "rlnIncrementImageSize": cfg.incr_size,
            "rlnDoGradientRefine": 1,
            "rlnDoStochasticGradientDescent": 1,
            "rlnGradEmIters": 0,
            "rlnGradCurrentStepsize": schedule.step_size(max(1, state.iteration)),
            "rlnSgdInitialIterationsFraction": 0.3,
            "rlnSgdFinalIterationsFraction": 0.2,
            "rlnSgdInitialSubsetSize": schedule.batch_ini,
            "rlnSgdFinalSubsetSize": schedule.batch_fin,
            "rlnSgdMuFactor": cfg.mu,
            "rlnSgdClassInactivityThreshold": 0.0,
            "rlnSgdSubsetSize": schedule.batch_size(max(1, state.iteration)),
            "rlnSgdWriteEverySubset": cfg.write_iter,
            "rlnSgdStepsize": cfg.stepsize,
            "rlnTau2FudgeArg": cfg.tau2_fudge,
            "rlnMaximumSignificantPoses": cfg.maxsig,
            "rlnSymmetryGroup": cfg.symmetry,
        }
    }


def _sampling_blocks(cfg, ps) -> dict:
    from denovo3d.geometry.sampling import angular_step_deg

    return {
        "sampling_general": {
            "rlnIs3DSampling": 1,
            "rlnIs3DTranslationalSampling": 1,
            "rlnHealpixOrder": cfg.healpix_order,
            "rlnSymmetryGroup": "C1",
            "rlnTiltAngleLimit": -91.0,
            "rlnPsiStep": angular_step_deg(cfg.healpix_order),
            "rlnOffsetRange": cfg.offset_range_px * ps.pixel_size_a,
            "rlnOffsetStep": cfg.offset_step_px * ps.pixel_size_a,
            "rlnSamplingPerturbFactor": cfg.perturb,
        }
    }


def write_iteration(cfg, state, ps, schedule) -> str:
    """Write all files of ``state.iteration``; returns the root ``<o>_itNNN``."""
    root = iteration_root(cfg.output_root, state.iteration)
    names = _class_maps(root, state, ps.pixel_size_a)
    write_star(f"{root}_model.star", _model_blocks(cfg, state, ps, schedule, names))
    write_star(f"{root}_data.star", _data_blocks(state, ps))
    write_star(f"{root}_sampling.star", _sampling_blocks(cfg, ps))
    path = Path(f"{root}_optimiser.star")
    write_star(path, _optimiser_blocks(cfg, state, schedule, root))
    text = path.read_text()
    with atomic_path(path) as tmp:
        tmp.write_text(f"# denovo3d optimiser\n# {cfg.command_line}\n{text}")
    return root


def write_initial_model(cfg, state, ps, log: Callable[[str], None] | None = None) -> Path:
    """``initial_model.mrc`` beside the run: the largest class, as RELION's job ends
    (``relion_align_symmetry --select_largest_class --apply_sym``): unless ``cfg.symmetry`` is C1,
    turned onto the group's standard axes, centred on them and symmetrised (scored within the
    particle's diameter); ``auto`` detects the group first (C1 when unclear: the map is then
    written as it is). The symmetry step's result goes to ``initial_model_symmetry.star``
    (:mod:`denovo3d.io.symmetry_star`) and, in a few lines, to ``log`` when given."""
    k = int(state.pdf_class.argmax())
    volume = state.refs[k].detach().cpu().float()
    path = Path(cfg.output_root).parent / "initial_model.mrc"
    if cfg.symmetry.upper() != "C1":
        diameter_px = cfg.particle_diameter_a / ps.pixel_size_a * volume.shape[-1] / ps.box
        params = AlignParams(seed=cfg.random_seed, mask_diameter_px=diameter_px)
        result = align_requested(volume, cfg.symmetry, params)
        for line in result.summary() if log is not None else []:
            log(line)
        if result.alignment.group != "C1":
            volume = apply_alignment(volume.double(), result.alignment).float()
        write_symmetry_star(
            symmetry_star_path(path),
            result.alignment,
            ps.pixel_size_a,
            cfg.symmetry,
            result.detection,
        )
    write_mrc(path, volume.numpy(), ps.pixel_size_a)
    return path


def optimisation_set_path(output_root: str) -> Path:
    return Path(f"{output_root}_optimisation_set.star")


def _project_relative(path: str | Path | None) -> str:
    """A path as RELION writes it: relative to the project (the current) directory when it
    lies inside it; ``""`` for none."""
    if path is None or str(path) == "":
        return '""'
    path = Path(path)
    if path.is_absolute() and path.is_relative_to(Path.cwd()):
        return os.path.relpath(path, Path.cwd())
    if not path.is_absolute():
        return os.path.normpath(path)
    return str(path)


def write_optimisation_set(cfg, state, ps, initial_model: str | Path) -> Path:
    """``run_optimisation_set.star``: the particles with their final poses and
    ``initial_model.mrc`` as the reference, plus the tomograms (and trajectories) the input
    named, so RELION 5's 3D classification or refinement can start from it unchanged."""
    tables = getattr(ps, "tables", None)
    tomograms = cfg.tomograms_path or getattr(tables, "tomograms_path", None)
    entries = {
        "rlnTomoParticlesFile": f"{iteration_root(cfg.output_root, state.iteration)}_data.star",
        "rlnTomoTomogramsFile": _project_relative(tomograms),
        "rlnTomoTrajectoriesFile": _project_relative(cfg.trajectories_path),
        "rlnTomoReferenceMap1File": _project_relative(initial_model),
    }
    path = optimisation_set_path(cfg.output_root)
    write_star(path, {"": entries})
    return path
