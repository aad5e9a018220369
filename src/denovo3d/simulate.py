"""Realistic synthetic cryo-ET data: tilt series of posed particles -> RELION pseudo-subtomograms.

Per particle p and tilt f (all tensors batched over a chunk of particles):

- pose: ``A_p`` (RELION's matrix, ``x_particle = A x_truth``) uniform on SO(3), origin ``o_p``
  (pixels) uniform in a ball; the particle's transform is
  ``F_p(k) = F_truth(A_pᵀ k) · exp(+2πi k·o_p / s)``, i.e. its centre sits at ``s/2 − o_p``:
  RELION centres a particle by shifting it by ``+rlnOrigin`` (``relion_reconstruct``,
  ``relion_refine``), and re-extraction re-centres at ``rlnCoordinate − rlnOrigin``. Proved by
  tests/test_relion_roundtrip.py: relion_reconstruct with the true poses gives our truth back
  (FSC ~1 to Nyquist); the opposite origin sign or the transposed rotation fail;
- tilt image (white particles; the raw image is the negative, and the writer's sign flip
  undoes it): ``X_pf(k2) = c_pf(k2) · F_p(R_fᵀ (k2, 0)) + n_pf(k2)``, with
  ``c_pf = CTF(defocus_pf) · dose_weight(pre-exposure_f)`` (:mod:`denovo3d.ctf`) and
  ``n_pf`` white Gaussian noise of variance σ² per real-space pixel;
- pseudo-subtomogram (``relion_tomo_subtomo``): slices ``c_pf · X_pf``, circle-cropped in real
  space, inserted by :class:`denovo3d.tilt_series.SliceInsertion`: ``D = Σ m c X``,
  ``C = Σ m c²``, ``M = Σ m``; the data file is ``irfftn(D)`` centred at ``s/2`` (so
  ``centred_rfft(data) == D`` with torch's unnormalised FFT; RELION's own files differ by a
  constant FFT normalisation), the weights file holds C and M;
- classic subtomogram (RELION 3.1): the slices ``X_pf`` inserted without premultiplication and
  divided by ``max(M, 1)``; its 3D CTF is ``Σ m c / max(M, 1)``, so ``data ≈ CTF3D · F_p``.

SNR: ``σ² = S̄ / snr``, where S̄ is the expected per-pixel variance (over the whole s×s box) of a
noise-free tilt image ``c·P``, averaged over uniformly random orientations, all tilts (with
their dose weights) and the defocus range. It is computed from the truth's radial power
spectrum, so it does not depend on the random draws.

Truth sampling: the truth is padded twice, pre-divided by the trilinear-interpolation
apodisation (sinc², as RELION's projector), and sampled trilinearly (:func:`sample_rfft`);
the slices are band-limited to the Nyquist radius ``|k| ≤ s/2``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from denovo3d.ctf import ctf_2d, dose_weight, rfft2_frequencies
from denovo3d.fourier import centred_irfft, centred_rfft, rfft_radius, sample_rfft
from denovo3d.geometry.euler import euler_to_matrix, matrix_to_euler, random_rotations
from denovo3d.tilt_series import SliceInsertion, TiltScheme, slice_frequencies, tilt_rotations

__all__ = [
    "ParticleDraws",
    "SimulatedChunk",
    "SimulationConfig",
    "Simulator",
    "draw_particles",
    "simulate_project",
]

_PAD = 2
_DOSE_CUTOFF = 0.01  # relion_tomo_subtomo --cutoff_fract
_CIRCLE_FALLOFF_PX = 5.0


@dataclass(frozen=True)
class SimulationConfig:
    """Everything that defines a simulated data set (lengths in Å, angles in degrees)."""

    n_particles: int = 1000
    box: int = 64
    pixel_size_a: float = 5.4
    snr: float | None = 0.1  # None: no noise
    tilt_min_deg: float = -60.0
    tilt_max_deg: float = 60.0
    tilt_step_deg: float = 3.0
    dose_per_tilt: float = 3.0  # e/Å² per tilt image
    defocus_range_a: tuple[float, float] = (20000.0, 50000.0)
    defocus_from_depth: bool = True  # per-tilt defocus follows the particle's depth
    voltage_kv: float = 300.0
    cs_mm: float = 2.7
    amplitude_contrast: float = 0.07
    apply_ctf: bool = True  # False: CTF = 1 (dose weighting still applies if asked)
    dose_weighting: bool = True
    circle_crop: bool = True  # RELION's default real-space crop of the 2D slices
    max_offset_a: float | None = None  # radius of the offset ball; default 3 pixels
    n_tomograms: int = 5
    tomogram_size_a: tuple[float, float, float] = (6000.0, 6000.0, 2000.0)
    binning: float = 1.0  # rlnTomoSubtomogramBinning: tilt-series pixel = pixel / binning
    classic: bool = False  # also write classic subtomograms with a 3D CTF
    float16: bool = False
    seed: int = 0
    chunk_size: int = 32

    @property
    def tilt_scheme(self) -> TiltScheme:
        return TiltScheme.dose_symmetric(
            self.tilt_min_deg, self.tilt_max_deg, self.tilt_step_deg, self.dose_per_tilt
        )

    @property
    def offset_radius_a(self) -> float:
        return 3.0 * self.pixel_size_a if self.max_offset_a is None else self.max_offset_a


@dataclass(frozen=True)
class ParticleDraws:
    """The random draws of all particles (true poses and where they sit)."""

    angles_deg: torch.Tensor  # (n, 3) rot, tilt, psi
    origins_a: torch.Tensor  # (n, 3) xyz, Å (rlnOriginX/Y/ZAngst)
    defocus_a: torch.Tensor  # (n,) defocus at 0° tilt (no astigmatism)
    tomogram: torch.Tensor  # (n,) int64, 0-based
    coordinates_px: torch.Tensor  # (n, 3) picked position, tilt-series pixels
    depth_a: torch.Tensor  # (n, 3) true centre − tomogram centre, Å
    noise_seeds: torch.Tensor  # (n,) int64


def draw_particles(config: SimulationConfig) -> ParticleDraws:
    """All random quantities, in one fixed order from ``config.seed`` (chunk-independent)."""
    n = config.n_particles
    gen = torch.Generator().manual_seed(config.seed)
    rot, tilt, psi = matrix_to_euler(random_rotations(n, gen))
    direction = torch.randn(n, 3, generator=gen, dtype=torch.float64)
    direction = direction / direction.norm(dim=1, keepdim=True)
    radius = config.offset_radius_a * torch.rand(n, 1, generator=gen, dtype=torch.float64) ** (
        1 / 3
    )
    lo, hi = config.defocus_range_a
    defocus = lo + (hi - lo) * torch.rand(n, generator=gen, dtype=torch.float64)
    tomogram = torch.arange(n) % max(1, min(config.n_tomograms, n))
    size = torch.tensor(config.tomogram_size_a, dtype=torch.float64)
    margin = torch.tensor([0.1, 0.1, 0.2], dtype=torch.float64)
    fraction = margin + (1 - 2 * margin) * torch.rand(n, 3, generator=gen, dtype=torch.float64)
    ts_pixel = config.pixel_size_a / config.binning
    coordinates = fraction * size / ts_pixel
    origins = direction * radius
    depth = coordinates * ts_pixel - origins - size / 2  # true centre = coordinate − origin
    seeds = torch.randint(0, 2**62, (n,), generator=gen)
    return ParticleDraws(
        torch.stack([rot, tilt, psi], 1), origins, defocus, tomogram, coordinates, depth, seeds
    )


@dataclass
class SimulatedChunk:
    """Simulated volumes of a chunk of particles (half grids ``(b, s, s, s//2+1)``)."""

    indices: torch.Tensor  # (b,) rows
    data: torch.Tensor  # D, complex64
    ctf2: torch.Tensor  # C, float32
    multiplicity: torch.Tensor  # M (s, s, s//2+1), shared
    classic_data: torch.Tensor | None = None  # complex64
    classic_ctf: torch.Tensor | None = None  # float32


def _gridding_corrected_padded_ft(volume: torch.Tensor) -> torch.Tensor:
    """Truth ``(s, s, s)`` -> centred rfft of the 2×-padded, sinc²-pre-corrected volume."""
    s = volume.shape[-1]
    big = _PAD * s
    r = (torch.arange(s, dtype=torch.float64) - s // 2) / big
    sinc2 = torch.special.sinc(r) ** 2
    corrected = volume.double() / (sinc2[:, None, None] * sinc2[None, :, None] * sinc2)
    padded = torch.zeros(big, big, big, dtype=torch.float64)
    lo = big // 2 - s // 2
    padded[lo : lo + s, lo : lo + s, lo : lo + s] = corrected
    return centred_rfft(padded).to(torch.complex64)


def _circle_mask(box: int) -> torch.Tensor:
    """RELION's ``cropCircle`` mask (radius s/2, 5-pixel cosine fall-off), ``(s, s)``."""
    c = torch.arange(box, dtype=torch.float64) - box // 2
    r = torch.sqrt(c[:, None] ** 2 + c[None, :] ** 2)
    edge = box // 2
    inner = edge - _CIRCLE_FALLOFF_PX
    fall = 0.5 - 0.5 * torch.cos(math.pi * (edge - r) / _CIRCLE_FALLOFF_PX)
    return torch.where(r < inner, torch.ones_like(r), torch.where(r < edge, fall, 0 * r)).float()


def _real(ft: torch.Tensor) -> torch.Tensor:
    """The half grid of the real volume it stands for (drops the non-Hermitian part that the
    insertion leaves on the kx = s/2 plane), so that ``centred_rfft(file) == data`` exactly."""
    return centred_rfft(centred_irfft(ft))


class Simulator:
    """Simulates particles of one truth map under one :class:`SimulationConfig`."""

    def __init__(self, truth: torch.Tensor, config: SimulationConfig) -> None:
        s = config.box
        if tuple(truth.shape) != (s, s, s):
            raise ValueError(f"truth has shape {tuple(truth.shape)}, expected {(s, s, s)}")
        self.config = config
        self.truth = truth.float()
        self.truth_ft = _gridding_corrected_padded_ft(truth)
        self.scheme = config.tilt_scheme
        self.rotations = tilt_rotations(self.scheme.tilt_angles_deg)  # (f, 3, 3)
        self.slice_k = slice_frequencies(s, self.rotations).float()  # (f, s, h, 3)
        # band limit at Nyquist radius: the 2D corners would read wrapped frequencies
        self.band = (self.slice_k.norm(dim=-1) <= s / 2).float()  # (f, s, h)
        freq = rfft2_frequencies(s, config.pixel_size_a)  # (s, h, 2) 1/Å
        self.freq = freq
        k = freq.norm(dim=-1)
        exposure = self.scheme.pre_exposure_e_per_a2[:, None, None]
        self.dose = dose_weight(k, exposure) if config.dose_weighting else torch.ones_like(k)
        self.dose = self.dose.expand(self.scheme.n_tilts, -1, -1)  # (f, s, h)
        ky = torch.fft.fftfreq(s, 1.0 / s, dtype=torch.float64)[:, None]
        kx = torch.arange(s // 2 + 1, dtype=torch.float64)[None, :]
        in_circle = (kx <= torch.sqrt((s * s / 4 - ky * ky).clamp_min(0))) & ~((kx == 0) & (ky < 0))
        inserted = in_circle & (self.dose > _DOSE_CUTOFF)
        self.insertion = SliceInsertion(s, self.rotations, inserted)
        self.mask = _circle_mask(s) if config.circle_crop else None
        self.noise_sigma = self._noise_sigma()

    # ---- per-slice physics ------------------------------------------------------------------
    def ctf(self, defocus_a: torch.Tensor, depth_a: torch.Tensor) -> torch.Tensor:
        """``c = CTF · dose weight`` of each particle's tilts ``(b, f, s, s//2+1)`` float32."""
        cfg = self.config
        if cfg.defocus_from_depth:  # change of the particle's depth along the beam with tilt
            z_f = torch.einsum("fj,bj->bf", self.rotations[:, 2, :], depth_a)
            defocus = defocus_a[:, None] + z_f - depth_a[:, 2:3]
        else:
            defocus = defocus_a[:, None].expand(-1, self.scheme.n_tilts)
        if not cfg.apply_ctf:
            return self.dose.float().expand(defocus.shape[0], -1, -1, -1)
        d = defocus[..., None, None]
        ctf = ctf_2d(self.freq, d, d, 0.0, cfg.voltage_kv, cfg.cs_mm, cfg.amplitude_contrast)
        return (ctf * self.dose).float()

    def particle_slices(self, angles_deg: torch.Tensor, origins_a: torch.Tensor) -> torch.Tensor:
        """Noise-free ``F_p(R_fᵀ(k2, 0))`` of each tilt, ``(b, f, s, s//2+1)`` complex64."""
        s = self.config.box
        A = euler_to_matrix(*angles_deg.T).float()  # (b, 3, 3)
        coords = torch.einsum("bji,fyxj->bfyxi", A, self.slice_k)  # Aᵀ k
        values = sample_rfft(self.truth_ft, _PAD * coords)
        origin_px = (origins_a / self.config.pixel_size_a).float()
        phase = (2 * math.pi / s) * torch.einsum("fyxj,bj->bfyx", self.slice_k, origin_px)
        return values * torch.polar(self.band.expand_as(phase), phase)

    def noise(self, seeds: torch.Tensor) -> torch.Tensor:
        """White noise of σ per pixel in every tilt image, ``(b, f, s, s//2+1)`` complex64."""
        s, f = self.config.box, self.scheme.n_tilts
        images = torch.stack(
            [
                torch.randn(f, s, s, generator=torch.Generator().manual_seed(int(seed)))
                for seed in seeds
            ]
        )
        return torch.fft.rfft2(images * self.noise_sigma)

    def _crop(self, slices: torch.Tensor) -> torch.Tensor:
        """RELION's real-space circle crop of 2D slices (mean outside subtracted, soft edge)."""
        if self.mask is None:
            return slices
        s = self.config.box
        images = torch.fft.fftshift(torch.fft.irfft2(slices, s=(s, s)), dim=(-2, -1))
        outside = self.mask == 0
        mean_out = images[..., outside].mean(-1)[..., None, None]
        images = (images - mean_out) * self.mask
        return torch.fft.rfft2(torch.fft.ifftshift(images, dim=(-2, -1)))

    def _noise_sigma(self) -> float:
        """σ per pixel from the configured SNR (module docstring); 0 without noise."""
        cfg = self.config
        if cfg.snr is None:
            return 0.0
        if cfg.snr <= 0:
            raise ValueError(f"snr must be positive, got {cfg.snr}")
        s = cfg.box
        power = centred_rfft(self.truth.double()).abs() ** 2
        shells = torch.round(rfft_radius(s)).long().reshape(-1)
        n_shells = s // 2 + 2
        keep = shells < n_shells
        values = power.reshape(-1)[keep]
        total = torch.zeros(n_shells, dtype=torch.float64).index_add_(0, shells[keep], values)
        count = torch.zeros(n_shells, dtype=torch.float64).index_add_(
            0, shells[keep], torch.ones_like(values)
        )
        radial = total / count.clamp_min(1)
        r = self.freq.norm(dim=-1) * cfg.pixel_size_a * s  # (s, h) radius in pixels
        lo = r.floor().long().clamp(max=n_shells - 2)
        frac = (r - lo).clamp(0, 1)
        ps2d = radial[lo] * (1 - frac) + radial[lo + 1] * frac
        defoci = torch.linspace(*cfg.defocus_range_a, 16, dtype=torch.float64)
        c2 = torch.zeros_like(r)
        for d in defoci:  # 16 defoci x all tilts
            c = self.ctf(d.reshape(1), torch.zeros(1, 3, dtype=torch.float64)).double()
            c2 += (c[0] ** 2).mean(0) / len(defoci)
        weight = torch.full_like(r, 2.0)
        weight[:, 0] = 1.0
        weight[:, -1] = 1.0
        weight[0, 0] = 0.0  # the mean does not count in the variance
        weight = weight * (r <= s / 2)  # the slices are band-limited at Nyquist
        signal = float((weight * ps2d * c2).sum()) / s**4
        return math.sqrt(signal / cfg.snr)

    # ---- particles --------------------------------------------------------------------------
    def simulate(self, draws: ParticleDraws, rows: torch.Tensor) -> SimulatedChunk:
        """Pseudo-subtomograms (and classic ones if configured) of particles ``rows``."""
        c = self.ctf(draws.defocus_a[rows], draws.depth_a[rows])
        signal = self.particle_slices(draws.angles_deg[rows], draws.origins_a[rows])
        images = c * signal
        if self.noise_sigma > 0:
            images = images + self.noise(draws.noise_seeds[rows])
        data = _real(self.insertion.insert(self._crop(c * images)))
        ctf2 = self.insertion.insert_weights(c * c)
        chunk = SimulatedChunk(rows, data, ctf2, self.insertion.multiplicity)
        if self.config.classic:
            norm = self.insertion.multiplicity.clamp_min(1.0)
            empty = self.insertion.multiplicity < 0.01
            classic = self.insertion.insert(self._crop(images)) / norm
            ctf3d = self.insertion.insert_weights(c) / norm
            chunk.classic_data = _real(classic.masked_fill(empty, 0))
            chunk.classic_ctf = ctf3d.masked_fill(empty, 0)
        return chunk

    def chunks(self, draws: ParticleDraws) -> Iterator[SimulatedChunk]:
        """All particles, ``config.chunk_size`` at a time."""
        n = draws.angles_deg.shape[0]
        for start in range(0, n, self.config.chunk_size):
            yield self.simulate(draws, torch.arange(start, min(n, start + self.config.chunk_size)))


def simulate_project(
    out_dir: str | Path,
    truth: torch.Tensor,
    config: SimulationConfig,
    source: str = "",
) -> dict[str, Path]:
    """Simulate ``config.n_particles`` particles of ``truth`` ``(s, s, s)`` into a project.

    Writes under ``out_dir``: particles.star, tomograms.star, optimisation_set.star,
    Subtomograms/<tomo>/<n>_data.mrc and _weights.mrc (and _subtomo.mrc/_ctf.mrc plus
    particles_classic.star with ``config.classic``), truth.mrc and truth_particles.star (the
    true poses). Returns the paths of the STAR files and of the truth map.
    """
    from denovo3d.io.simulated_project import ProjectWriter

    simulator = Simulator(truth, config)
    draws = draw_particles(config)
    writer = ProjectWriter(Path(out_dir), config, simulator.scheme, draws, source)
    writer.write_truth(simulator.truth, simulator.noise_sigma)
    for chunk in simulator.chunks(draws):
        writer.write_chunk(chunk)
    return writer.finish()
