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


def test_workspace_reuses_its_buffer_and_grows_when_asked_for_more() -> None:
    """Views of the right shapes and types, back to back without overlap; a second request of
    no more bytes gets the same memory (no new mapping), a larger one a larger buffer; another
    name, another buffer."""
    import torch

    ws = memory.Workspace()
    cpu = torch.device("cpu")
    a, b = ws.take("x", [(3, 5), (7,)], [torch.complex64, torch.float32], cpu)
    assert a.shape == (3, 5) and a.dtype == torch.complex64 and a.is_contiguous()
    assert b.shape == (7,) and b.dtype == torch.float32
    assert b.data_ptr() >= a.data_ptr() + a.numel() * a.element_size()
    (c,) = ws.take("x", [(2, 5)], [torch.complex64], cpu)
    assert c.data_ptr() == a.data_ptr()
    (other,) = ws.take("y", [(2, 5)], [torch.complex64], cpu)
    assert other.data_ptr() != a.data_ptr()
    (d,) = ws.take("x", [(1000,)], [torch.float64], cpu)
    assert d.numel() == 1000 and d.untyped_storage().nbytes() >= 8000


def test_workspace_grows_by_half_again_so_small_growth_keeps_the_buffer() -> None:
    """A run's batches grow by small steps: a request a little larger than the buffer gets half
    again as much, and the next small growth reuses it (no new mapping to fault in)."""
    import torch

    ws = memory.Workspace()
    cpu = torch.device("cpu")
    (a,) = ws.take("x", [(1000,)], [torch.float32], cpu)
    (b,) = ws.take("x", [(1100,)], [torch.float32], cpu)
    assert b.data_ptr() != a.data_ptr() and b.untyped_storage().nbytes() >= 6000
    (c,) = ws.take("x", [(1400,)], [torch.float32], cpu)
    assert c.data_ptr() == b.data_ptr()
    (d,) = ws.take("x", [(5000,)], [torch.float32], cpu)  # a large step: exactly what is asked
    assert 20000 <= d.untyped_storage().nbytes() < 21000
