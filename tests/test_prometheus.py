"""Metrics end to end: real calls through a real ``vpmon serve`` (and real Redis), scraped by a real
Prometheus (Debian's ``prometheus`` package, which scripts/test installs) with the repository's scrape
config and rule files; every Grafana panel query and every rule is then evaluated by that Prometheus.

What fails here: a query or rule Prometheus rejects, a metric name in the dashboard or the rules that the
gateway does not export (or that no recording rule defines), a dashboard panel with no data, /metrics
without a key, or a label that carries a call, agent or tenant id."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import websockets
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect

from streamer.auth import Role
from streamer.redis_server import RedisServer
from streamer.stream_client import CallAudio, StreamOptions, stream_call
from tests.redis_fixtures import free_port
from tests.server_fixtures import RunningServer, start_vpmon, stop_vpmon
from tests.test_gateway import ENROL, native_call, speech, twilio_call, twilio_messages, ws_url

REPO = Path(__file__).resolve().parent.parent
DASHBOARD = REPO / "dashboards" / "grafana" / "vpmon.json"
PROMETHEUS_CONFIG = REPO / "dashboards" / "prometheus" / "prometheus.yml"
RULES = REPO / "dashboards" / "prometheus" / "rules"
DEADLINE_S = 120.0  # generous: waiting for scrapes and rule evaluations, never a timing assertion
TENANT = "live"  # tests/test_gateway.py's twilio_call streams to this tenant
PROTOCOLS = ("twilio", "audiohook", "native", "whip")
# The label names a vpmon metric may have: bounded sets only (streamer/metrics.py).
ALLOWED_LABELS = {"protocol", "state", "outcome", "code", "le", "version", "model"}

PROMETHEUS, PROMTOOL = shutil.which("prometheus"), shutil.which("promtool")
pytestmark = pytest.mark.skipif(
    PROMETHEUS is None or PROMTOOL is None,
    reason="needs Debian's prometheus package (prometheus and promtool): scripts/test installs it",
)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, api_redis: RedisServer) -> Iterator[RunningServer]:
    # Loopback ICE candidates: the WHIP call below runs on this host.
    server = start_vpmon(tmp_path_factory.mktemp("vpmon-metrics"), api_redis, whip_loopback_candidates="true")
    try:
        yield server
    finally:
        stop_vpmon(server)


@dataclass(frozen=True)
class Traffic:
    monitor: str
    admin: str
    ids: set[str]  # every call, agent and tenant id used: none may appear in a label


@pytest.fixture(scope="module")
def traffic(gateway: RunningServer, telephone_devset: Path) -> Traffic:
    """Real calls of every protocol: a takeover (an alert), genuine calls, an agent that is not enrolled
    (a notice and close 4004), and a malformed start (close 1003)."""
    admin, monitor = gateway.key(TENANT), gateway.key(TENANT, Role.MONITOR)
    with gateway.client(admin) as client:
        paths = sorted((telephone_devset / "wav" / "tuxpaint_ca").glob("*.wav"))[:ENROL]
        files = [("files", (p.name, p.read_bytes(), "audio/wav")) for p in paths]
        assert client.post("/v1/voiceprints", data={"speaker_id": "agent-ca"}, files=files).status_code == 201
        client.patch("/v1/tenant", json={"twilio_auth_token": "twilio-secret-token"}).raise_for_status()
    genuine = speech(telephone_devset, "tuxpaint_ca", ENROL, 9)
    takeover = np.concatenate([genuine, speech(telephone_devset, "tuxpaint_ro", 0, 6)])
    short = CallAudio.from_samples(genuine[: 8000 * 8], 8000)

    async def calls() -> None:
        frames, close = await native_call(gateway, monitor, "metrics-takeover", takeover)
        assert close is not None and close.code == 1000, gateway.log_tail()
        assert [f["kind"] for f in frames if f["type"] == "alert"] == ["takeover"], gateway.log_tail()
        _, close = await native_call(gateway, monitor, "metrics-nobody", genuine[:8000], agent_id="nobody")
        assert close is not None and close.code == 4004
        params = {"tenant": TENANT, "agent_id": "agent-ca"}
        close = await twilio_call(gateway, twilio_messages("CA-metrics", genuine, np.zeros(8000), params))
        assert close is not None and close.code == 1000
        audiohook_id = str(uuid.uuid4())  # AudioHook's conversation ids are UUIDs
        for protocol, call_id in (("audiohook", audiohook_id), ("whip", "metrics-whip")):
            options = StreamOptions(
                protocol, gateway.url, key=monitor, agent_id="agent-ca", call_id=call_id, speed=0,
                whip_codec="PCMU",
            )  # fmt: skip
            result = await stream_call(short, options)
            assert result.ok, (protocol, result, gateway.log_tail())
            ids.add(call_id)
        url, auth = ws_url(gateway, "/v1/streams/native"), {"Authorization": f"Bearer {monitor}"}
        async with connect(url, additional_headers=auth) as ws:  # a malformed start: close 1003
            await ws.send("{not json")
            with pytest.raises(websockets.ConnectionClosed):
                while True:
                    await ws.recv()
        assert ws.protocol.close_rcvd is not None and ws.protocol.close_rcvd.code == 1003

    ids = {"metrics-takeover", "metrics-nobody", "CA-metrics", "agent-ca", "nobody", TENANT}
    asyncio.run(calls())
    return Traffic(monitor, admin, ids)


def scrape(server: RunningServer, key: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """/metrics parsed by prometheus-client's own parser: sample name → [(labels, value)]."""
    with server.client(key) as client:
        response = client.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def total(samples: dict, name: str, **labels: str) -> float:
    return sum(v for found, v in samples.get(name, []) if labels.items() <= found.items())


