"""The machine's memory: what is available (the default ``--max_memory``) and the peak resident
set size of this process (benchmarks)."""

from __future__ import annotations

import os
import resource
import sys

__all__ = ["WORKING_SET_BYTES", "available_bytes", "peak_rss_bytes"]

# Temporaries of one step of the engine's loops over chunks: small enough to stay in the
# last-level cache and to be reused by the allocator (glibc maps larger blocks afresh and faults
# their pages in at every call: that cost more than the arithmetic).
WORKING_SET_BYTES = 1 << 25


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
