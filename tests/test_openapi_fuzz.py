"""schemathesis against the real server's own ``/openapi.json``: every documented operation, called with
generated valid and invalid requests, with an admin key and with a monitor key, answers without a 5xx
and exactly as the document says (status, media type, body schema), and the server logs no error.

The driver is ``benchmarks/openapi_fuzz.py`` (``fuzz``), which runs the same with a larger budget and a
random seed and writes a table. Here the budget fits CI: ``VPMON_FUZZ_EXAMPLES`` cases per operation and
mode (default 40), seed ``VPMON_FUZZ_SEED`` (fixed, so a run is reproducible).
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import httpx
import pytest
from openapi_fuzz import fuzz, prepare_tenant, table

from streamer.auth import Role
from tests.server_fixtures import RunningServer

pytestmark = pytest.mark.devset

EXAMPLES = int(os.environ.get("VPMON_FUZZ_EXAMPLES", "40"))
STREAM_EXAMPLES = 3  # each SSE case is read for a second
SEED = int(os.environ.get("VPMON_FUZZ_SEED", "20261125"))
TENANT = "fuzz"


@pytest.fixture(scope="module")
def tenant(vpmon_server: RunningServer, telephone_devset: Path) -> str:
    prepare_tenant(vpmon_server.url, vpmon_server.key(TENANT), telephone_devset)
    return TENANT


def documented_operations(server: RunningServer) -> set[str]:
    with server.client(server.key(TENANT, Role.READ)) as client:
        paths = client.get("/openapi.json").json()["paths"]
    return {f"{method.upper()} {path}" for path, operations in paths.items() for method in operations}


@pytest.mark.parametrize("role", [Role.ADMIN, Role.MONITOR])
def test_every_operation_answers_as_documented(vpmon_server: RunningServer, tenant: str, role: Role) -> None:
    log_before = len(vpmon_server.log.read_text(errors="replace").splitlines())
    runs = fuzz(
        vpmon_server.url, vpmon_server.key(tenant, role), key=role.value, examples=EXAMPLES,
        stream_examples=STREAM_EXAMPLES, seed=SEED,
    )  # fmt: skip
    report = table(runs)
    print("\n" + report)

    # Every documented operation was called, each with valid cases (schemathesis found something to send).
    assert {run.operation for run in runs} == documented_operations(vpmon_server)
    assert all(run.examples > 0 for run in runs if run.mode == "positive"), report
    # No finding: no 5xx, no undocumented status or media type, no body that breaks its schema.
    assert not [finding for run in runs for finding in run.findings], report
    # The key was used: the role's own routes answered 2xx, the others 403.
    statuses = Counter(code for run in runs for code in run.statuses.elements())
    assert statuses[401] == 0, report
    ok = {run.operation for run in runs if any(200 <= code < 300 for code in run.statuses)}
    if role is Role.ADMIN:
        assert {"GET /v1/keys", "POST /v1/keys", "GET /v1/voiceprints", "GET /v1/alerts"} <= ok, report
    else:
        assert {"GET /v1/calls", "GET /v1/alerts/stream"} <= ok and "GET /v1/keys" not in ok, report
        assert statuses[403] > 0, report
    # Nothing failed out of sight either (a streamed response that broke after its status line).
    errors = [
        line
        for line in vpmon_server.log.read_text(errors="replace").splitlines()[log_before:]
        if '"level": "error"' in line
    ]
    assert not errors, "\n".join(errors[:5])
    # And the server still serves.
    with httpx.Client(base_url=vpmon_server.url) as client:
        assert client.get(
            "/healthz", headers={"Authorization": f"Bearer {vpmon_server.key(tenant)}"}
        ).is_success
