"""The issue's acceptance bar on the benchmark phantoms (tests/symmetry_phantoms.recovery_trial):
axes back within 1° in at least 99 of 100 trials per group, and detection of the true group
(C1 for asymmetric maps). The full runs are `slow` (hours on one core: run with -m slow, or
benchmarks/bench_symmetry.py); the default suite keeps one trial each of T and I, a C2 trial
that the polish fixed and one that its residual (instead of a correlation) fixed."""

from __future__ import annotations

import pytest
import torch

from denovo3d.geometry.symmetry import point_group
from denovo3d.symmetry_align import AlignParams, align_symmetry, detect_symmetry
from denovo3d.symmetry_search import orientation_error_deg
from tests.symmetry_phantoms import PARTICLE_DIAMETER_PX, RECOVERY_GROUPS, recovery_trial


def _params(trial: int) -> AlignParams:
    """As the benchmark: scored within the phantoms' particle diameter."""
    return AlignParams(seed=trial, mask_diameter_px=PARTICLE_DIAMETER_PX)


def _error_deg(group: str, trial: int) -> float:
    volume, truth = recovery_trial(group, trial)
    g = point_group(group)
    result = align_symmetry(volume, g, _params(trial))
    return float(orientation_error_deg(result.rotation, truth, g))


@pytest.mark.parametrize(("group", "trial"), [("T", 0), ("I", 0), ("C2", 42), ("C2", 69)])
def test_sample_of_the_recovery_benchmark(group: str, trial: int) -> None:
    """C2 trial 42 missed by 2.6° before the polish (denovo3d.symmetry_polish), trial 69 by
    1.33° with the polish's earlier cross-filtered correlation over the shells with ρ >= 2/3."""
    torch.set_num_threads(min(2, torch.get_num_threads()))
    assert _error_deg(group, trial) < 1.0


@pytest.mark.slow
@pytest.mark.parametrize("group", RECOVERY_GROUPS)
def test_axes_within_one_degree_in_99_of_100_trials(group: str) -> None:
    errors = [_error_deg(group, trial) for trial in range(100)]
    misses = {t: round(e, 2) for t, e in enumerate(errors) if e >= 1.0}
    assert len(misses) <= 1, f"{group}: trials beyond 1°: {misses}"


@pytest.mark.slow
@pytest.mark.parametrize("group", [*RECOVERY_GROUPS, "C1", "C1 "])
def test_detection_picks_the_true_group_and_c1_for_asymmetric(group: str) -> None:
    trial = 1 if group == "C1 " else 0
    volume, _ = recovery_trial(group.strip(), trial)
    result = detect_symmetry(volume, params=_params(trial))
    assert result.verdict == group.strip(), result.table()
