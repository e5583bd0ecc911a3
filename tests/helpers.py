"""Small things several test modules share."""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest

# CI sets this: a missing reference (torch, librosa, the weights) is then a failure, not a skip.
REQUIRE_PARITY = os.environ.get("VPMON_REQUIRE_PARITY") == "1"


def missing(reason: str) -> None:
    """Skip, or fail when the run promised parity checks (VPMON_REQUIRE_PARITY=1)."""
    if REQUIRE_PARITY:
        pytest.fail(f"{reason} (VPMON_REQUIRE_PARITY=1 makes this a failure instead of a skip)")
    pytest.skip(reason)


def reference_module(name: str, install: str) -> ModuleType:
    """Import a reference-only package (torch, librosa), or skip/fail saying how to install it."""
    try:
        return importlib.import_module(name)
    except ImportError:
        missing(f"{name} is not installed: `pip install {install}` for the parity tests")
        raise AssertionError("unreachable") from None
