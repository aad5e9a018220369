"""Data parallelism over ranks with ``torch.distributed``: each rank takes a share of every
mini-batch, the M-step sums are all-reduced, and one rank writes.

Launch (one process per rank; ``torchrun`` or SLURM's ``srun`` set the environment):

- ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (torchrun), else ``SLURM_PROCID``,
  ``SLURM_STEP_NUM_TASKS``, ``SLURM_LOCALID`` (srun); ``MASTER_ADDR`` / ``MASTER_PORT`` for
  the rendezvous;
- backend ``gloo`` on CPU, ``nccl`` on CUDA (one GPU per rank: ``LOCAL_RANK`` picks the
  ``--gpu`` id, or GPU ``LOCAL_RANK`` of those visible).

What a run does with them (:mod:`denovo3d.refine`):

- every rank draws the same mini-batch (generators seeded by ``(random_seed, iteration)``) and
  searches its contiguous share of it (:func:`share`);
- the :class:`~denovo3d.engine.maximization.Accumulators` and the scalar sums (max. posterior,
  log-likelihood) are all-reduced (:func:`all_reduce_accumulators`, :func:`all_reduce_sums`),
  so every rank makes the same VDAM update from the same sums; the new state is then broadcast
  from rank 0 (:func:`broadcast_state`), so that no rank drifts by a rounding difference
  (e.g. CUDA's atomic scatter-adds);
- the poses each rank found are all-gathered (:func:`gather_poses`): every rank ends an
  iteration with the same state, and rank 0 (:func:`Ranks.is_writer`) writes the outputs and the
  checkpoint;
- work that may fail on one rank only (reading its share of particles, rank 0's writes) runs
  inside :func:`together`: the ranks then agree whether any of them failed, and all stop with
  that rank's message, instead of the others meeting a closed connection in the next
  collective (or waiting there, under a launcher that does not kill them).

With one process (no environment, or ``WORLD_SIZE=1``) every function here is a no-op.
"""

from __future__ import annotations

import atexit
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch
import torch.distributed as dist

from denovo3d.errors import InputError

__all__ = [
    "SINGLE",
    "Ranks",
    "all_reduce_accumulators",
    "all_reduce_sums",
    "broadcast_state",
    "from_env",
    "gather_poses",
    "local_leader_first",
    "local_world_size",
    "setup",
    "share",
    "together",
]


_CPU = torch.device("cpu")
T = TypeVar("T")


@dataclass(frozen=True)
class Ranks:
    """Where this process stands: ``rank`` of ``world_size``, ``local_rank`` on its node, and
    the ``device`` collectives run on (CPU for gloo, this rank's GPU for NCCL)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = _CPU

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_writer(self) -> bool:
        """Only rank 0 writes outputs and checkpoints."""
        return self.rank == 0


SINGLE = Ranks()


def _env_int(environ: Mapping[str, str], *names: str, default: int) -> int:
    for name in names:
        if environ.get(name, "") != "":
            return int(environ[name])
    return default


def from_env(environ: Mapping[str, str] | None = None) -> Ranks:
    """Rank, world size and local rank from torchrun's variables, else those ``srun`` sets for
    the tasks of a step (``SLURM_STEP_NUM_TASKS``: a batch script itself, which also carries
    ``SLURM_NTASKS`` and ``SLURM_PROCID``, is one process), else a single process."""
    env = os.environ if environ is None else environ
    if env.get("WORLD_SIZE", "") == "" and env.get("SLURM_STEP_NUM_TASKS", "") == "":
        return SINGLE
    world = _env_int(env, "WORLD_SIZE", "SLURM_STEP_NUM_TASKS", default=1)
    rank = _env_int(env, "RANK", "SLURM_PROCID", default=0)
    local = _env_int(env, "LOCAL_RANK", "SLURM_LOCALID", default=0)
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside a world of {world} processes")
    return Ranks(rank, world, local)


def local_world_size(environ: Mapping[str, str] | None = None) -> int:
    """Processes on this node (they share its memory): torchrun's ``LOCAL_WORLD_SIZE``, else
    srun's ``SLURM_STEP_TASKS_PER_NODE`` (``"4"`` or ``"4(x2)"``), else 1."""
    env = os.environ if environ is None else environ
    if env.get("LOCAL_WORLD_SIZE", "") != "":
        return max(1, int(env["LOCAL_WORLD_SIZE"]))
    match = re.match(r"\d+", env.get("SLURM_STEP_TASKS_PER_NODE", ""))
    return max(1, int(match.group())) if match else 1


