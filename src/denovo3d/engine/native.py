"""The fused CPU kernels of :func:`denovo3d.engine.projector.rotate`,
:func:`~denovo3d.engine.projector.splat` and the E-step's fine pass, compiled at first use.

``projector_native.cpp`` (shipped next to this module) is built once with
:func:`torch.utils.cpp_extension.load_inline` into torch's extension cache
(``$TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``) and registers
``torch.ops.denovo3d.rotate``, ``torch.ops.denovo3d.splat`` and ``torch.ops.denovo3d.fine_scores``
(the E-step's fine pass, :mod:`.expectation`). The build directory is named after a hash of the
source and of the torch version, so an upgrade of either builds afresh and never loads a stale
library; torch's loader holds a file lock there, so processes that start together build it once (a
lock left by a process killed while building is removed after ten minutes). Where it cannot be built
(no compiler, no ninja, any error) one :class:`RuntimeWarning` says so and :func:`load` returns
``None``: the projector keeps its pure-torch paths (several times slower on the CPU; the paths CUDA
always takes).
``DENOVO3D_NATIVE=0`` disables the kernels.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

__all__ = ["enabled", "failure", "load", "load_fine_scores", "load_splat"]

_SOURCE = Path(__file__).with_name("projector_native.cpp")
_lock = threading.Lock()
_op: Callable[..., None] | None = None
_tried = False
_failure: str | None = None


def enabled() -> bool:
    """False when ``DENOVO3D_NATIVE=0`` asks for the pure-torch projector."""
    return os.environ.get("DENOVO3D_NATIVE", "1").strip() != "0"


def failure() -> str | None:
    """Why the kernel could not be built (after :func:`load` returned ``None``), else ``None``."""
    return _failure


# a build takes seconds: a lock this old was left by a process killed while building (SIGKILL,
# SIGTERM), and torch's loader would wait for it forever
_STALE_LOCK_S = 600.0


def _await_build_lock(name: str, stale_s: float = _STALE_LOCK_S, poll_s: float = 0.5) -> None:
    """Wait while another process holds the build lock of extension ``name``, and remove the lock
    once it is ``stale_s`` old (its holder died); then torch's loader takes over."""
    try:
        from torch.utils.cpp_extension import _get_build_directory

        lock = Path(_get_build_directory(name, verbose=False)) / "lock"
    except (ImportError, OSError):
        return  # a torch without this helper: its loader decides
    while True:
        try:
            age = time.time() - lock.stat().st_mtime
        except OSError:
            return  # no lock (any more)
        if age > stale_s:
            lock.unlink(missing_ok=True)
            return
        time.sleep(poll_s)


def _build() -> Callable[..., None]:
    from torch.utils.cpp_extension import load_inline

    source = _SOURCE.read_text()
    # at::parallel_for is a template: compiled without OpenMP it runs its loop on one thread,
    # whatever torch's own build uses (OpenMP on Linux wheels); the same libgomp is shared
    openmp = ["-fopenmp"] if torch.backends.openmp.is_available() else []
    flags = ["-O3", *openmp]
    key = "\0".join([torch.__version__, *flags, source])
    tag = hashlib.sha256(key.encode()).hexdigest()[:16]
    _await_build_lock(f"denovo3d_native_{tag}")
    with warnings.catch_warnings():
        # the loader's own notes (compiler checks, deprecations) are no concern of the caller
        warnings.simplefilter("ignore")
        load_inline(
            name=f"denovo3d_native_{tag}",
            cpp_sources=source,
            extra_cflags=flags,
            extra_ldflags=openmp,
            is_python_module=False,
            no_implicit_headers=True,
            verbose=False,
        )
    return torch.ops.denovo3d.rotate


def load() -> Callable[..., None] | None:
    """``torch.ops.denovo3d.rotate`` (building it on the first call of the process), or ``None``
    where it cannot be built: then once a :class:`RuntimeWarning` with the reason."""
    global _op, _tried, _failure
    if _tried:
        return _op
    with _lock:
        if _tried:
            return _op
        try:
            _op = _build()
        except Exception as exc:
            lines = [line for line in str(exc).strip().splitlines() if line.strip()]
            _failure = f"{type(exc).__name__}: {' / '.join(lines[-3:])[:400]}"
        finally:
            _tried = True
    if _failure is not None:
        warnings.warn(
            "denovo3d: the native CPU projector could not be built, so the slower pure-torch "
            f"path is used (projections and back-projections 5-10x slower); reason: {_failure}."
            " Install a C++ compiler (g++) and ninja to build it, or set DENOVO3D_NATIVE=0 "
            "to silence this.",
            RuntimeWarning,
            stacklevel=4,  # the projector's caller
        )
    return _op


def load_splat() -> Callable[..., None] | None:
    """``torch.ops.denovo3d.splat``, built with :func:`load`'s library, or ``None``."""
    return None if load() is None else torch.ops.denovo3d.splat


def load_fine_scores() -> Callable[..., None] | None:
    """``torch.ops.denovo3d.fine_scores`` (the E-step's fused fine pass), built with
    :func:`load`'s library, or ``None``."""
    return None if load() is None else torch.ops.denovo3d.fine_scores
