"""Symmetry-axis recovery: success rate within 1° and time per map, ours vs relion_align_symmetry.

Phantoms (tests/symmetry_phantoms.py): an asymmetric subunit of Gaussian blobs replicated by the
group in RELION's standard orientation, box 64, turned by a random rotation, moved by up to ±3 px,
then degraded (missing-wedge-like attenuation to 0.5 within 30° of z, 1 px Gaussian blur, white
noise 0.25 x the map's standard deviation in its support). Error = angle between the recovered and
true orientation modulo the group's normaliser (for Cn: the angle between the axes).

    .venv/bin/python benchmarks/bench_symmetry.py --trials 100 --groups C2,C6,C7,D2,D7,T,O,I
    .venv/bin/python benchmarks/bench_symmetry.py --trials 5 --relion   # side by side
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.symmetry_phantoms import degrade, phantom

from denovo3d.geometry.euler import euler_to_matrix, random_rotations
from denovo3d.geometry.symmetry import point_group
from denovo3d.io.mrc import write_mrc
from denovo3d.symmetry_align import AlignParams, align_symmetry
from denovo3d.symmetry_search import orientation_error_deg


def make_input(group: str, trial: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(10_000 + trial)
    truth = random_rotations(1, gen)[0]
    shift = (torch.rand(3, generator=gen, dtype=torch.float64) - 0.5) * 6
    clean = phantom(group, 64, seed=trial, rotation=truth, shift_px=shift)
    return degrade(clean, seed=trial).float(), truth


def run_relion(volume: torch.Tensor, group: str, workdir: Path) -> tuple[torch.Tensor, float]:
    """relion_align_symmetry on the same map; returns its rotation A (RELION Euler) and time."""
    src = workdir / "in.mrc"
    write_mrc(src, volume.numpy(), 4.0)
    start = time.perf_counter()
    out = subprocess.run(
        ["relion_align_symmetry", "--i", str(src), "--o", str(workdir / "out.mrc"), "--sym", group],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    elapsed = time.perf_counter() - start
    found = re.findall(r"rot\s*=\s*([-\d.e+]+).*?tilt\s*=\s*([-\d.e+]+).*?psi\s*=\s*([-\d.e+]+)",
                       out, flags=re.IGNORECASE | re.DOTALL)  # fmt: skip
    if not found:
        raise RuntimeError(f"could not read the angles from relion_align_symmetry:\n{out}")
    rot, tilt, psi = (float(v) for v in found[-1])
    return euler_to_matrix(torch.tensor(rot), torch.tensor(tilt), torch.tensor(psi)), elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", default="C2,C6,C7,D2,D7,T,O,I")
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--first", type=int, default=0, help="first trial index")
    parser.add_argument("--relion", action="store_true", help="also run relion_align_symmetry")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    use_relion = args.relion and shutil.which("relion_align_symmetry") is not None
    for name in args.groups.split(","):
        group = point_group(name)
        ok, times, errs, r_ok, r_times = 0, [], [], 0, []
        for trial in range(args.first, args.first + args.trials):
            volume, truth = make_input(name, trial)
            start = time.perf_counter()
            result = align_symmetry(volume, group, AlignParams(seed=trial))
            times.append(time.perf_counter() - start)
            err = float(orientation_error_deg(result.rotation, truth, group))
            errs.append(err)
            ok += err < 1.0
            line = f"{name} trial {trial}: ours {err:.3f} deg {times[-1]:.1f} s"
            if use_relion:
                with tempfile.TemporaryDirectory() as tmp:
                    a, elapsed = run_relion(volume, name, Path(tmp))
                r_err = float(orientation_error_deg(a, truth, group))
                r_ok += r_err < 1.0
                r_times.append(elapsed)
                line += f" | relion {r_err:.3f} deg {elapsed:.1f} s"
            print(line, flush=True)
        n = len(errs)
        summary = (
            f"SUMMARY {name}: ours {ok}/{n} within 1 deg, median error "
            f"{sorted(errs)[n // 2]:.3f} deg, max {max(errs):.3f}, mean time {sum(times) / n:.1f} s"
        )
        if use_relion:
            summary += f" | relion {r_ok}/{n} within 1 deg, mean time {sum(r_times) / n:.1f} s"
        print(summary, flush=True)


if __name__ == "__main__":
    main()
