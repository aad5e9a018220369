"""The memory helpers: glibc's allocator settings, the machine's memory."""

from __future__ import annotations

import platform
import sys

import pytest

from denovo3d import memory


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
    reason="mallopt is glibc's",
)
def test_glibc_accepts_the_allocator_settings() -> None:
    """Both mallopt calls succeed (mallopt returns 0 for a parameter or value it rejects, e.g.
    an mmap threshold above 32 MB)."""
    assert memory.keep_freed_memory()


def test_available_and_peak_memory_are_plausible() -> None:
    assert memory.available_bytes() > 1 << 26
    assert memory.peak_rss_bytes() > 1 << 20