def test_metrics_need_a_monitor_or_admin_key(gateway: RunningServer) -> None:
    for token, status in (
        (None, 401),
        ("vpk_wrong", 401),
        (gateway.key("metrics-keys", Role.READ), 403),
        (gateway.key("metrics-keys", Role.ENROL), 403),
        (gateway.key("metrics-keys", Role.MONITOR), 200),
        (gateway.key("metrics-keys", Role.ADMIN), 200),
    ):
        with gateway.client(token) as client:
            assert client.get("/metrics").status_code == status, token


def test_metrics_count_the_calls_without_ids(gateway: RunningServer, traffic: Traffic) -> None:
    samples = scrape(gateway, traffic.monitor)
    assert total(samples, "vpmon_calls_active") == 0  # every call has ended
    for protocol in PROTOCOLS:
        assert total(samples, "vpmon_audio_frames_received_total", protocol=protocol) > 0, protocol
        assert total(samples, "vpmon_speech_windows_total", protocol=protocol) > 0, protocol
        assert total(samples, "vpmon_verdicts_total", protocol=protocol) > 0, protocol
        assert total(samples, "vpmon_verdict_latency_seconds_count", protocol=protocol) > 0, protocol
        assert total(samples, "vpmon_call_closes_total", protocol=protocol, code="1000") > 0, protocol
    assert total(samples, "vpmon_alerts_total", protocol="native", outcome="takeover") == 1
    assert total(samples, "vpmon_alerts_total", protocol="native", outcome="agent_not_enrolled") == 1
    assert total(samples, "vpmon_call_closes_total", protocol="native", code="4004") == 1
    assert total(samples, "vpmon_call_closes_total", protocol="native", code="1003") == 1
    assert total(samples, "vpmon_verdicts_total", state="mismatch") >= 1
    windows = total(samples, "vpmon_speech_windows_total")
    embedded = total(samples, "vpmon_embedding_batch_windows_sum")  # batches may hold several windows
    # (≤: a window whose call ended before its turn is neither embedded nor shed)
    assert 0 < embedded + total(samples, "vpmon_embedding_shed_windows_total") <= windows
    assert 0 < total(samples, "vpmon_embedding_seconds_count") <= embedded
    assert total(samples, "vpmon_embedding_queue_delay_seconds_count") == embedded
    assert total(samples, "vpmon_embedding_queue_windows") == 0
    assert total(samples, "vpmon_redis_connects_total") > 0
    assert total(samples, "vpmon_redis_errors_total") == 0
    assert total(samples, "vpmon_whip_peer_connections") == 0  # the WHIP call's is closed
    [(build, value)] = samples["vpmon_build_info"]
    assert value == 1 and build["model"].startswith("campplus") and build["version"]

    for name, series in samples.items():
        for labels, _ in series:
            if name.startswith("vpmon_"):
                assert set(labels) <= ALLOWED_LABELS, (name, labels)
            leaked = traffic.ids & set(labels.values())
            assert not leaked, f"{name}{labels} carries ids {leaked}"


# --- a real Prometheus ------------------------------------------------------------------------------
@dataclass
class RunningPrometheus:
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def get(self, path: str, **params: Any) -> Any:
        response = httpx.get(self.url + path, params=params, timeout=30.0)
        body = response.json()
        assert body.get("status") == "success", (path, params, body)
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        return self.get("/api/v1/query", query=expr)["result"]

    def log_tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-20:])


def promtool(*args: str) -> str:
    done = subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60)  # type: ignore[list-item]
    assert done.returncode == 0, f"promtool {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def scrape_config(tmp: Path, target: str, key: str) -> Path:
    """The repository's prometheus.yml with this test's target, key file, rule files and 1 s intervals
    (each replaced thing must be where the compose deployment expects it: exactly once)."""
    key_file = tmp / "vpmon-key"
    key_file.write_text(key + "\n")
    text = PROMETHEUS_CONFIG.read_text()
    for old, new in (
        ("/etc/prometheus/vpmon-key", str(key_file)),
        ("/etc/prometheus/rules/*.yml", str(RULES / "*.yml")),
        ('"gateway:8080"', json.dumps(target)),
        ("scrape_interval: 15s", "scrape_interval: 1s"),
        ("evaluation_interval: 15s", "evaluation_interval: 1s"),
    ):
        assert text.count(old) == 1, f"{PROMETHEUS_CONFIG} should hold {old!r} once"
        text = text.replace(old, new)
    config = tmp / "prometheus.yml"
    config.write_text(text)
    return config


