"""The deployment files: docker-compose.yml validated by Docker Compose v2 itself against the Compose
Specification (no engine needed: tests/compose_validator.py), the Dockerfile's inputs, the mounted
dashboard files, and the container health check against a real server."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from streamer.auth import Role
from tests.compose_validator import ValidatorUnavailable, compose_binary
from tests.redis_fixtures import free_port
from tests.server_fixtures import RunningServer

REPO = Path(__file__).resolve().parent.parent
COMPOSE_FILE = REPO / "docker-compose.yml"
SECRETS = {"REDIS_PASSWORD": "0123456789abcdef-test-only", "GRAFANA_ADMIN_PASSWORD": "grafana-test-only"}


@pytest.fixture(scope="module")
def compose() -> Path:
    try:
        return compose_binary()
    except ValidatorUnavailable as exc:
        pytest.skip(str(exc))


def compose_config(
    compose: Path, compose_file: Path, env_file: Path, *args: str
) -> subprocess.CompletedProcess[str]:
    # --env-file: the test's secrets, never a developer's real .env next to the file.
    return subprocess.run(
        [str(compose), "--file", str(compose_file), "--env-file", str(env_file), "config", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=compose_file.parent,
        env={"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp")},
    )


def write_env(path: Path, values: dict[str, str]) -> Path:
    path.write_text("".join(f"{name}={value}\n" for name, value in values.items()))
    return path


@pytest.fixture(scope="module")
def resolved(compose: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """docker-compose.yml as Compose resolves it (interpolated, paths made absolute, defaults filled)."""
    env_file = write_env(tmp_path_factory.mktemp("compose") / "test.env", SECRETS)
    result = compose_config(compose, COMPOSE_FILE, env_file, "--format", "json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_compose_file_is_valid_and_has_the_four_services(resolved: dict[str, Any]) -> None:
    services = resolved["services"]
    assert set(services) == {"redis", "gateway", "prometheus", "grafana"}
    assert services["redis"]["image"] == "redis:8"
    assert "--appendonly yes" in services["redis"]["command"][0]
    assert services["gateway"]["build"]["context"] == str(REPO)
    assert services["gateway"]["environment"]["VPMON_REDIS_URL"] == (
        f"redis://:{SECRETS['REDIS_PASSWORD']}@redis:6379/0"
    )
    assert services["gateway"]["depends_on"]["redis"]["condition"] == "service_healthy"


def test_redis_is_reachable_only_by_the_gateway(resolved: dict[str, Any]) -> None:
    assert resolved["networks"]["redis"]["internal"] is True
    assert list(resolved["services"]["redis"]["networks"]) == ["redis"]
    assert "ports" not in resolved["services"]["redis"]
    for name, service in resolved["services"].items():
        if name != "redis":
            assert ("redis" in service["networks"]) == (name == "gateway"), name
        for port in service.get("ports", []):
            assert port["host_ip"] == "127.0.0.1", f"{name} publishes {port} beyond loopback"


def test_the_redis_password_is_on_no_command_line(resolved: dict[str, Any]) -> None:
    redis = resolved["services"]["redis"]
    assert SECRETS["REDIS_PASSWORD"] not in json.dumps([redis["command"], redis.get("entrypoint")])
    assert SECRETS["REDIS_PASSWORD"] not in json.dumps(redis["healthcheck"])


def test_the_validator_rejects_broken_files(compose: Path, tmp_path: Path) -> None:
    """Proof that the check checks: a misspelt key (the schema) and a dependency on no service (a rule
    the schema cannot express) are both refused, with the reason."""
    env_file = write_env(tmp_path / "test.env", SECRETS)
    text = COMPOSE_FILE.read_text()
    broken = {
        "schema": (text.replace("    restart: unless-stopped\n", "    restrat: unless-stopped\n", 1),
                   "additional properties 'restrat' not allowed"),
        "depends_on": (text.replace("      - gateway\n", "      - gateway-that-does-not-exist\n", 1),
                       "gateway-that-does-not-exist"),
        "type": (text.replace('      - "127.0.0.1:9090:9090"', "      - {published: yes}", 1), "ports"),
    }  # fmt: skip
    for name, (content, reason) in broken.items():
        assert content != text, f"the {name} mutation did not apply"
        copy = tmp_path / "docker-compose.yml"
        copy.write_text(content)
        result = compose_config(compose, copy, env_file, "--quiet")
        assert result.returncode != 0, f"{name}: a broken file passed"
        assert reason in result.stderr, f"{name}: {result.stderr}"


def test_missing_secrets_stop_compose_with_a_message(compose: Path, tmp_path: Path) -> None:
    env_file = write_env(tmp_path / "test.env", {"GRAFANA_ADMIN_PASSWORD": "x"})
    result = compose_config(compose, COMPOSE_FILE, env_file, "--quiet")
    assert result.returncode != 0
    assert "set REDIS_PASSWORD in .env" in result.stderr


def dockerfile_copy_sources() -> list[str]:
    sources = []
    for line in (REPO / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):
            words = [w for w in line.split()[1:] if not w.startswith("--")]
            sources += words[:-1]  # the last word is the destination
    return sources


def test_dockerfile_inputs_exist_and_pass_the_dockerignore() -> None:
    sources = dockerfile_copy_sources()
    assert {"pyproject.toml", "constraints.txt", "verifier", "streamer"} <= set(sources)
    allowed = {
        line[1:].rstrip("/")
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    for source in sources:
        assert (REPO / source).exists(), f"the Dockerfile copies {source}, which is missing"
        assert source.rstrip("/") in allowed, f".dockerignore keeps {source} out of the build context"
    text = (REPO / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim", text, re.M)
    assert "pip install -c constraints.txt ." in text and "vpmon models fetch" in text
    assert re.search(r"^USER vpmon$", text, re.M) and "HEALTHCHECK" in text
    assert re.search(r'^CMD \["vpmon", "serve"\]$', text, re.M)


def test_compose_mounts_dashboard_files_that_exist(resolved: dict[str, Any]) -> None:
    """The Prometheus and Grafana files come from dashboards/, written with the metrics work: skipped
    (not failed) while that folder is absent from the checkout."""
    if not (REPO / "dashboards").is_dir():
        pytest.skip("dashboards/ is not in this checkout yet: its mounts cannot be checked")
    binds = [
        (name, mount)
        for name, service in resolved["services"].items()
        for mount in service.get("volumes", [])
        if mount["type"] == "bind"
    ]
    dashboard_binds = [(n, m) for n, m in binds if m["source"].startswith(str(REPO / "dashboards"))]
    assert len(dashboard_binds) == 4, binds
    for name, mount in dashboard_binds:
        assert Path(mount["source"]).exists(), f"{name} mounts {mount['source']}, which is missing"
    targets = {mount["target"] for _, mount in binds}
    assert {
        "/etc/prometheus/prometheus.yml",
        "/etc/prometheus/rules",
        "/etc/prometheus/vpmon-key",
        "/etc/grafana/provisioning",
        "/var/lib/grafana/dashboards",
    } <= targets
    # What the mounted files expect of the compose file: the key file's path and the gateway's name.
    prometheus = (REPO / "dashboards/prometheus/prometheus.yml").read_text()
    assert "/etc/prometheus/vpmon-key" in prometheus and "gateway:8080" in prometheus


# --- the container's health check, against a real server -----------------------------------------
def healthcheck(port: int, key: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "VPMON_HOST": "0.0.0.0", "VPMON_PORT": str(port)}
    env.pop("VPMON_HEALTHCHECK_KEY", None)
    if key is not None:
        env["VPMON_HEALTHCHECK_KEY"] = key
    return subprocess.run(
        [sys.executable, "-m", "streamer.healthcheck"], capture_output=True, text=True, env=env, timeout=30
    )


def test_healthcheck_against_a_real_server(vpmon_server: RunningServer) -> None:
    port = int(vpmon_server.url.rpartition(":")[2])
    keyless = healthcheck(port)
    assert keyless.returncode == 0 and keyless.stdout.strip().endswith("/healthz: 401"), keyless.stdout
    keyed = healthcheck(port, vpmon_server.key("health", Role.READ))
    assert keyed.returncode == 0 and keyed.stdout.strip().endswith("/healthz: 200"), keyed.stdout
    wrong = healthcheck(port, "vpk_not_a_real_key")
    assert wrong.returncode == 1 and "VPMON_HEALTHCHECK_KEY" in wrong.stdout
    nobody = healthcheck(free_port())
    assert nobody.returncode == 1 and "no answer" in nobody.stdout


def test_compose_validator_binary_is_docker_compose(compose: Path) -> None:
    version = subprocess.run([str(compose), "version"], capture_output=True, text=True, check=True)
    assert version.stdout.strip() == "Docker Compose version v2.40.3"