def _rank_device(device: torch.device, gpu_ids: str | None, local_rank: int) -> torch.device:
    """This rank's GPU: the ``local_rank``-th of the ``--gpu`` ids (``"0,1"``), else of the
    visible GPUs; CPU stays CPU."""
    if device.type != "cuda":
        return device
    ids = [g.split(":")[0].strip() for g in (gpu_ids or "").split(",") if g.strip()]
    if len(ids) > 1:
        return torch.device(f"cuda:{int(ids[local_rank % len(ids)])}")
    return torch.device(f"cuda:{local_rank % torch.cuda.device_count()}")


def setup(device: torch.device, gpu_ids: str | None = None) -> tuple[Ranks, torch.device]:
    """Join the process group named by the environment (if more than one process): gloo on
    CPU, NCCL on CUDA. Returns the ranks and this rank's compute device."""
    ranks = from_env()
    if not ranks.active:
        return SINGLE, device
    device = _rank_device(device, gpu_ids, ranks.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ:  # srun without torchrun: one node only
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", "29500")
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend, rank=ranks.rank, world_size=ranks.world_size, **kwargs)
        atexit.register(_destroy)
    return Ranks(ranks.rank, ranks.world_size, ranks.local_rank, device), device


def _destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def local_leader_first(ranks: Ranks, work: Callable[[], T]) -> T:
    """``work()`` on local rank 0 first, then (after a barrier) on the other ranks: e.g. one
    process per node writes the scratch copy of the particles, the others then find it."""
    if not ranks.active:
        return work()
    result = work() if ranks.local_rank == 0 else None
    dist.barrier()
    return work() if ranks.local_rank != 0 else result


@contextmanager
def together(ranks: Ranks) -> Iterator[None]:
    """Run a block that may fail on some ranks only; at its end the ranks agree (one small
    all-reduce) and, if any failed, every rank raises: the failed rank its own exception, the
    others an :class:`~denovo3d.errors.InputError` (bad input) or a ``RuntimeError`` naming the
    first failed rank and its message, so rank 0 reports it and writes the failure marker."""
    if not ranks.active:
        yield
        return
    try:
        yield
    except Exception as error:  # re-raised by _agree, once the other ranks know
        _agree(error, ranks)
        raise
    _agree(None, ranks)


def _agree(error: Exception | None, ranks: Ranks) -> None:
    failed = all_reduce_sums([float(error is not None)], ranks)[0]
    if failed == 0:
        return
    mine = None if error is None else (isinstance(error, InputError), str(error))
    reports: list[tuple[bool, str] | None] = [None] * ranks.world_size
    dist.all_gather_object(reports, mine)
    if error is not None:
        raise error
    rank, (bad_input, message) = next((r, m) for r, m in enumerate(reports) if m is not None)
    if bad_input:
        raise InputError(None, f"rank {rank}: {message}")
    raise RuntimeError(f"rank {rank} failed: {message}")


def share(rows: np.ndarray, ranks: Ranks) -> np.ndarray:
    """This rank's contiguous share of ``rows`` (sizes differ by at most one)."""
    lo, hi = _shares(len(rows), ranks)[ranks.rank]
    return rows[lo:hi]


