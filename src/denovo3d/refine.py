"""The de novo refine loop: particles + engine + outputs + checkpoints (the only place they meet).

``run(cfg)`` initialises (or resumes from ``<root>_checkpoint.pt``), runs the VDAM iterations,
writes ``run_itNNN_*`` at iteration 0, every ``write_iter`` and at the end, gives every particle
its best pose after the last mini-batch, and writes ``initial_model.mrc``. Every random choice is
drawn from a generator seeded by ``(random_seed, iteration)``, so a resumed run repeats an
uninterrupted one exactly on the same device.

Launched on several ranks (``torchrun``, ``srun``; :mod:`denovo3d.distributed`), every rank
searches its share of each mini-batch, the M-step sums are all-reduced, every rank makes the
same update (then rank 0's state is broadcast), and only rank 0 writes.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from denovo3d import distributed, memory
from denovo3d.config import RefineConfig, VdamSchedule
from denovo3d.engine.expectation import Alignment, PassGrid, Search, align
from denovo3d.engine.maximization import Accumulators, accumulate
from denovo3d.engine.noise import (
    initial_sigma2,
    update_class_fractions,
    update_sigma2,
    update_sigma2_offset,
)
from denovo3d.engine.projector import full_centred
from denovo3d.engine.references import (
    initial_references,
    non_negative,
    soft_mask_outside,
    solvent_flatten,
)
from denovo3d.engine.vdam import (
    Moments,
    current_size_from_ssnr,
    reseed_empty_class,
    ssnr_map,
    vdam_update,
)
from denovo3d.engine.voxels import VoxelSet, shell_means
from denovo3d.errors import InputError
from denovo3d.fourier import centred_irfft, centred_rfft, rfft_radius
from denovo3d.geometry.euler import matrix_to_euler, random_rotations
from denovo3d.geometry.sampling import (
    OrientationGrid,
    angular_step_deg,
    offset_children,
    offset_grid,
    orientation_children,
    perturbation_rotation,
)
from denovo3d.io.atomic import ensure_writable_dir
from denovo3d.pipeline_control import JobAbortedError

__all__ = ["RefineState", "assign_all", "initialise", "iterate", "run"]


@dataclass
class RefineState:
    """Everything that changes during a run (saved whole in the checkpoint).

    ``refs (K, S, S, S)`` real; ``sigma2 (S//2+1,)`` float64; ``pdf_class (K,)`` float64;
    ``fsc, ssnr (K, S//2+1)``; ``poses``: per-particle numpy arrays (``rot, tilt, psi`` degrees,
    ``origin_px (n, 3)`` (RELION's rlnOrigin in pixels: the shift that centres the particle, so
    the particle sits at ``-origin``), ``class_number`` 1-based, ``max_prob``, ``n_significant``,
    ``log_likelihood``).
    """

    iteration: int
    refs: torch.Tensor
    moments: Moments
    sigma2: torch.Tensor
    pdf_class: torch.Tensor
    sigma2_offset_px: float
    current_size: int
    fsc: torch.Tensor
    ssnr: torch.Tensor
    poses: dict[str, np.ndarray]
    log_likelihood: float = 0.0
    average_pmax: float = 0.0
    history: list[dict] = field(default_factory=list)


def _generator(cfg: RefineConfig, it: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(cfg.random_seed) * 1_000_003 + it)


def _empty_poses(n: int) -> dict[str, np.ndarray]:
    return {
        "rot": np.zeros(n),
        "tilt": np.zeros(n),
        "psi": np.zeros(n),
        "origin_px": np.zeros((n, 3)),
        "class_number": np.ones(n, dtype=np.int64),
        "max_prob": np.zeros(n),
        "n_significant": np.zeros(n, dtype=np.int64),
        "log_likelihood": np.zeros(n),
    }


def _finish_references(refs: torch.Tensor, cfg: RefineConfig, pixel_size_a: float) -> torch.Tensor:
    """Soft edge at the box (3 px), then solvent flattening and non-negativity when asked."""
    box = refs.shape[-1]
    out = soft_mask_outside(refs, box / 2 - 3, 3.0)
    if cfg.flatten_solvent:
        out = solvent_flatten(out, cfg.particle_diameter_a / pixel_size_a, cfg.mask_edge_px)
    if cfg.non_negative:
        out = non_negative(out)
    return out


def initialise(cfg: RefineConfig, ps, device: torch.device) -> RefineState:
    """Iteration 0: σ² from the particles' power, references from back-projections of a few
    particles at orientations uniform on SO(3) (different particles per class)."""
    K, S = cfg.n_classes, ps.box
    gen = _generator(cfg, 0)
    n_init = min(ps.n, max(cfg.n_init_particles * K, 5 * K))
    rows = torch.randperm(ps.n, generator=gen)[:n_init].sort().values
    batch = ps.load(rows, S, device)
    full = VoxelSet.build(S, S / 2, device)
    sigma2 = initial_sigma2(batch.data, batch.ctf2, full).to(device)
    rotations = random_rotations(n_init, gen).to(device)
    class_of = torch.arange(n_init, device=device) % K
    refs = initial_references(batch.data, batch.ctf2, rotations, class_of, K, full)
    diameter_px = cfg.particle_diameter_a / ps.pixel_size_a
    refs = soft_mask_outside(refs.float(), diameter_px / 2, cfg.mask_edge_px)
    refs = _finish_references(refs, cfg, ps.pixel_size_a)
    schedule = VdamSchedule.build(cfg, ps.n)
    # SSNR at the start: weight of half a first mini-batch, ≈ (B/2)·mean C / σ² per shell
    mean_c = shell_means(full.take(batch.ctf2).mean(0), full.shell, S // 2 + 1).double()
    weight_a = 0.5 * schedule.batch_size(1) * mean_c / sigma2
    refs_ft = centred_rfft(refs)
    tau2 = shell_means(full.take(refs_ft.abs() ** 2), full.shell, S // 2 + 1).double() / 2
    ssnr = weight_a[None] * schedule.tau2(1) * tau2
    n_shells = S // 2 + 1
    return RefineState(
        iteration=0,
        refs=refs,
        moments=Moments.initial(K, S, torch.complex64, device),
        sigma2=sigma2.double(),
        pdf_class=torch.full((K,), 1.0 / K, dtype=torch.float64, device=device),
        sigma2_offset_px=(cfg.sigma2_offset_a / ps.pixel_size_a) ** 2,
        current_size=current_size_from_ssnr(ssnr, S, cfg.incr_size),
        fsc=torch.zeros(K, n_shells, dtype=torch.float64),
        ssnr=ssnr.cpu(),
        poses=_empty_poses(ps.n),
    )


@dataclass(frozen=True)
class _IterationGrids:
    search: Search
    fine_rotations: torch.Tensor  # (O_f, 3, 3) float64, perturbed
    box_load: int


def _grids(state: RefineState, cfg: RefineConfig, ps, it: int, device) -> _IterationGrids:
    S = ps.box
    gen = _generator(cfg, it)
    torch.randperm(ps.n, generator=gen)  # the batch draw comes first (same stream as iterate)
    coarse = OrientationGrid.build(cfg.healpix_order)
    fine = orientation_children(coarse)
    perturb = perturbation_rotation(fine.step_deg, cfg.perturb, gen)
    a_coarse = coarse.matrices() @ perturb
    a_fine = fine.matrices() @ perturb
    t_coarse = offset_grid(cfg.offset_range_px, cfg.offset_step_px)
    t_fine = offset_children(t_coarse, cfg.offset_step_px)
    cs = state.current_size
    step_c = angular_step_deg(cfg.healpix_order)
    ang_res = math.pi * cfg.particle_diameter_a * step_c / 360.0 / 1.2
    coarse_size = min(cs, 2 * math.ceil(S * ps.pixel_size_a / ang_res))
    vox_f = VoxelSet.build(cs, cs / 2, device)
    vox_c = VoxelSet.build(cs, coarse_size / 2, device)
    sigma2 = state.sigma2.to(device).float()

    def pass_grid(rot: torch.Tensor, offsets: torch.Tensor, vox: VoxelSet) -> PassGrid:
        inv = vox.friedel / sigma2[vox.shell]
        return PassGrid(rot.float().to(device), offsets.float().to(device), vox, inv, S)

    search = Search(
        coarse=pass_grid(a_coarse, t_coarse, vox_c),
        fine=pass_grid(a_fine, t_fine, vox_f),
        log_pdf_class=state.pdf_class.clamp_min(1e-30).log().float().to(device),
        sigma2_offset_px=state.sigma2_offset_px,
        fraction=cfg.adaptive_fraction,
        max_significant=cfg.maxsig,
        budget_bytes=cfg.engine_budget_bytes,
    )
    return _IterationGrids(search, a_fine, cs)


def _reference_transforms(refs: torch.Tensor, current_size: int) -> torch.Tensor:
    box = refs.shape[-1]
    ft = centred_rfft(refs).to(torch.complex64)
    return ft * (rfft_radius(box, refs.device) < current_size / 2)


def _record(state: RefineState, rows: np.ndarray, al: Alignment, grids: _IterationGrids) -> None:
    n_orient = grids.fine_rotations.shape[0]
    ko = al.best_ko.cpu()
    rot, tilt, psi = matrix_to_euler(grids.fine_rotations[ko % n_orient])
    offsets = grids.search.fine.offsets_px.cpu().double()[al.best_offset.cpu()]
    p = state.poses
    p["rot"][rows], p["tilt"][rows], p["psi"][rows] = rot.numpy(), tilt.numpy(), psi.numpy()
    p["origin_px"][rows] = -offsets.numpy()  # RELION's origin: the particle sits at -origin
    p["class_number"][rows] = (ko // n_orient).numpy() + 1
    p["max_prob"][rows] = al.max_prob.cpu().double().numpy()
    p["n_significant"][rows] = al.n_significant.cpu().numpy()
    p["log_likelihood"][rows] = al.log_evidence.cpu().double().numpy()


def _load(ps, rows: np.ndarray, box: int, device, cfg: RefineConfig, ws: memory.Workspace):
    """A sub-batch (views of ``ws``'s buffer "particles") and the data it is aligned with: with
    ``--zero_mask`` the particle set's masked copy (:meth:`ParticleSet.set_zero_mask`)."""
    _use_zero_mask(ps, cfg)
    batch = ps.load(rows, box, device, workspace=ws)
    return batch, batch.data if batch.masked is None else batch.masked


def _use_zero_mask(ps, cfg: RefineConfig) -> None:
    """Tell the particle set whether to keep masked copies (before it reads: each is made once)."""
    ps.set_zero_mask(cfg.particle_diameter_a if cfg.zero_mask else None, cfg.mask_edge_px)


def _sub_batch(cfg: RefineConfig, box: int) -> int:
    """Particles loaded at once: ``cfg.sub_batch``, fewer if their tensors (D, C, M and the
    masked copy: 24 bytes a half-grid voxel) would pass the engine's memory budget."""
    per_particle = 24 * box * box * (box // 2 + 1)
    return max(1, min(cfg.sub_batch, cfg.engine_budget_bytes // per_particle))


def iterate(
    state: RefineState,
    cfg: RefineConfig,
    schedule: VdamSchedule,
    ps,
    device,
    ranks: distributed.Ranks = distributed.SINGLE,
    progress: Callable[[int, int], None] | None = None,
    workspace: memory.Workspace | None = None,
) -> None:
    """One VDAM iteration (mini-batch) in place: E-step, M-step, update, noise and priors.

    ``ranks``: this rank searches its share of the mini-batch; sums are all-reduced.
    ``progress(done, total)`` is called after each sub-batch (progress bar, abort polling); an
    exception from it leaves ``state`` half-updated, so the caller must drop that state.
    ``workspace``: the buffers of the sub-batches (particles, masked data, the E-step's),
    kept from iteration to iteration by run: arrays of these sizes, hundreds of MB, are
    mapped afresh and their pages faulted in whenever allocated anew."""
    workspace = memory.Workspace() if workspace is None else workspace
    it = state.iteration + 1
    K, S = cfg.n_classes, ps.box
    step, tau2 = schedule.step_size(it), schedule.tau2(it)
    n_batch = schedule.batch_size(it)
    rows_all = torch.randperm(ps.n, generator=_generator(cfg, it))[:n_batch].numpy()
    grids = _grids(state, cfg, ps, it, device)
    refs_ft = _reference_transforms(state.refs, state.current_size)
    refs_full = full_centred(refs_ft)
    acc = Accumulators.zeros(K, S, S // 2 + 1, refs_ft)
    halves = torch.as_tensor(ps.random_subset - 1, device=device)
    fine = grids.search.fine
    pmax, loglik = [], []
    rows_mine, sub_batch = distributed.share(rows_all, ranks), _sub_batch(cfg, grids.box_load)
    with distributed.together(ranks):  # a rank's bad particle stops every rank
        for start in range(0, len(rows_mine), sub_batch):
            rows = rows_mine[start : start + sub_batch]
            batch, aligned = _load(ps, rows, grids.box_load, device, cfg, workspace)
            al = align(aligned, batch.ctf2, refs_full, grids.search, workspace)
            half = halves[torch.as_tensor(rows, device=device)]
            # the M-step's voxels of the unmasked data in align's "fine data", free again
            shapes = [(len(rows), len(fine.voxels))] * 2
            kinds = [batch.data.dtype, batch.ctf2.dtype]
            data_f, ctf_f = workspace.take("fine data", shapes, kinds, batch.data.device)
            fine.voxels.take(batch.data, out=data_f)
            fine.voxels.take(batch.ctf2, out=ctf_f)
            accumulate(
                acc,
                data_f,
                ctf_f,
                half,
                al,
                refs_full,
                fine,
                state.sigma2.to(device),
                cfg.engine_budget_bytes,
            )
            _record(state, rows, al, grids)
            pmax.append(al.max_prob.cpu())
            loglik.append(al.log_evidence.cpu())
            if progress is not None:
                progress(start + len(rows), len(rows_mine))
    distributed.all_reduce_accumulators(acc, ranks)
    distributed.gather_poses(state.poses, rows_all, ranks)
    sums = [float(torch.cat(v).double().sum()) if v else 0.0 for v in (pmax, loglik)]
    pmax_sum, loglik_sum = distributed.all_reduce_sums(sums, ranks)
    step_k = step * (1 - torch.exp(-(3 * K + 10) * state.pdf_class)).to(device)
    new_ft, fsc = vdam_update(
        refs_ft, acc.data, acc.weight, state.moments, step_k, tau2, state.current_size / 2
    )
    refs = _finish_references(centred_irfft(new_ft, S).float(), cfg, ps.pixel_size_a)
    mu = cfg.mu if n_batch < ps.n else 0.0
    state.sigma2 = update_sigma2(state.sigma2.to(device), acc, mu)
    state.pdf_class = update_class_fractions(state.pdf_class, acc, mu)
    if schedule.n_ini < it < schedule.n_ini + schedule.n_mid:
        reseed_empty_class(refs, state.moments, state.pdf_class, cfg.class_inactivity_threshold)
    state.sigma2_offset_px = update_sigma2_offset(state.sigma2_offset_px, acc, mu)
    state.ssnr = ssnr_map(acc.weight[:, 0], centred_rfft(refs), tau2).cpu()
    state.refs, state.fsc, state.iteration = refs, fsc.cpu(), it
    state.current_size = current_size_from_ssnr(state.ssnr, S, cfg.incr_size)
    state.average_pmax = pmax_sum / n_batch
    state.log_likelihood = loglik_sum
    distributed.broadcast_state(state, ranks)
    state.history.append(
        {
            "iteration": it,
            "batch": n_batch,
            "step": step,
            "tau2": tau2,
            "current_size": state.current_size,
            "average_pmax": state.average_pmax,
        }
    )


def assign_all(
    state: RefineState,
    cfg: RefineConfig,
    ps,
    device,
    ranks: distributed.Ranks = distributed.SINGLE,
    progress: Callable[[int, int], None] | None = None,
    workspace: memory.Workspace | None = None,
) -> None:
    """Best pose of every particle against the final references (no update); with several
    ranks each searches its share of every round and the poses are all-gathered."""
    workspace = memory.Workspace() if workspace is None else workspace
    grids = _grids(state, cfg, ps, state.iteration, device)
    refs_full = full_centred(_reference_transforms(state.refs, state.current_size))
    step = _sub_batch(cfg, grids.box_load) * ranks.world_size
    for start in range(0, ps.n, step):
        rows_round = np.arange(start, min(ps.n, start + step))
        rows = distributed.share(rows_round, ranks)
        with distributed.together(ranks):
            if len(rows):
                batch, aligned = _load(ps, rows, grids.box_load, device, cfg, workspace)
                al = align(aligned, batch.ctf2, refs_full, grids.search, workspace)
                _record(state, rows, al, grids)
        distributed.gather_poses(state.poses, rows_round, ranks)
        if progress is not None:
            progress(int(rows_round[-1]) + 1, ps.n)


def checkpoint_path_for(output_root: str) -> Path:
    """The checkpoint of the run with output root ``output_root`` (``Job/run``)."""
    return Path(output_root + "_checkpoint.pt")


def checkpoint_path(cfg: RefineConfig) -> Path:
    return checkpoint_path_for(cfg.output_root)


def save_checkpoint(state: RefineState, cfg: RefineConfig) -> None:
    """Atomic ``torch.save`` of the whole state and the configuration."""
    path = checkpoint_path(cfg)
    tmp = path.with_name(f".{path.name}.tmp")
    payload = {"config": cfg.to_dict(), "state": state, "torch_rng": torch.get_rng_state()}
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_checkpoint(cfg: RefineConfig, device) -> tuple[RefineConfig, RefineState]:
    path = checkpoint_path(cfg)
    if not path.is_file():
        raise InputError(path, "no checkpoint to continue from")
    payload = torch.load(path, map_location=device, weights_only=False)
    saved = dict(payload["config"])
    # what belongs to the machine comes from the new command line; the run's maths from the saved
    saved.update(
        threads=cfg.threads,
        gpu=cfg.gpu,
        command_line=cfg.command_line,
        memory_budget_bytes=cfg.memory_budget_bytes,
        scratch_dir=cfg.scratch_dir,
        preread_images=cfg.preread_images,
    )
    torch.set_rng_state(payload["torch_rng"])
    return RefineConfig(**saved), payload["state"]


def device_for(cfg: RefineConfig) -> torch.device:
    """``--gpu`` absent: CPU; ``--gpu ""`` (RELION's "use GPUs, any"): the first CUDA device, or
    the CPU where there is none; ``--gpu 1,2``: those devices (the first one here)."""
    if cfg.gpu is None:
        return torch.device("cpu")
    if cfg.gpu.strip() == "":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        raise InputError(None, f"--gpu {cfg.gpu} asked for, but no CUDA device is available")
    first = cfg.gpu.split(",")[0].split(":")[0].strip() or "0"
    return torch.device(f"cuda:{int(first)}")


def _iteration_line(state: RefineState, cfg: RefineConfig, ps, seconds: float, eta: str) -> str:
    """``it  12/100  batch  200  res 41.2 Å  classes 0.52 0.48  pmax 0.41  step 0.90  T 4.0``."""
    h = state.history[-1]
    resolution = ps.box * ps.pixel_size_a / max(1, state.current_size // 2)
    classes = " ".join(f"{p:.2f}" for p in state.pdf_class.detach().cpu().tolist())
    width = len(str(cfg.n_iter))
    return (
        f"it {state.iteration:>{width}}/{cfg.n_iter}  batch {h['batch']:>5}  "
        f"res {resolution:5.1f} Å  classes {classes}  pmax {state.average_pmax:.2f}  "
        f"step {h['step']:.2f}  T {h['tau2']:.1f}  {seconds:6.1f} s  ETA {eta}"
    )


def _describe(
    cfg: RefineConfig,
    ps,
    schedule: VdamSchedule,
    device,
    resume_from: int | None,
    ranks: distributed.Ranks = distributed.SINGLE,
) -> str:
    start = "new run" if resume_from is None else f"continuing after iteration {resume_from}"
    kind = getattr(ps, "kind", "in memory")
    return (
        f"denovo3d refine: {start}; {ps.n} particles ({kind}), box {ps.box}, "
        f"{ps.pixel_size_a:.3f} Å/px; K {cfg.n_classes}, {cfg.n_iter} mini-batches of "
        f"{min(schedule.batch_ini, ps.n)} -> {min(schedule.batch_fin, ps.n)}; "
        f"{angular_step_deg(cfg.healpix_order + 1):g}° fine sampling, "
        f"offsets {cfg.offset_range_px:g}/{cfg.offset_step_px:g} px; "
        f"{ranks.world_size} rank(s) on {device}, {cfg.threads} thread(s) each; "
        f"symmetry {cfg.symmetry}"
    )


def run(
    cfg: RefineConfig,
    ps=None,
    *,
    resume: bool = False,
    stop_after: int | None = None,
    monitor=None,
) -> RefineState:
    """Run (or resume) a whole job; ``stop_after`` ends after that iteration (tests).

    ``monitor`` (a :class:`denovo3d.progress.JobMonitor`; rank 0's only) gets the log lines,
    the progress of every sub-batch (where a single process polls the abort trigger; several
    ranks poll it together between iterations) and one summary line per iteration."""
    from denovo3d.io.relion_outputs import (
        write_initial_model,
        write_iteration,
        write_optimisation_set,
    )
    from denovo3d.particles import load_particle_set

    torch.set_num_threads(max(1, cfg.threads))
    memory.keep_freed_memory()
    ranks, device = distributed.setup(device_for(cfg), cfg.gpu)
    ensure_writable_dir(Path(cfg.output_root).parent)  # before any work
    asked_iter = cfg.n_iter
    if resume:
        cfg, state = load_checkpoint(cfg, device)
    if ps is None:
        ps = load_particle_set(cfg.input_path, memory_budget_bytes=cfg.cache_budget_bytes)
        if cfg.scratch_dir:
            distributed.local_leader_first(
                ranks, lambda: ps.use_scratch(cfg.scratch_dir, threads=cfg.threads)
            )
        _use_zero_mask(ps, cfg)
        if cfg.preread_images:
            ps.preread(threads=cfg.threads)
    schedule = VdamSchedule.build(cfg, ps.n)
    log = monitor.log if monitor is not None else (lambda message: None)
    log(_describe(cfg, ps, schedule, device, state.iteration if resume else None, ranks))
    if resume and asked_iter > 0 and asked_iter != cfg.n_iter:
        log(f"--iter {asked_iter} ignored: the run keeps its schedule of {cfg.n_iter} iterations")
    if not resume:
        state = initialise(cfg, ps, device)
        distributed.broadcast_state(state, ranks)
        if ranks.is_writer:
            write_iteration(cfg, state, ps, schedule)
            save_checkpoint(state, cfg)
    remaining = range(state.iteration + 1, cfg.n_iter + 1)
    if monitor is not None:
        monitor.plan([schedule.batch_size(it) for it in remaining] + [ps.n] * bool(remaining))
        # with several ranks the abort trigger is polled collectively between iterations
        monitor.poll_abort = not ranks.active
    progress = monitor.sub_batch if monitor is not None else None
    workspace = memory.Workspace()  # the sub-batches' buffers, reused by every one
    while state.iteration < cfg.n_iter:
        if ranks.active:
            asked = monitor is not None and monitor.abort_requested()
            if distributed.all_reduce_sums([float(asked)], ranks)[0] > 0:
                raise JobAbortedError("abort requested (RELION_JOB_ABORT_NOW)")
        if monitor is not None:
            monitor.start_iteration(f"it {state.iteration + 1}/{cfg.n_iter}")
        iterate(state, cfg, schedule, ps, device, ranks, progress, workspace)
        last = state.iteration == cfg.n_iter
        particles = state.history[-1]["batch"]
        if last:
            if monitor is not None:
                monitor.next_step("best pose of every particle", particles)
            assign_all(state, cfg, ps, device, ranks, progress, workspace)
            particles += ps.n
        with distributed.together(ranks):  # rank 0's failed write stops every rank
            if ranks.is_writer and (last or state.iteration % cfg.write_iter == 0):
                write_iteration(cfg, state, ps, schedule)
            if ranks.is_writer:
                save_checkpoint(state, cfg)
        if monitor is not None:
            seconds = monitor.end_iteration(particles)
            log(_iteration_line(state, cfg, ps, seconds, monitor.eta()))
        if stop_after is not None and state.iteration >= stop_after:
            return state
    if ranks.is_writer:
        path = write_initial_model(cfg, state, ps, log)
        optimisation_set = write_optimisation_set(cfg, state, ps, path)
        log(f"denovo3d refine: wrote {path} and {optimisation_set}")
    return state
