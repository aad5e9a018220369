"""Options of a refine run, built once from the command line: :class:`RefineConfig` and the
VDAM schedules :class:`VdamSchedule` (relion-vdam-notes §1.1)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

__all__ = ["RefineConfig", "VdamSchedule"]


@dataclass(frozen=True)
class RefineConfig:
    """Everything a run needs (RELION flag names in comments)."""

    input_path: str  # --i / --ios
    output_root: str  # --o
    n_iter: int = 100  # --iter
    n_classes: int = 1  # --K
    particle_diameter_a: float = 200.0  # --particle_diameter
    flatten_solvent: bool = False  # --flatten_solvent
    zero_mask: bool = False  # --zero_mask
    non_negative: bool = False  # --non_negative (RELION's label promises it; we do it)
    healpix_order: int = 1  # --healpix_order (coarse; the fine pass is one order finer)
    offset_range_px: float = 6.0  # --offset_range
    offset_step_px: float = 2.0  # --offset_step
    tau2_fudge: float = 4.0  # --tau2_fudge
    mu: float = 0.9  # --mu
    ini_subset: int = -1  # --grad_ini_subset (-1: RELION's default)
    fin_subset: int = -1  # --grad_fin_subset
    stepsize: float = 0.5  # --grad_stepsize
    max_significant: int = -1  # --maxsig (-1: 100·K)
    adaptive_fraction: float = 0.999  # --adaptive_fraction
    incr_size: int = 10  # --incr_size
    class_inactivity_threshold: float = 0.0  # --class_inactivity_threshold (0: off)
    mask_edge_px: float = 5.0  # --maskedge
    perturb: float = 0.5  # --perturb
    sigma2_offset_a: float = 10.0  # --offset (initial prior width, Å)
    n_init_particles: int = 10  # --nr_parts_sigma2noise (particles per class for the start)
    random_seed: int = 0  # --random_seed
    write_iter: int = 10  # --grad_write_iter
    symmetry: str = "C1"  # --sym (run in C1; applied at the end)
    threads: int = 1  # --j
    gpu: str | None = None  # --gpu
    preread_images: bool = False  # --preread_images
    scratch_dir: str | None = None  # --scratch_dir
    tomograms_path: str | None = None  # --tomograms (RELION 5; handed on in the optimisation set)
    trajectories_path: str | None = None  # --trajectories (likewise)
    memory_budget_bytes: int = 8 << 30  # --max_memory (per process)
    sub_batch: int = 256  # particles loaded and searched at once (fewer if over the budget)
    command_line: str = ""

    @property
    def maxsig(self) -> int:
        return self.max_significant if self.max_significant > 0 else 100 * self.n_classes

    @property
    def cache_budget_bytes(self) -> int:
        """Half of the memory budget holds particles (the LRU cache of ``ParticleSet``)."""
        return self.memory_budget_bytes // 2

    @property
    def engine_budget_bytes(self) -> int:
        """An eighth bounds each large temporary of the E- and M-steps and each loaded chunk of
        particles (a few of them are alive at once)."""
        return self.memory_budget_bytes // 8

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class VdamSchedule:
    """Mini-batch size, step size and T per iteration ``it`` (1-based), as RELION's
    updateSubsetSize / updateStepSize / updateTau2Fudge for the 3D initial model."""

    n_iter: int
    n_particles: int
    n_classes: int
    batch_ini: int
    batch_fin: int
    n_ini: int
    n_mid: int
    n_fin: int
    stepsize: float = 0.5
    step_inflate: float = 1.8  # 0.9 / stepsize: the step goes 0.9 -> 0.5
    tau2_fudge: float = 4.0

    @classmethod
    def build(cls, cfg: RefineConfig, n_particles: int) -> VdamSchedule:
        ini_frac, fin_frac = 0.3, 0.2
        n_ini = int(cfg.n_iter * ini_frac)
        n_fin = int(cfg.n_iter * fin_frac)
        n_mid = max(0, cfg.n_iter - n_ini - n_fin)
        d = n_particles
        b_ini = cfg.ini_subset if cfg.ini_subset > 0 else int(max(min(0.005 * d, 5000), 200))
        b_fin = cfg.fin_subset if cfg.fin_subset > 0 else int(max(min(0.1 * d, 50000), 1000))
        return cls(
            n_iter=cfg.n_iter,
            n_particles=n_particles,
            n_classes=cfg.n_classes,
            batch_ini=b_ini,
            batch_fin=b_fin,
            n_ini=n_ini,
            n_mid=n_mid,
            n_fin=n_fin,
            stepsize=cfg.stepsize,
            step_inflate=0.9 / cfg.stepsize,
            tau2_fudge=cfg.tau2_fudge,
        )

    def batch_size(self, it: int) -> int:
        """Particles in mini-batch ``it``; all particles at the last iteration with K > 1."""
        if it < self.n_ini:
            b = self.batch_ini
        elif it < self.n_ini + self.n_mid:
            b = self.batch_ini + round(
                (it - self.n_ini) / self.n_mid * (self.batch_fin - self.batch_ini)
            )
        else:
            b = self.batch_fin
        if (it == self.n_iter and self.n_classes > 1) or b >= self.n_particles:
            return self.n_particles
        return b

    @staticmethod
    def _sigmoid(it: float, start: int, width: int) -> float:
        """RELION's ``1 / (10^((it − b − a/2)/(a/4)) + 1)``; a step at ``b`` if ``a`` is 0."""
        if width <= 0:
            return 1.0 if it < start else 0.0
        x = (it - start - width / 2) / (width / 4)
        return 0.0 if x > 300 else 1.0 / (math.pow(10.0, x) + 1.0)

    def step_size(self, it: int) -> float:
        q = self._sigmoid(it, self.n_ini, self.n_mid // 2)
        return self.step_inflate * self.stepsize * q + self.stepsize * (1 - q)

    def tau2(self, it: int) -> float:
        q = self._sigmoid(it, self.n_ini, self.n_mid // 4)
        return 1.0 * q + self.tau2_fudge * (1 - q)