def _shares(n: int, ranks: Ranks) -> list[tuple[int, int]]:
    w = ranks.world_size
    return [(r * n // w, (r + 1) * n // w) for r in range(w)]


def _in_place(
    tensor: torch.Tensor, ranks: Ranks, collective: Callable[[torch.Tensor], None]
) -> None:
    """Run ``collective`` on ``tensor`` in place (complex as real pairs), through a copy on the
    collective device when the tensor lives elsewhere."""
    flat = torch.view_as_real(tensor) if tensor.is_complex() else tensor
    if flat.device == ranks.device:
        collective(flat)
        return
    moved = flat.to(ranks.device)
    collective(moved)
    flat.copy_(moved)


def _all_reduce_(tensor: torch.Tensor, ranks: Ranks) -> None:
    """Sum ``tensor`` over the ranks in place."""
    _in_place(tensor, ranks, dist.all_reduce)


def _broadcast_(tensor: torch.Tensor, ranks: Ranks) -> None:
    """Rank 0's ``tensor`` to every rank, in place."""
    _in_place(tensor, ranks, lambda t: dist.broadcast(t, src=0))


def all_reduce_accumulators(acc, ranks: Ranks) -> None:
    """Sum the M-step :class:`~denovo3d.engine.maximization.Accumulators` over the ranks."""
    if not ranks.active:
        return
    for tensor in (
        acc.data,
        acc.weight,
        acc.sigma2_num,
        acc.sigma2_den,
        acc.class_weight,
        acc.offset_sq,
    ):
        _all_reduce_(tensor, ranks)
    acc.n_particles = int(all_reduce_sums([acc.n_particles], ranks)[0])


def all_reduce_sums(values: Sequence[float], ranks: Ranks) -> list[float]:
    """Scalar sums over the ranks (float64)."""
    if not ranks.active:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=ranks.device)
    dist.all_reduce(t)
    return t.cpu().tolist()


def gather_poses(poses: dict[str, np.ndarray], rows: np.ndarray, ranks: Ranks) -> None:
    """After each rank recorded the poses of its :func:`share` of ``rows`` in ``poses``
    (per-particle arrays, first axis the particle), give every rank all of them, in place."""
    if not ranks.active:
        return
    bounds = _shares(len(rows), ranks)
    lo, hi = bounds[ranks.rank]
    width = max(hi - lo for lo, hi in bounds)
    names = sorted(poses)
    columns = [
        np.asarray(poses[k][rows[lo:hi]], dtype=np.float64).reshape(hi - lo, -1) for k in names
    ]
    sizes = [c.shape[1] for c in columns]
    mine = np.zeros((width, sum(sizes)))
    mine[: hi - lo] = np.concatenate(columns, axis=1) if columns else mine[: hi - lo]
    local = torch.from_numpy(mine).to(ranks.device)
    everyone = [torch.empty_like(local) for _ in range(ranks.world_size)]
    dist.all_gather(everyone, local)  # float64: exact for the integer columns too
    for r, (a, b) in enumerate(bounds):
        if r == ranks.rank or b == a:
            continue
        block = everyone[r][: b - a].cpu().numpy()
        col = 0
        for name, size in zip(names, sizes, strict=True):
            target = poses[name]
            values = block[:, col : col + size].reshape((b - a, *target.shape[1:]))
            target[rows[a:b]] = values.astype(target.dtype)
            col += size


def broadcast_state(state, ranks: Ranks) -> None:
    """Rank 0's references, moments, noise and priors to every rank (in place)."""
    if not ranks.active:
        return
    for tensor in (
        state.refs,
        state.moments.m1,
        state.moments.m2,
        state.sigma2,
        state.pdf_class,
        state.fsc,
        state.ssnr,
    ):
        _broadcast_(tensor, ranks)
    scalars = torch.tensor(
        [state.sigma2_offset_px, state.current_size, state.average_pmax, state.log_likelihood],
        dtype=torch.float64,
        device=ranks.device,
    )
    dist.broadcast(scalars, src=0)
    offset, size, pmax, loglik = scalars.cpu().tolist()
    state.sigma2_offset_px, state.current_size = offset, int(size)
    state.average_pmax, state.log_likelihood = pmax, loglik
