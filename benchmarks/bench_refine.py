"""Benchmark the refine job: speed of the E-step against the machine's GEMM rate, time per
iteration as batch, box and angular sampling grow, peak memory, and quality on simulated data.

Modes (all simulate their data with :mod:`denovo3d.simulate` first):
  gemm      torch.matmul float32 FLOP/s on this machine (square 2048 and a skinny E-step shape)
  projector ns per sample of rotate (fresh and reused output) and splat at --box, 500
            orientations, the native CPU kernel against the torch path (DENOVO3D_NATIVE=0)
  estep     one iteration at a given batch/box/sampling: E-step wall and CPU time, its useful
            FLOPs (every coarse pose, every child pose of the significant coarse samples),
            achieved FLOP per CPU second against matmul's measured right after it,
            whole-iteration time (--batch, --box, --healpix_order, --repeat: the best CPU time)
  scaling   estep over batch sizes, boxes and samplings
  job       the whole job end to end (default: the standard dataset, 1,000 particles, box 64,
            100 mini-batches, 15°, offsets 6/2 px), then FSC to the truth after superposition
            and hand check, against a reconstruction with the true poses

Usage:
  .venv/bin/python benchmarks/bench_refine.py gemm
  .venv/bin/python benchmarks/bench_refine.py projector --box 64
  .venv/bin/python benchmarks/bench_refine.py estep --batch 200 --box 64
  .venv/bin/python benchmarks/bench_refine.py scaling
  .venv/bin/python benchmarks/bench_refine.py job [--n 1000 --box 64 --iter 100 --snr 0.1]
  add --gpu 0 to any mode for CUDA device 0 (rates per second of wall time, after a synchronise)
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch

from denovo3d import memory, refine
from denovo3d.config import RefineConfig, VdamSchedule
from denovo3d.engine import expectation


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


CPU = torch.device("cpu")


def _clock(device: torch.device) -> float:
    """CPU seconds on the CPU (all threads' time: with one thread, a core's rate even when
    other processes share the machine); wall seconds after a synchronise on CUDA."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return time.perf_counter()
    return time.process_time()


def gemm_rate(device: torch.device = CPU, n: int = 2048, repeat: int = 5) -> dict[str, float]:
    """Measured float32 matmul FLOP/s (per CPU second on the CPU, per second on CUDA, with
    TF32 off): square ``n`` and the E-step's skinny shape."""
    out = {}
    for name, (m, k, p) in {"square": (n, n, n), "estep": (12_000, 1_400, 576)}.items():
        a, b = torch.randn(m, k, device=device), torch.randn(k, p, device=device)
        a @ b
        t = _clock(device)
        for _ in range(repeat):
            a @ b
        out[name] = 2 * m * k * p * repeat / (_clock(device) - t)
    return out


