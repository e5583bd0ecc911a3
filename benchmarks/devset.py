"""The dev voices: real recorded speech from Debian packages, built on demand and never committed.

    python benchmarks/devset.py telephone|clean      build (once) and print the directory
    python benchmarks/devset.py --demo-pair telephone print "SAME_A SAME_B OTHER" (paths in it)

The builder script is ``build_dev_set.py`` from the shared data folder next to this repository
(``../shared/data``), or the file named by ``VPMON_DEVSET_BUILDER``. Output goes under the vpmon home
(``$VPMON_HOME/devset/<mode>``); the Debian packages it extracts are cached beside it.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from verifier.models.provision import default_home  # noqa: E402
from verifier.trials import read_trials  # noqa: E402

MODES = ("telephone", "clean")
SEED = 0


def builder_path() -> Path:
    path = Path(os.environ.get("VPMON_DEVSET_BUILDER", REPO.parent / "shared" / "data" / "build_dev_set.py"))
    if not path.is_file():
        sys.exit(
            f"error: the dev-set builder {path} is missing; set VPMON_DEVSET_BUILDER to build_dev_set.py"
        )
    return path


def apt_lists_ready() -> bool:
    """`apt-get download` needs package lists; a fresh machine has none until `apt-get update`."""
    probe = subprocess.run(["apt-cache", "show", "tuxpaint-stamps-default"], capture_output=True, check=False)
    return probe.returncode == 0


def devset_dir(mode: str, seed: int = SEED) -> Path:
    """The built dev set for ``mode`` (building it first if needed). Other seeds draw other utterances
    and degradations of the same speakers: the built-in calibration is fitted on seed 1, evaluated on 0."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}")
    root = default_home() / "devset"
    out = root / (mode if seed == SEED else f"{mode}-seed{seed}")
    if (out / "trials.txt").is_file():
        return out
    command = [sys.executable, str(builder_path()), str(out), "--mode", mode, "--seed", str(seed)]
    command += ["--cache", str(root / "debs")]
    if not apt_lists_ready():
        command.append("--apt-update")
    print(f"building the {mode} dev set in {out} (about 30 s the first time)", file=sys.stderr, flush=True)
    subprocess.run(command, check=True, stdout=sys.stderr)
    return out


def demo_pair(mode: str) -> tuple[str, str, str]:
    """A same-speaker pair and a recording of someone else, as paths relative to the dev set."""
    out = devset_dir(mode)
    trials = read_trials(out / "trials.txt")
    target = next(t for t in trials if t.target)
    other = next(t for t in trials if not t.target and t.enrol == target.enrol)
    return tuple(str(p.relative_to(out)) for p in (target.enrol, target.test, other.test))  # type: ignore[return-value]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("mode", choices=MODES)
    parser.add_argument(
        "--demo-pair", action="store_true", help="print a same-speaker pair and another voice"
    )
    parser.add_argument("--seed", type=int, default=SEED, help="which draw of utterances and degradations")
    args = parser.parse_args()
    if args.demo_pair:
        print(*demo_pair(args.mode))
    else:
        print(devset_dir(args.mode, args.seed))


if __name__ == "__main__":
    main()
