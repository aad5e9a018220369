"""Benchmark scale: peak memory and time per iteration against the particle count N, the box,
the angular sampling and the number of ranks, on simulated pseudo-subtomograms read lazily.

Modes:
  data   simulate the sets (``denovo3d simulate``, C6 hexamer, SNR 0.1) under --data: 20,000
         particles of box 24 (12 Å), and 1,000 of box 32 (9 Å) and 48 (6 Å); the particles.star
         files of the first 2,000 and 5,000 particles of the big set for the N sweep
  one    one measurement in this process (or in each rank under torchrun): initialise, then
         --iters mini-batches of --batch particles at the full box (current size forced to the
         box, so every iteration does the same work); prints one JSON line (rank 0) with the
         median wall time of iterations 2..n, their CPU time (summed over ranks: the machine
         is shared, so wall time depends on the load), the peak RSS of every rank and the
         memory budget
  all    every sweep, each case in a fresh process (peak RSS is per process): N (2k, 5k, 20k;
         then every particle read once, as the final assignment does, so the cache reaches its
         steady state), ranks (1, 2 via torchrun), --max_memory (256M, 1G, 4G), --scratch_dir
         (written, then reused), box (24, 32, 48), sampling (HEALPix order 0, 1, 2 = fine 30°,
         15°, 7.5°)

Usage:
  nice -n 10 .venv/bin/python benchmarks/bench_scale.py data --data /tmp/scale
  nice -n 10 .venv/bin/python benchmarks/bench_scale.py all --data /tmp/scale
  torchrun --standalone --nproc-per-node=2 benchmarks/bench_scale.py one \\
      --particles /tmp/scale/n20k_b24/particles.star --max_memory 1G
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

SETS = {"n20k_b24": (20000, 24, 12.0), "n1k_b32": (1000, 32, 9.0), "n1k_b48": (1000, 48, 6.0)}


def simulate(data: Path) -> None:
    from denovo3d.io.star import read_star, write_star

    for name, (n, box, pixel) in SETS.items():
        out = data / name
        if (out / "particles.star").is_file():
            continue
        start = time.perf_counter()
        options = f"--phantom c6_hexamer --n {n} --box {box} --pixel_size {pixel} --snr 0.1 --j 1"
        subprocess.run(
            [sys.executable, "-m", "denovo3d", "simulate", "--o", str(out), *options.split()],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        print(f"simulated {name}: {time.perf_counter() - start:.0f} s", flush=True)
    blocks = read_star(data / "n20k_b24" / "particles.star")
    for n in (2000, 5000):
        path = data / "n20k_b24" / f"particles_{n}.star"
        if not path.is_file():
            write_star(path, {**blocks, "particles": blocks["particles"].iloc[:n]})


def one(args: argparse.Namespace) -> None:
    from denovo3d import distributed, refine
    from denovo3d.cli.refine import _max_memory
    from denovo3d.config import RefineConfig, VdamSchedule
    from denovo3d.memory import keep_freed_memory, peak_rss_bytes
    from denovo3d.particles import load_particle_set

    torch.set_num_threads(args.threads)
    keep_freed_memory()  # as refine.run does
    ranks, device = distributed.setup(torch.device("cpu"))
    cfg = RefineConfig(
        input_path=str(args.particles),
        output_root="unused/run",
        n_iter=100,
        particle_diameter_a=args.diameter,
        flatten_solvent=True,
        zero_mask=True,
        healpix_order=args.order,
        ini_subset=args.batch,
        fin_subset=args.batch,
        random_seed=1,
        threads=args.threads,
        memory_budget_bytes=_max_memory(args.max_memory),
    )
    start = time.perf_counter()
    ps = load_particle_set(cfg.input_path, memory_budget_bytes=cfg.cache_budget_bytes)
    open_s = time.perf_counter() - start
    start = time.perf_counter()
    if args.scratch_dir is not None:
        distributed.local_leader_first(ranks, lambda: ps.use_scratch(args.scratch_dir))
    scratch_s = time.perf_counter() - start
    schedule = VdamSchedule.build(cfg, ps.n)
    state = refine.initialise(cfg, ps, device)
    distributed.broadcast_state(state, ranks)
    times, cpu = [], []
    for _ in range(args.iters):
        state.current_size = ps.box
        start, start_cpu = time.perf_counter(), time.process_time()
        refine.iterate(state, cfg, schedule, ps, device, ranks)
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    start = time.perf_counter()
    if args.fill:  # every particle once, as the final assignment does: the cache's steady state
        for first in range(0, ps.n, cfg.sub_batch):
            ps.load(range(first, min(ps.n, first + cfg.sub_batch)))
    fill_s = time.perf_counter() - start
    peaks = [0.0] * ranks.world_size
    peaks[ranks.rank] = peak_rss_bytes() / 2**30
    peaks = distributed.all_reduce_sums(peaks, ranks)
    cpu_s = distributed.all_reduce_sums([statistics.median(cpu[1:] or cpu)], ranks)[0]
    if ranks.is_writer:
        result = {
            "n": ps.n,
            "box": ps.box,
            "order": args.order,
            "batch": args.batch,
            "ranks": ranks.world_size,
            "max_memory_gib": cfg.memory_budget_bytes / 2**30,
            "open_s": round(open_s, 2),
            "scratch_s": round(scratch_s, 2) if args.scratch_dir is not None else None,
            "fill_s": round(fill_s, 2) if args.fill else None,
            "iteration_s": round(statistics.median(times[1:] or times), 3),
            "iterations_s": [round(t, 3) for t in times],
            "cpu_s": round(cpu_s, 3),
            "peak_rss_gib": [round(p, 3) for p in peaks],
        }
        print(json.dumps(result), flush=True)


def _run_one(star: Path, ranks: int = 1, **options) -> dict:
    opts = {"batch": 200, "iters": 5, "order": 1, "max_memory": "1G", "threads": 1} | options
    cmd = [sys.executable]
    if ranks > 1:
        cmd += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
    cmd += [__file__, "one", "--particles", str(star)]
    for key, value in opts.items():
        cmd += [f"--{key}"] if value is True else [f"--{key}", str(value)]
    env = {**os.environ, "OMP_NUM_THREADS": str(opts["threads"])}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def _show(what: str, r: dict) -> None:
    peaks = ", ".join(f"{p:.2f}" for p in r["peak_rss_gib"])
    scratch = f", scratch copy {r['scratch_s']:.0f} s" if r.get("scratch_s") is not None else ""
    scratch += f", read all {r['fill_s']:.0f} s" if r.get("fill_s") is not None else ""
    print(
        f"{what:28s} N {r['n']:6d} box {r['box']:3d} order {r['order']} batch {r['batch']} "
        f"ranks {r['ranks']} max_memory {r['max_memory_gib']:.2f} GiB: "
        f"{r['iteration_s']:.2f} s/iteration (CPU {r['cpu_s']:.2f} s, all ranks), "
        f"peak RSS {peaks} GiB (open {r['open_s']:.1f} s{scratch})",
        flush=True,
    )


def all_sweeps(args: argparse.Namespace) -> None:
    big = args.data / "n20k_b24"
    stars = {n: big / f"particles_{n}.star" for n in (2000, 5000)} | {20000: big / "particles.star"}
    for star in stars.values():
        _show("particles, then read all", _run_one(star, fill=True))
    _show("ranks", _run_one(stars[20000], ranks=2))
    for n in (2000, 20000):
        _show("budget 256M, then read all", _run_one(stars[n], max_memory="256M", fill=True))
    _show("budget 4G, then read all", _run_one(stars[20000], max_memory="4G", fill=True))
    scratch = args.data / "scratch"
    for what in ("scratch (writes it)", "scratch (reuses it)"):
        _show(what, _run_one(stars[20000], scratch_dir=scratch))
    for name in ("n1k_b32", "n1k_b48"):
        _show("box", _run_one(args.data / name / "particles.star"))
    for order in (0, 2):
        _show("sampling", _run_one(stars[2000], order=order))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["data", "one", "all"])
    parser.add_argument("--data", type=Path, default=Path("/tmp/scale"))
    parser.add_argument("--particles", type=Path)
    parser.add_argument("--batch", type=int, default=200)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--order", type=int, default=1)
    parser.add_argument("--max_memory", default="1G")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--diameter", type=float, default=230.0)
    parser.add_argument("--scratch_dir", type=Path, default=None)
    parser.add_argument("--fill", action="store_true", help="then read every particle once")
    args = parser.parse_args()
    if args.mode == "data":
        simulate(args.data)
    elif args.mode == "one":
        one(args)
    else:
        print(f"torch {torch.__version__}, {os.cpu_count()} CPUs", flush=True)
        all_sweeps(args)


if __name__ == "__main__":
    main()
