"""Shared fixtures: a seeded torch, a temporary project directory, devices to test on."""

from __future__ import annotations

import warnings

import pytest
import torch

from denovo3d.engine import native

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="session", autouse=True)
def _native_kernels() -> None:
    """Build (or load from torch's cache) the native projector before the first test. Where it
    cannot be built its one warning is kept out of the tests (they run the torch path) and
    ``test_projector_native.py`` fails or skips with the reason."""
    if native.enabled():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            native.load()


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(0)


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> str:
    return request.param