def wait_for(what: str, prometheus: RunningPrometheus, check: Any) -> Any:
    deadline = time.monotonic() + DEADLINE_S
    while True:
        assert prometheus.process.poll() is None, f"prometheus exited:\n{prometheus.log_tail()}"
        found = check()
        if found:
            return found
        assert time.monotonic() < deadline, f"no {what} within {DEADLINE_S} s:\n{prometheus.log_tail()}"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def prometheus(
    tmp_path_factory: pytest.TempPathFactory, gateway: RunningServer, traffic: Traffic
) -> Iterator[RunningPrometheus]:
    tmp = tmp_path_factory.mktemp("prometheus")
    config = scrape_config(tmp, gateway.url.removeprefix("http://"), traffic.monitor)
    promtool("check", "config", str(config))
    port = free_port()
    log = tmp / "prometheus.log"
    process = subprocess.Popen(
        [
            PROMETHEUS,  # type: ignore[list-item]
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    running = RunningPrometheus(f"http://127.0.0.1:{port}", process, log)
    try:

        def scraped() -> bool:
            with httpx.Client() as client:
                try:
                    targets = client.get(running.url + "/api/v1/targets").json()["data"]["activeTargets"]
                except (httpx.TransportError, ValueError):
                    return False
            return any(t["labels"]["job"] == "vpmon" and t["health"] == "up" for t in targets)

        wait_for("successful scrape of the gateway", running, scraped)
        yield running
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# PromQL words that are not metric names.
_KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "bool",
             "offset", "inf", "nan"}  # fmt: skip


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: identifiers that are not functions, keywords, label
    names (inside {…}, by (…), on (…)…), strings or durations."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    names = set()
    for match in re.finditer(r"(?<![\w:.])([A-Za-z_:][\w:]*)(\s*\()?", expr):
        name, call = match.groups()
        if not call and name.lower() not in _KEYWORDS:
            names.add(name)
    return names


def grafana_queries(dashboard: dict[str, Any], protocol: str) -> list[tuple[str, str]]:
    """(panel title, query) for every panel target, with Grafana's variables replaced."""
    values = {"$__rate_interval": "30s", "$__interval": "15s", "$__range": "5m", "$protocol": protocol}
    found = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for variable, value in values.items():
                expr = expr.replace(variable, value).replace("${" + variable[1:] + "}", value)
            assert "$" not in expr, (
                f"panel {panel['title']!r}: a Grafana variable the test does not know: {expr}"
            )
            found.append((panel["title"], expr))
    return found


def test_promtool_accepts_the_rules() -> None:
    out = promtool("check", "rules", *map(str, sorted(RULES.glob("*.yml"))))
    assert "SUCCESS" in out


def test_prometheus_evaluates_every_dashboard_query_and_rule(
    gateway: RunningServer, traffic: Traffic, prometheus: RunningPrometheus
) -> None:
    exported = set(scrape(gateway, traffic.monitor)) | {"up"}  # `up` is Prometheus' own, per target
    groups = prometheus.get("/api/v1/rules")["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    recorded = {rule["name"] for rule in rules if rule["type"] == "recording"}
    assert {r["name"] for r in rules if r["type"] == "alerting"} == {
        "VpmonGatewayDown", "VpmonNoAudio", "VpmonVerdictLatencyHigh", "VpmonAlertSurge", "VpmonRedisErrors",
        "VpmonRedisUnreachable",
    }  # fmt: skip
    assert prometheus.query('sum(vpmon_alerts_total{job="vpmon",outcome="takeover"})')[0]["value"][1] == "1"

    # Every recording rule has evaluated and produced series (what the dashboard and alerts read).
    for name in sorted(recorded):
        wait_for(f"series of the recording rule {name}", prometheus, lambda n=name: prometheus.query(n))

    for rule in rules:
        unknown = metric_names(rule["query"]) - exported - recorded
        assert not unknown, f"rule {rule['name']} reads metrics nobody exports: {unknown}"
        assert rule["health"] == "ok", (rule["name"], rule.get("lastError"))
        prometheus.query(rule["query"])  # asserts success

    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["panels"], "the dashboard has no panels"
    for protocol in (".*", *PROTOCOLS):
        for title, expr in grafana_queries(dashboard, protocol):
            unknown = metric_names(expr) - exported - recorded
            assert not unknown, f"panel {title!r} reads metrics nobody exports: {unknown} in {expr}"
            assert prometheus.query(expr), f"panel {title!r} ({protocol}) has no data: {expr}"

    # The protocol variable offers every protocol.
    [variable] = dashboard["templating"]["list"]
    metric = re.fullmatch(r"label_values\((\w+), protocol\)", variable["definition"]).group(1)  # type: ignore[union-attr]
    assert metric in exported
    assert set(prometheus.get("/api/v1/label/protocol/values", **{"match[]": metric})) == set(PROTOCOLS)
