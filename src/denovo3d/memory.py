"""The machine's memory: what is available (the default ``--max_memory``), the peak resident
set size of this process (benchmarks), and how the C allocator keeps freed blocks."""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import os
import resource
import sys

import torch

__all__ = [
    "WORKING_SET_BYTES",
    "Workspace",
    "available_bytes",
    "keep_freed_memory",
    "peak_rss_bytes",
]

# Temporaries of one step of the engine's loops over chunks: small enough to stay in the
# last-level cache and to be reused by the allocator (glibc maps larger blocks afresh and faults
# their pages in at every call: that cost more than the arithmetic).
WORKING_SET_BYTES = 1 << 25

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_MAX = 1 << 25  # the largest glibc accepts on 64-bit systems
_KEEP_BYTES = (1 << 31) - 1  # mallopt takes an int: keep up to 2 GiB free at the heap top


def keep_freed_memory() -> bool:
    """Ask glibc to serve blocks up to 32 MB from the heap and to keep up to 2 GiB of freed heap
    memory instead of handing it back to the system; returns whether it was applied (glibc only).

    By default glibc starts with a 128 kB mmap threshold that grows with use and trims the heap
    top as soon as 2x that is free: the engine's per-chunk temporaries were then mapped and
    their pages faulted in (and zeroed by the kernel) again at every step. Measured on a
    12-iteration job (300 particles, box 48, one thread): system time 34 -> 12 s of 135 s CPU,
    minor page faults 11.4 M -> 3.9 M, the same peak RSS (``benchmarks/bench_refine.py job``).
    Setting these parameters fixes the thresholds (glibc's dynamic adjustment stops), which is
    why both are set together. Blocks above 32 MB (a sub-batch of particles at box 64 is ~100
    MB) are still mapped afresh: the standard job spent 902 of 2,858 CPU s in the kernel.
    Serving those from the heap too (``M_MMAP_MAX`` 0) cut that to 128 s but raised its peak
    RSS from 7.0 to 10.7 GiB (heap fragmentation), outside the memory plan: not done; the
    largest recurring ones are reused instead (a :class:`Workspace` kept by ``refine.run``) or
    made by chunks under ``WORKING_SET_BYTES``: 66 s of 2,019 CPU s in the kernel since."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others: no mallopt
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX) == 1
    return ok and mallopt(_M_TRIM_THRESHOLD, _KEEP_BYTES) == 1


class Workspace:
    """Named buffers kept from call to call for temporaries above ``WORKING_SET_BYTES`` that
    recur (glibc maps such a block afresh every time and the kernel faults in and zeroes its
    pages again): :meth:`take` hands out views of a name's buffer, growing it when asked for
    more. Its owner (the refine loop) decides how long they live; the views of a name are valid
    until that name's next :meth:`take`."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def take(
        self,
        name: str,
        shapes: list[tuple[int, ...]],
        dtypes: list[torch.dtype],
        device: torch.device,
    ) -> list[torch.Tensor]:
        """Uninitialised tensors of ``shapes`` and ``dtypes``, back to back in buffer ``name``."""
        sizes = [math.prod(s) * d.itemsize for s, d in zip(shapes, dtypes, strict=True)]
        sizes = [-(-n // 64) * 64 for n in sizes]  # each view aligned as malloc would
        total = sum(sizes)
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < total or buf.device != torch.device(device):
            if buf is not None and buf.device == torch.device(device):
                # half again as much: a run's batches and boxes grow by small steps, and each
                # new buffer's pages are faulted in afresh (pages never touched cost nothing)
                total = max(total, buf.numel() + buf.numel() // 2)
            buf = self._buffers[name] = None  # the old buffer goes before the new one comes
            self._buffers[name] = torch.empty(total, dtype=torch.uint8, device=device)
        buf, views, start = self._buffers[name], [], 0
        for shape, dtype, size in zip(shapes, dtypes, sizes, strict=True):
            n = math.prod(shape) * dtype.itemsize
            views.append(buf[start : start + n].view(dtype).view(shape))
            start += size
        return views


def available_bytes() -> int:
    """``MemAvailable`` of ``/proc/meminfo`` (Linux), else the physical memory."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024
