"""VDAM: RELION's gradient update of the references (relion-vdam-notes §1.1, §1.3, §1.4).

Schedules (iterations ``it`` from 1 to N) live in :class:`denovo3d.config.VdamSchedule`; this
module holds the update itself, pure tensor code on half grids ``(.., S, S, S//2+1)``:

1. ``g_h = D_h / max(W_h, floor)`` per pseudo half-set (``floor`` is RELION's ``max(1, W)`` in
   our unnormalised FFT: ``1/S⁶``);
2. first moments ``m_h ← g_h`` (first use) else ``0.9·m_h + 0.1·g_h``;
3. second moment ``v ← 0.999·v + 0.001·|g_B − g_A|² / (|(g_A + g_B)/2|² + ε)`` (starts at 1);
4. ``g = (m_A + m_B)/2 / sqrt(v)``, shell noise ``N = mean |m_A − m_B|``;
5. ``snr = 2·T·mean|F| / N``, ``fsc = snr/(1+snr)``, ``F ← F + s·(fsc·g − (1 − fsc)·F)`` inside
   the current radius, 0 outside.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from denovo3d.fourier import rfft_radius

__all__ = [
    "Moments",
    "current_size_from_ssnr",
    "reseed_empty_class",
    "shell_table",
    "ssnr_map",
    "vdam_update",
]

MOMENT1 = 0.9
MOMENT2 = 0.999


@dataclass
class Moments:
    """``m1 (K, 2, S, S, S//2+1)`` complex (zero until first used), ``m2 (K, S, S, S//2+1)``
    real (starts at 1)."""

    m1: torch.Tensor
    m2: torch.Tensor

    @classmethod
    def initial(cls, K: int, box: int, dtype: torch.dtype, device: torch.device) -> Moments:
        shape = (K, box, box, box // 2 + 1)
        m1 = torch.zeros((K, 2, *shape[1:]), dtype=dtype, device=device)
        return cls(m1, torch.ones(shape, dtype=m1.real.dtype, device=device))


def shell_table(box: int, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """Shell ``round(|k|)`` of every half-grid voxel ``(S, S, S//2+1)`` and ``|k|``."""
    r = rfft_radius(box, device)
    return torch.round(r).long(), r


def _shell_mean(values: torch.Tensor, shell: torch.Tensor, n: int) -> torch.Tensor:
    """Mean over each shell ``< n`` of ``values (K, S, S, S//2+1)`` -> ``(K, n)``."""
    flat_shell = shell.reshape(-1)
    keep = flat_shell < n
    idx = flat_shell[keep]
    vals = values.reshape(values.shape[0], -1)[:, keep].double()
    total = vals.new_zeros((values.shape[0], n)).index_add_(1, idx, vals)
    count = vals.new_zeros(n).index_add_(0, idx, torch.ones_like(idx, dtype=vals.dtype))
    return total / count.clamp_min(1)


def vdam_update(
    refs_ft: torch.Tensor,
    data: torch.Tensor,
    weight: torch.Tensor,
    moments: Moments,
    step: torch.Tensor,
    tau2_fudge: float,
    radius: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One VDAM step for all classes.

    ``refs_ft (K, S, S, S//2+1)`` complex; ``data`` ``(K, 2, ...)`` and ``weight`` accumulators
    (Friedel-completed); ``moments`` updated in place; ``step (K,)`` per-class step size;
    ``radius`` in frequency pixels. Returns the new ``refs_ft`` and the estimated ``fsc (K, n)``.
    """
    box = refs_ft.shape[-2]
    n_shells = box // 2 + 1
    shell, r = shell_table(box, refs_ft.device)
    inside = r < radius
    floor = 1.0 / float(box) ** 6
    g = data / weight.clamp_min(floor)
    g = g * inside
    first = ~(moments.m1.abs().amax(dim=(-3, -2, -1), keepdim=True) > 0)
    moments.m1 = torch.where(first, g, MOMENT1 * moments.m1 + (1 - MOMENT1) * g)
    g_a, g_b = g[:, 0], g[:, 1]
    mean_sq = ((g_a + g_b) / 2).abs() ** 2
    ratio = (g_b - g_a).abs() ** 2 / (mean_sq + _eps(mean_sq))
    moments.m2 = torch.where(inside, MOMENT2 * moments.m2 + (1 - MOMENT2) * ratio, moments.m2)
    m_a, m_b = moments.m1[:, 0], moments.m1[:, 1]
    direction = ((m_a + m_b) / 2) / moments.m2.sqrt()
    noise = _shell_mean((m_a - m_b).abs(), shell, n_shells)  # (K, n)
    amplitude = _shell_mean(refs_ft.abs(), shell, n_shells)
    snr = torch.where(noise > 0, 2 * tau2_fudge * amplitude / noise.clamp_min(1e-300), 0.0)
    fsc = (snr / (1 + snr)).clamp(0, 1)
    fsc_vox = fsc.to(refs_ft.real.dtype)[:, shell.clamp(max=n_shells - 1)]
    s = step.to(refs_ft.real.dtype)[:, None, None, None]
    new = refs_ft + s * (fsc_vox * direction - (1 - fsc_vox) * refs_ft)
    return new * inside, fsc


def _eps(mean_sq: torch.Tensor) -> float:
    """RELION's 1e-12 guard, scaled to our units (a tiny fraction of the mean power)."""
    return 1e-12 * float(mean_sq.mean()) + 1e-30


def ssnr_map(weight_half_a: torch.Tensor, refs_ft: torch.Tensor, tau2_fudge: float) -> torch.Tensor:
    """RELION's SSNR_MAP per shell ``(K, n)``: ``mean_shell(W_A) · T · tau2`` with
    ``tau2 = mean_shell |F|² / 2`` (per real component, like σ²)."""
    box = refs_ft.shape[-2]
    shell, _ = shell_table(box, refs_ft.device)
    n = box // 2 + 1
    tau2 = _shell_mean(refs_ft.abs() ** 2, shell, n) / 2
    return _shell_mean(weight_half_a, shell, n) * tau2_fudge * tau2


def current_size_from_ssnr(ssnr: torch.Tensor, box: int, incr_size: int = 10) -> int:
    """Next current size: ``2·(maxres + incr)`` capped at ``box``, where ``maxres`` is the last
    shell before SSNR first drops below 1 (at least 5), over the best class. ``ssnr (K, n)``."""
    best = 5
    for row in ssnr.detach().cpu():
        values = row.tolist()
        maxres = len(values) - 1
        for i in range(1, len(values)):
            if values[i] < 1:
                maxres = i - 1
                break
        best = max(best, maxres)
    return int(min(box, 2 * (best + incr_size)))


def reseed_empty_class(
    refs: torch.Tensor, moments: Moments, pdf_class: torch.Tensor, threshold: float
) -> int | None:
    """RELION's class re-seeding (notes §1.6), in place: if the smallest class holds less than
    ``threshold / K`` of the particles, copy the largest class into it (reference, moments,
    fraction shared), with its half-A first moment scaled by 0.9 so the two drift apart.

    RELION picks the source by its gradient activity; we take the largest class (the one the
    data pull on hardest). Returns the re-seeded class index, or None.
    """
    K = refs.shape[0]
    if K < 2 or threshold <= 0:
        return None
    j, src = int(pdf_class.argmin()), int(pdf_class.argmax())
    if float(pdf_class[j]) >= threshold / K or j == src:
        return None
    refs[j] = refs[src]
    moments.m1[j] = moments.m1[src]
    moments.m1[j, 0] *= 0.9
    moments.m2[j] = moments.m2[src]
    half = pdf_class[src] / 2
    pdf_class[j], pdf_class[src] = half, half
    pdf_class /= pdf_class.sum()
    return j
