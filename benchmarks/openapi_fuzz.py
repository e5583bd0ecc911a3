"""The HTTP API fuzzed from its own OpenAPI document (schemathesis): no 5xx, every response as documented.

    python benchmarks/openapi_fuzz.py                    300 examples per operation, mode and key (~10 min)
    python benchmarks/openapi_fuzz.py --examples 50      a shorter run
    python benchmarks/openapi_fuzz.py --seed 7           a given seed (default: a random one, printed)

Everything is real and on loopback: an embedded redis-server in a temporary directory and a ``vpmon
serve`` subprocess on a free port (started as tests/server_fixtures.py starts them), both stopped at the
end. The document is read from the running server (``GET /openapi.json``, which needs a key) with
``schemathesis.openapi.from_url``; every operation in it is then called with cases schemathesis generates
from it (``APIOperation.as_strategy``, driven by Hypothesis), once with valid data (``positive``) and
once with data the document says is invalid (``negative``), with an admin key and with a monitor key of
one tenant ("fuzz"). Each response goes through four of schemathesis' checks:

- ``not_a_server_error``: no 5xx;
- ``status_code_conformance``: the status is documented for the operation (every operation documents
  ``4XX`` and ``503`` as problems, ``streamer/problems.py``);
- ``content_type_conformance``: so is the response's media type (``application/problem+json`` for errors);
- ``response_schema_conformance``: the body matches the documented schema for that status and type.

The SSE feeds (``/v1/alerts/stream``, ``/v1/calls/stream``) never end: each is read for
``STREAM_SECONDS`` (schemathesis reads an event stream until the request's timeout), with fewer examples.
Findings are collected per operation (the first case of each check, status and mode, with its curl
command), not raised, so one run reports all of them. tests/test_openapi_fuzz.py runs the same ``fuzz``
with a CI-sized budget and a fixed seed; this script prints a table and writes
``benchmarks/results/openapi_fuzz.json``.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))

from common import environment  # noqa: E402

OUTPUT = BENCH / "results" / "openapi_fuzz.json"
PACKAGES = ("vpmon", "fastapi", "starlette", "pydantic", "uvicorn", "schemathesis", "hypothesis")
CHECKS = (not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance)
MODES = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
STREAM_SECONDS = 1.0  # how long an SSE response is read before the case counts as answered
REQUEST_TIMEOUT_S = 30.0  # anything slower is a finding (a transport error), not a hang

# WHIP offers are SDP text: send generated strings as text/plain would be.
schemathesis.serializer.alias("application/sdp", "text/plain")


@dataclass
class Finding:
    check: str  # the failure's code and title (e.g. "ST101 Server error"), or "transport error"
    status: int | None
    message: str
    reproduce: str  # a curl command


@dataclass
class OperationRun:
    operation: str  # "METHOD /path"
    key: str  # the role of the key used
    mode: str
    examples: int = 0
    seconds: float = 0.0
    statuses: Counter[int] = field(default_factory=Counter)
    findings: list[Finding] = field(default_factory=list)
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["statuses"] = {str(code): n for code, n in sorted(self.statuses.items())}
        return out


def is_stream(operation: Any) -> bool:
    """An operation whose 200 is an endless event stream."""
    content = (operation.definition.raw.get("responses", {}).get("200") or {}).get("content", {})
    return "text/event-stream" in content


def load_schema(url: str, token: str) -> Any:
    headers = {"Authorization": f"Bearer {token}"}
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json", headers=headers, timeout=30)
    schema.config.update(base_url=url, headers=headers)
    return schema


def fuzz(
    url: str,
    token: str,
    *,
    key: str,
    examples: int,
    stream_examples: int,
    seed: int,
    modes: Sequence[GenerationMode] = MODES,
) -> list[OperationRun]:
    """Every operation of the server's OpenAPI document, ``examples`` cases per mode (``stream_examples``
    for the SSE feeds), called with ``token``; one ``OperationRun`` per operation and mode."""
    schema = load_schema(url, token)
    runs = []
    for index, result in enumerate(schema.get_all_operations()):
        operation = result.ok()  # an operation the document describes wrongly raises here
        for mode in modes:
            stream = is_stream(operation)
            run = OperationRun(operation.label, key, mode.value)
            count = stream_examples if stream else examples
            started = time.monotonic()
            _fuzz_operation(operation, mode, run, count, seed + index, STREAM_SECONDS if stream else None)
            run.seconds = round(time.monotonic() - started, 2)
            runs.append(run)
    return runs


def _fuzz_operation(
    operation: Any, mode: GenerationMode, run: OperationRun, count: int, seed: int, stream_s: float | None
) -> None:
    seen: set[tuple[str, int | None]] = set()

    def record(finding: Finding) -> None:
        if (finding.check, finding.status) not in seen:  # the first case of each kind is enough
            seen.add((finding.check, finding.status))
            run.findings.append(finding)

    @hypothesis_seed(seed)
    @settings(
        max_examples=count,
        deadline=None,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
        report_multiple_bugs=False,
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def call(case: Any) -> None:
        run.examples += 1
        try:
            response = case.call(timeout=stream_s or REQUEST_TIMEOUT_S)
        except requests.RequestException as exc:
            record(Finding("transport error", None, f"{type(exc).__name__}: {exc}", case.as_curl_command()))
            return
        run.statuses[response.status_code] += 1
        try:
            case.validate_response(response, checks=list(CHECKS))
        except schemathesis.errors.FailureGroup as group:
            for failure in group.exceptions:
                message = f"{failure.title}: {failure.message}".strip()
                curl = case.as_curl_command()  # the key shows as [Filtered]
                record(Finding(f"{failure.code} {failure.title}", response.status_code, message, curl))

    try:
        call()
    except Unsatisfiable:
        # Nothing in the operation can be invalid (no parameters, no body): the negative mode has no case.
        if mode is not GenerationMode.NEGATIVE:
            raise
        run.note = "no invalid case exists"


def prepare_tenant(url: str, admin_token: str, devset: Path) -> None:
    """One voiceprint in the fuzzed tenant (from the dev set), so that verification and search reach a
    real vector set instead of an empty tenant."""
    paths = sorted((devset / "wav" / "tuxpaint_ca").glob("*.wav"))[:6]
    response = requests.post(
        f"{url}/v1/voiceprints",
        headers={"Authorization": f"Bearer {admin_token}"},
        data={"speaker_id": "agent-fuzz", "site": "fuzz-site", "tags": "fuzz"},
        files=[("files", (p.name, p.read_bytes(), "audio/wav")) for p in paths],
        timeout=120,
    )
    response.raise_for_status()


def findings(runs: Iterable[OperationRun]) -> list[tuple[OperationRun, Finding]]:
    return [(run, finding) for run in runs for finding in run.findings]


def table(runs: Sequence[OperationRun]) -> str:
    width = max(len(run.operation) for run in runs)
    lines = [f"{'operation':<{width}}  key      mode      cases  seconds  findings  statuses"]
    for run in runs:
        statuses = " ".join(f"{code}×{n}" for code, n in sorted(run.statuses.items()))
        lines.append(
            f"{run.operation:<{width}}  {run.key:<7}  {run.mode:<8}  {run.examples:>5}  {run.seconds:>7.1f}"
            f"  {len(run.findings):>8}  {statuses or run.note}"
        )
    for run, finding in findings(runs):
        lines += [
            "",
            f"{run.operation} ({run.key}, {run.mode}): {finding.check} [{finding.status}]",
            f"  {finding.message[:600]}",
            f"  {finding.reproduce}",
        ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--examples", type=int, default=300, help="cases per operation, mode and key")
    parser.add_argument("--stream-examples", type=int, default=20, help="cases for each SSE feed")
    parser.add_argument("--seed", type=int, default=None, help="Hypothesis seed (default: random)")
    parser.add_argument("--output", type=Path, default=OUTPUT, help="where to write the JSON results")
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(2**32)

    from tests.redis_fixtures import start_server
    from tests.server_fixtures import start_vpmon, stop_vpmon

    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="vpmon-fuzz-") as tmp:
        redis_server = start_server(Path(tmp))
        try:
            server = start_vpmon(Path(tmp), redis_server)
            try:
                from devset import devset_dir

                prepare_tenant(server.url, server.key("fuzz"), devset_dir("telephone"))
                runs = []
                for role in ("admin", "monitor"):
                    token = server.key("fuzz", role)
                    runs += fuzz(
                        server.url, token, key=role, examples=args.examples,
                        stream_examples=args.stream_examples, seed=seed,
                    )  # fmt: skip
                server_errors = server.log.read_text(errors="replace").count('"level": "error"')
            finally:
                stop_vpmon(server)
        finally:
            redis_server.stop()
    print(table(runs))
    found = findings(runs)
    print(
        f"\n{sum(r.examples for r in runs)} cases, {len(runs)} operation runs, {len(found)} findings, "
        f"{server_errors} error lines in the server log, seed {seed}, {time.monotonic() - started:.0f} s"
    )
    result = {
        "benchmark": "openapi_fuzz",
        "environment": environment(PACKAGES),
        "settings": {
            "examples": args.examples,
            "stream_examples": args.stream_examples,
            "stream_seconds": STREAM_SECONDS,
            "seed": seed,
            "modes": [m.value for m in MODES],
            "checks": [c.__name__ for c in CHECKS],
        },
        "cases": sum(r.examples for r in runs),
        "findings": len(found),
        "server_error_log_lines": server_errors,
        "seconds": round(time.monotonic() - started, 1),
        "runs": [r.to_dict() for r in runs],
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.output}")
    sys.exit(1 if found else 0)


if __name__ == "__main__":
    main()
