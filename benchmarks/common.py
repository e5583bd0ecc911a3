"""What every benchmark writes next to its figures: the machine, package versions and the git commit, so
a result in ``benchmarks/results/`` says where it came from."""

from __future__ import annotations

import os
import platform
import subprocess
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
CORE_PACKAGES = ("vpmon", "numpy", "onnxruntime", "webrtcvad-wheels", "soxr")


def environment(packages: Sequence[str] = CORE_PACKAGES) -> dict[str, Any]:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in packages:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    git = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain"], capture_output=True, text=True)
    return {
        "machine": {
            "platform": platform.platform(),
            "cpu": names[0] if names else platform.processor(),
            "cpus": os.cpu_count(),
            "load_average_at_start": os.getloadavg(),
        },
        "versions": versions,
        "git": {"commit": git.stdout.strip() or None, "dirty": bool(dirty.stdout.strip())},
    }
