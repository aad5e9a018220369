"""Symmetry-axis recovery: success rate within 1° and time per map, ours vs relion_align_symmetry.

Phantoms (tests/symmetry_phantoms.py): an asymmetric subunit of Gaussian blobs replicated by the
group in RELION's standard orientation, box 64, turned by a random rotation, moved by up to ±3 px,
then degraded (missing-wedge-like attenuation to 0.5 within 30° of z, 1 px Gaussian blur, white
noise 0.25 x the map's standard deviation in its support). Error = angle between the recovered and
true orientation modulo the group's normaliser (for Cn: the angle between the axes). Ours scores
within the phantoms' particle diameter (40 px, as the de novo job passes its --particle_diameter;
``--particle_diameter_px 0``: the whole box).

    .venv/bin/python benchmarks/bench_symmetry.py --trials 100 --groups C2,C6,C7,D2,D7,T,O,I
    .venv/bin/python benchmarks/bench_symmetry.py --trials 5 --relion   # side by side
    .venv/bin/python benchmarks/bench_symmetry.py --detect --trials 5 --groups C1,C2,O,I

``--detect`` runs the group detection (all candidates Cn, Dn n <= 12, T, O, I; ``--candidates
C6,D6`` for a few) on the same phantoms instead (C1: the asymmetric subunit alone) and counts
the right verdicts; each line also gives the flip ratios of the Dn tested (``symmetry_flips``).

Trials run round robin over the groups (an interrupted run has every group's first trials); times
are wall-clock and CPU seconds (CPU is the fair comparison on a shared machine). RELION's
alignment is read from its "The refined solution is ROT = .. TILT = .. PSI = .." line.
"""

from __future__ import annotations

import argparse
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.symmetry_phantoms import PARTICLE_DIAMETER_PX, recovery_trial

from denovo3d.geometry.euler import euler_to_matrix
from denovo3d.geometry.symmetry import point_group
from denovo3d.io.mrc import write_mrc
from denovo3d.symmetry_align import AlignParams, align_symmetry, detect_symmetry
from denovo3d.symmetry_search import orientation_error_deg