def projector_rates(device: torch.device = CPU, box: int = 64, n_orient: int = 500) -> None:
    """Prints ns per sample (per CPU second on the CPU) of ``rotate`` into a fresh output (its
    pages faulted in, as a new array is) and into a reused one, and of ``splat``, for the native
    kernel and the torch path, at ``n_orient`` random orientations of the voxels below Nyquist."""
    from denovo3d.engine.projector import full_centred, rotate, splat
    from denovo3d.fourier import rfft_coords
    from denovo3d.geometry.euler import random_rotations

    gen = torch.Generator().manual_seed(0)
    half = torch.fft.rfftn(torch.randn(1, box, box, box, generator=gen), dim=(-3, -2, -1))
    full = full_centred(half).to(device)
    k = rfft_coords(box).float()
    coords = k[k.norm(dim=-1) < box // 2].contiguous().to(device)
    rots = random_rotations(n_orient, gen).float().to(device)
    samples = n_orient * coords.shape[0]
    paths = ("native", "torch") if device.type == "cpu" else ("torch",)
    for path in paths:
        os.environ["DENOVO3D_NATIVE"] = "1" if path == "native" else "0"
        rotate(full, rots[:10], coords, box // 2)  # the native kernel built or loaded
        t = _clock(device)
        out = rotate(full, rots, coords, box // 2)
        fresh = _clock(device) - t
        rotate(full, rots, coords, box // 2, out=out)
        t = _clock(device)
        rotate(full, rots, coords, box // 2, out=out)
        reused = _clock(device) - t
        values, weights = out[0], out[0].real.contiguous()
        t = _clock(device)
        splat(values, weights, rots, coords, box // 2, box)
        back = _clock(device) - t
        print(
            f"{path:6s} box {box}, {n_orient} orientations x {coords.shape[0]} voxels: rotate "
            f"{fresh / samples * 1e9:.1f} ns a sample (fresh output), "
            f"{reused / samples * 1e9:.1f} ns (reused); splat {back / samples * 1e9:.1f} ns"
        )
    os.environ.pop("DENOVO3D_NATIVE", None)


def fine_flops(coarse_sig: torch.Tensor, n_voxels: int) -> float:
    """The fine pass's useful FLOPs: per particle, its ``n_t`` fine offsets × ``n_o`` fine
    orientations (8 children of each significant coarse one) cross terms (``4V`` each, a real
    dot product of length ``2V``) and ``n_o`` norms (``2V``), whatever the formulation pads."""
    n_o = 8 * coarse_sig.any(dim=1).sum(dim=1).double()
    n_t = 8 * coarse_sig.any(dim=2).sum(dim=1).double()
    return float((4.0 * n_voxels * n_t * n_o + 2.0 * n_voxels * n_o).sum())


class FlopCounter:
    """Counts the useful FLOPs of the E-step's scores (coarse: every pose; fine: every child
    pose of the significant coarse samples) and its wall and CPU time, by wrapping its
    functions; the counting itself is left out of the times (the fine pass's count reduces the
    whole (b, T, KO) mask: ~30 ms a mini-batch of 200 at box 64).

    With ``gemm_every`` k, after every k-th E-step (outside its time) one matmul of the
    E-step's shape is timed: ``gemm_rates`` then holds matmul's rate under the same load as
    the run's E-steps (on a shared machine one measurement at the end can differ by 1.5x);
    ``gemm_seconds`` is their wall time, to take out of the run's."""

    def __init__(self, device: torch.device = CPU, gemm_every: int = 0) -> None:
        self.device = device
        self.gemm_every = gemm_every
        self.gemm_rates: list[float] = []
        self.gemm_seconds = 0.0
        self.calls = 0
        self.flops = 0.0
        self.seconds = 0.0
        self.cpu_seconds = 0.0
        self._counting = (0.0, 0.0)  # wall, clock seconds spent counting in the current call
        self._fine, self._align = expectation.fine_search, expectation.align
        self._scores = expectation.coarse_scores

    def __enter__(self) -> FlopCounter:
        counter = self

        def fine_search(data, ctf2, refs_full, coarse_sig, grid, *args, **kwargs):
            start, clock = time.perf_counter(), _clock(counter.device)
            counter.flops += fine_flops(coarse_sig, len(grid.voxels))
            wall, cpu = counter._counting
            counter._counting = (
                wall + time.perf_counter() - start,
                cpu + _clock(counter.device) - clock,
            )
            return counter._fine(data, ctf2, refs_full, coarse_sig, grid, *args, **kwargs)

        def coarse_scores(data, ctf2, proj, grid, log_prior, **kwargs):
            b, v = data.shape
            t, ko = grid.offsets_px.shape[0], proj.shape[0]
            counter.flops += 2.0 * b * t * 2 * v * ko + 2.0 * b * v * ko
            return counter._scores(data, ctf2, proj, grid, log_prior, **kwargs)

        def align(*args, **kwargs):
            counter._counting = (0.0, 0.0)
            start, clock = time.perf_counter(), _clock(counter.device)
            result = counter._align(*args, **kwargs)
            wall, cpu = counter._counting
            counter.cpu_seconds += _clock(counter.device) - clock - cpu  # CUDA: wall seconds
            counter.seconds += time.perf_counter() - start - wall
            counter.calls += 1
            if counter.gemm_every and counter.calls % counter.gemm_every == 0:
                start = time.perf_counter()
                counter.gemm_rates.append(gemm_rate(counter.device, repeat=1)["estep"])
                counter.gemm_seconds += time.perf_counter() - start
            return result

        expectation.fine_search = fine_search
        expectation.coarse_scores = coarse_scores
        refine.align = align
        return self

    def __exit__(self, *exc) -> None:
        expectation.fine_search = self._fine
        expectation.coarse_scores = self._scores
        refine.align = self._align


def simulate(out: Path, n: int, box: int, pixel_size_a: float, snr: float, seed: int) -> dict:
    from denovo3d.phantoms import make_phantom
    from denovo3d.simulate import SimulationConfig, simulate_project

    truth = make_phantom("c6_hexamer", box, pixel_size_a)
    config = SimulationConfig(n_particles=n, box=box, pixel_size_a=pixel_size_a, snr=snr, seed=seed)
    return simulate_project(out, truth, config)


def _config(args, particles: Path, out: Path, **changes) -> RefineConfig:
    base = dict(
        input_path=str(particles),
        output_root=str(out / "run"),
        n_iter=args.iter,
        particle_diameter_a=args.diameter,
        flatten_solvent=True,
        zero_mask=True,
        healpix_order=args.healpix_order,
        random_seed=args.seed,
        threads=torch.get_num_threads(),
        write_iter=max(args.iter, 1),
        preread_images=True,
        ini_subset=args.grad_ini_subset,
        fin_subset=args.grad_fin_subset,
        gpu=args.gpu,
    )
    base.update(changes)
    return RefineConfig(**base)


def estep(args, particles: Path, out: Path, batch: int, box: int, order: int) -> dict:
    """One mini-batch of ``batch`` particles at current size ``box`` and HEALPix ``order``."""
    from denovo3d.particles import load_particle_set

    ps = load_particle_set(particles)
    cfg = _config(args, particles, out, healpix_order=order, ini_subset=batch, fin_subset=batch)
    device = refine.device_for(cfg)
    state = refine.initialise(cfg, ps, device)
    state.current_size = min(box, ps.box)
    schedule = VdamSchedule.build(cfg, ps.n)
    # read and cache outside the timing, with the masked copy the job keeps (set first: a
    # change of the zero mask empties the cache, and every iteration would read its files)
    refine._use_zero_mask(ps, cfg)
    ps.load(range(ps.n), state.current_size, threads=cfg.threads)
    best, workspace = None, memory.Workspace()  # kept from iteration to iteration, as in run
    for _ in range(args.repeat):
        state.current_size = min(box, ps.box)
        with FlopCounter(device) as counter:
            start, cpu = time.perf_counter(), _clock(device)
            refine.iterate(state, cfg, schedule, ps, device, workspace=workspace)
            wall, cpu = time.perf_counter() - start, _clock(device) - cpu
        if best is None or counter.cpu_seconds < best["estep_cpu_s"]:
            best = {
                "iteration_s": wall,
                "iteration_cpu_s": cpu,
                "estep_s": counter.seconds,
                "estep_cpu_s": counter.cpu_seconds,
                "estep_gemm_gflop": counter.flops / 1e9,
                "estep_gflops": counter.flops / counter.cpu_seconds / 1e9,
            }
    return {
        "batch": batch,
        "box": box,
        "healpix_order": order,
        **best,
        "peak_rss_gib": peak_rss_gib(),
    }


def job(args, project: dict, out: Path) -> None:
    from denovo3d.engine.references import reconstruct
    from denovo3d.engine.superpose import superpose
    from denovo3d.fourier import centred_irfft
    from denovo3d.fsc import fsc_volumes, resolution_at
    from denovo3d.geometry.euler import euler_to_matrix
    from denovo3d.io.mrc import read_mrc
    from denovo3d.io.star import read_star
    from denovo3d.particles import load_particle_set

    particles = project["particles"]
    cfg = _config(args, particles, out)
    device = refine.device_for(cfg)
    start = time.perf_counter()
    # every E-step of the run, the final assignment too; matmul timed after every tenth
    with FlopCounter(device, gemm_every=10) as counter:
        state = refine.run(cfg)
    wall = time.perf_counter() - start - counter.gemm_seconds
    if not counter.gemm_rates:  # a run of fewer than ten E-steps
        counter.gemm_rates.append(gemm_rate(device)["estep"])
    rate = statistics.median(counter.gemm_rates)
    truth = torch.from_numpy(read_mrc(project["truth"])[0].copy())
    ps = load_particle_set(particles)
    table = read_star(project["truth_particles"])["particles"]
    angles = torch.tensor(table[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy())
    origin = torch.tensor(
        table[["rlnOriginXAngst", "rlnOriginYAngst", "rlnOriginZAngst"]].to_numpy()
    )
    rot = euler_to_matrix(angles[:, 0], angles[:, 1], angles[:, 2])
    batch = ps.load(range(ps.n), ps.box)
    num, den = reconstruct(batch.data, batch.ctf2, rot, -origin / ps.pixel_size_a, ps.box)
    true_map = centred_irfft(num / den.clamp_min(1e-3 * float(den.mean())), ps.box)
    px, box = ps.pixel_size_a, ps.box
    f_true = fsc_volumes(true_map, truth)
    aligned, corr = superpose(state.refs[int(state.pdf_class.argmax())], truth)
    f_ours = fsc_volumes(aligned, truth)
    print(
        f"job: {ps.n} particles, box {box}, {cfg.n_iter} iterations: {wall:.0f} s wall, "
        f"peak RSS {peak_rss_gib():.2f} GiB"
    )
    unit = "CPU s" if device.type == "cpu" else "s"
    print(
        f"  E-steps: {counter.flops / 1e9:.0f} GFLOP in {counter.seconds:.0f} s "
        f"({counter.cpu_seconds:.0f} {unit}): {counter.flops / counter.cpu_seconds / 1e9:.1f} "
        f"GFLOP/{unit}, {100 * counter.flops / counter.cpu_seconds / rate:.0f}% of matmul "
        f"(the median of {len(counter.gemm_rates)} timings during the run, "
        f"{min(counter.gemm_rates) / 1e9:.1f}-{max(counter.gemm_rates) / 1e9:.1f}: "
        f"{rate / 1e9:.1f} GFLOP/{unit})"
    )
    for name, f in (("true poses", f_true), ("de novo", f_ours)):
        print(
            f"  {name:10s} FSC 0.5: {resolution_at(f, 0.5, box, px):.1f} Å, "
            f"0.143: {resolution_at(f, 0.143, box, px):.1f} Å"
        )
    print(f"  superposition correlation {corr:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["gemm", "projector", "estep", "scaling", "job"])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--box", type=int, default=64)
    parser.add_argument("--pixel_size", type=float, default=5.4)
    parser.add_argument("--snr", type=float, default=0.1)
    parser.add_argument("--iter", type=int, default=100)
    parser.add_argument("--batch", type=int, default=200)
    parser.add_argument("--healpix_order", type=int, default=1)
    parser.add_argument("--diameter", type=float, default=230.0)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--grad_ini_subset", type=int, default=-1, help="job: first batch size")
    parser.add_argument("--grad_fin_subset", type=int, default=-1, help="job: last batch size")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--gpu", default=None, help="CUDA device id (refine's --gpu); rates per s")
    args = parser.parse_args()
    device = CPU if args.gpu is None else torch.device(f"cuda:{args.gpu or 0}")
    unit = "CPU s" if device.type == "cpu" else "s"
    kept = memory.keep_freed_memory()  # as refine.run does
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {device}; "
        f"glibc keeps freed memory: {kept}"
    )
    if args.mode == "gemm":
        for name, rate in gemm_rate(device).items():
            print(f"matmul float32 {name}: {rate / 1e9:.1f} GFLOP per {unit}")
        return
    if args.mode == "projector":
        projector_rates(device, args.box)
        return
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        data = out / "data"
        if (data / "particles.star").is_file():  # reuse a data set simulated before
            names = ("particles", "truth", "truth_particles")
            project = {k: data / f"{k}.star" if k != "truth" else data / "truth.mrc" for k in names}
        else:
            start = time.perf_counter()
            project = simulate(data, args.n, args.box, args.pixel_size, args.snr, args.seed)
            print(
                f"simulated {args.n} particles, box {args.box}: {time.perf_counter() - start:.0f} s"
            )
        if args.mode == "job":
            job(args, project, out / "job")
            return
        cases = [(args.batch, args.box, args.healpix_order)]
        if args.mode == "scaling":
            cases = [(b, args.box, 1) for b in (50, 100, 200)]
            cases += [(100, s, 1) for s in (24, 32, 48) if s < args.box]
            cases += [(100, args.box, 0)]
        for batch, box, order in cases:
            r = estep(args, project["particles"], out / "estep", batch, box, order)
            rate = gemm_rate(device)["estep"]  # measured next to the E-step, same load
            print(
                f"batch {r['batch']:4d} box {r['box']:3d} order {r['healpix_order']}: iteration "
                f"{r['iteration_s']:.2f} s ({r['iteration_cpu_s']:.2f} {unit}), E-step "
                f"{r['estep_s']:.2f} s ({r['estep_cpu_s']:.2f} {unit}), "
                f"{r['estep_gemm_gflop']:.1f} GFLOP -> {r['estep_gflops']:.1f} GFLOP/{unit} "
                f"({100 * r['estep_gflops'] * 1e9 / rate:.0f}% of matmul, "
                f"{rate / 1e9:.1f} GFLOP/{unit}), peak RSS {r['peak_rss_gib']:.2f} GiB"
            )


if __name__ == "__main__":
    main()