def run_relion(
    volume: torch.Tensor, group: str, workdir: Path
) -> tuple[torch.Tensor, float, float]:
    """relion_align_symmetry on the same map; returns its rotation A (RELION Euler), the wall
    time and the CPU time of the child process."""
    src = workdir / "in.mrc"
    write_mrc(src, volume.numpy(), 4.0)
    start = time.perf_counter()
    cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_start = cpu.ru_utime + cpu.ru_stime
    out = subprocess.run(
        ["relion_align_symmetry", "--i", str(src), "--o", str(workdir / "out.mrc"), "--sym", group],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    elapsed = time.perf_counter() - start
    cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_used = cpu.ru_utime + cpu.ru_stime - cpu_start
    found = re.findall(r"rot\s*=\s*([-\d.e+]+).*?tilt\s*=\s*([-\d.e+]+).*?psi\s*=\s*([-\d.e+]+)",
                       out, flags=re.IGNORECASE | re.DOTALL)  # fmt: skip
    if not found:
        raise RuntimeError(f"could not read the angles from relion_align_symmetry:\n{out}")
    rot, tilt, psi = (float(v) for v in found[-1])
    angles = (torch.tensor(rot), torch.tensor(tilt), torch.tensor(psi))
    return euler_to_matrix(*angles), elapsed, cpu_used


def _summary(name: str, errs: list[float], secs: list[float], cpu: list[float]) -> str:
    n = len(errs)
    ok = sum(e < 1.0 for e in errs)
    return (
        f"{ok}/{n} within 1 deg, median error {sorted(errs)[n // 2]:.3f} deg, max {max(errs):.3f}, "
        f"mean time {sum(secs) / n:.1f} s wall, {sum(cpu) / n:.1f} s CPU"
    )


def detection(
    names: list[str], trials: range, diameter: float | None, candidates: tuple[str, ...] | None
) -> None:
    """Detection on every group's phantoms: the verdict, its significance, the runner-up."""
    right: dict[str, list[bool]] = {n: [] for n in names}
    for trial in trials:
        for name in names:
            volume, _ = recovery_trial(name, trial)
            cpu = time.process_time()
            found = detect_symmetry(
                volume, candidates, params=AlignParams(seed=trial, mask_diameter_px=diameter)
            )
            cpu = time.process_time() - cpu
            right[name].append(found.verdict == name)
            best = sorted(found.rows, key=lambda r: -r.significance)[:4]
            table = " ".join(
                f"{r.group}:{r.score:.2f}/{r.significance:.1f}/"
                + ("-" if r.peak_agreement is None else f"{r.peak_agreement:.3f}")
                for r in best
            )
            flips = " ".join(
                f"{r.group}:{r.flip_ratio:.2f}" for r in found.rows if r.flip_ratio is not None
            )
            print(
                f"{name} trial {trial}: verdict {found.verdict} (runner-up {found.runner_up}, "
                f"evidence {found.evidence:.1f}) {cpu:.0f} s CPU | score/significance/peak {table}"
                f" | flip ratios {flips or '-'}",
                flush=True,
            )
    for name in names:
        print(f"SUMMARY {name}: {sum(right[name])}/{len(right[name])} right", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", default="C2,C6,C7,D2,D7,T,O,I")
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--first", type=int, default=0, help="first trial index")
    parser.add_argument("--relion", action="store_true", help="also run relion_align_symmetry")
    parser.add_argument(
        "--relion_trials", type=int, default=None, help="RELION on the first N trials only"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--detect", action="store_true", help="detection instead of alignment")
    parser.add_argument(
        "--candidates", default=None, help="detection's candidate groups (default: all 25)"
    )
    parser.add_argument(
        "--particle_diameter_px", type=float, default=PARTICLE_DIAMETER_PX, help="0: whole box"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    diameter = args.particle_diameter_px if args.particle_diameter_px > 0 else None
    names = args.groups.split(",")
    if args.detect:
        candidates = tuple(args.candidates.split(",")) if args.candidates else None
        detection(names, range(args.first, args.first + args.trials), diameter, candidates)
        return
    use_relion = args.relion and shutil.which("relion_align_symmetry") is not None
    ours: dict[str, tuple[list[float], list[float], list[float]]] = {n: ([], [], []) for n in names}
    theirs: dict[str, tuple[list[float], list[float], list[float]]] = {
        n: ([], [], []) for n in names
    }
    # trials outer, groups inner: an interrupted run still has every group's first trials
    for i, trial in enumerate(range(args.first, args.first + args.trials)):
        for name in names:
            group = point_group(name)
            volume, truth = recovery_trial(name, trial)
            start, cpu = time.perf_counter(), time.process_time()
            params = AlignParams(seed=trial, mask_diameter_px=diameter)
            result = align_symmetry(volume, group, params)
            secs, cpu = time.perf_counter() - start, time.process_time() - cpu
            err = float(orientation_error_deg(result.rotation, truth, group))
            for lst, v in zip(ours[name], (err, secs, cpu), strict=True):
                lst.append(v)
            line = f"{name} trial {trial}: ours {err:.3f} deg {secs:.1f} s ({cpu:.1f} s CPU)"
            if use_relion and (args.relion_trials is None or i < args.relion_trials):
                with tempfile.TemporaryDirectory() as tmp:
                    a, r_secs, r_cpu = run_relion(volume, name, Path(tmp))
                r_err = float(orientation_error_deg(a, truth, group))
                for lst, v in zip(theirs[name], (r_err, r_secs, r_cpu), strict=True):
                    lst.append(v)
                line += f" | relion {r_err:.3f} deg {r_secs:.1f} s ({r_cpu:.1f} s CPU)"
            print(line, flush=True)
    for name in names:
        summary = f"SUMMARY {name}: ours {_summary(name, *ours[name])}"
        if theirs[name][0]:
            summary += f" | relion {_summary(name, *theirs[name])}"
        print(summary, flush=True)


if __name__ == "__main__":
    main()
