"""deploy/compose-scale-out.yml validated by Docker Compose v2 itself (tests/compose_validator.py, no engine
needed), and the files it mounts checked against it: nginx's upstreams and Prometheus' targets name
exactly the gateway services, the cluster init joins exactly the Redis services."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.test_deployment import compose, compose_config, write_env  # noqa: F401 (compose: a fixture)

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
COMPOSE_FILE = DEPLOY / "compose-scale-out.yml"
SECRETS = {"REDIS_PASSWORD": "0123456789abcdef-test-only"}
GATEWAYS = {"gateway-a", "gateway-b"}
REDIS_NODES = {"redis-1", "redis-2", "redis-3"}


@pytest.fixture(scope="module")
def resolved(compose: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:  # noqa: F811
    env_file = write_env(tmp_path_factory.mktemp("compose-scale-out") / "test.env", SECRETS)
    result = compose_config(compose, COMPOSE_FILE, env_file, "--format", "json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_the_file_is_valid_with_gateways_behind_nginx_on_a_cluster(resolved: dict[str, Any]) -> None:
    services = resolved["services"]
    assert set(services) == GATEWAYS | REDIS_NODES | {"redis-cluster-init", "lb", "prometheus"}
    for name in GATEWAYS:
        environment = services[name]["environment"]
        assert environment["VPMON_REDIS_URL"] == f"redis://:{SECRETS['REDIS_PASSWORD']}@redis-1:6379"
        assert environment["VPMON_REDIS_CLUSTER"] == "true" and environment["VPMON_STORE_BACKEND"] == "vset"
        assert (
            services[name]["depends_on"]["redis-cluster-init"]["condition"]
            == "service_completed_successfully"
        )
    volumes = {volume["source"] for name in GATEWAYS for volume in services[name]["volumes"]}
    assert volumes == {"gateway-a-home", "gateway-b-home"}  # each gateway its own spool
    for name in REDIS_NODES:
        command = services[name]["command"][0]
        assert "--cluster-enabled yes" in command and "--appendonly yes" in command
        assert services[name]["environment"]["NODE_NAME"] == name
        assert SECRETS["REDIS_PASSWORD"] not in command  # read from the environment into a tmpfs file
        assert list(services[name]["networks"]) == ["redis"] and "ports" not in services[name]
    assert resolved["networks"]["redis"]["internal"] is True
    published = {name for name, service in services.items() if service.get("ports")}
    assert published == {"lb", "prometheus"}
    assert all(p["host_ip"] == "127.0.0.1" for name in published for p in services[name]["ports"])


def test_the_cluster_init_joins_every_redis_node(resolved: dict[str, Any]) -> None:
    init = resolved["services"]["redis-cluster-init"]
    joined = re.search(r"for name in ([\w -]+); do", init["command"][0])
    assert joined is not None and set(joined.group(1).split()) == REDIS_NODES
    assert set(init["depends_on"]) == REDIS_NODES
    assert all(d["condition"] == "service_healthy" for d in init["depends_on"].values())


def _mounted(service: dict[str, Any], target: str) -> Path:
    return Path(next(v["source"] for v in service["volumes"] if v["target"] == target))


def test_nginx_balances_over_exactly_the_gateways(resolved: dict[str, Any]) -> None:
    conf = _mounted(resolved["services"]["lb"], "/etc/nginx/conf.d/default.conf")
    assert conf == DEPLOY / "nginx-scale-out.conf" and conf.is_file()
    text = conf.read_text()
    upstreams = dict(re.findall(r"upstream (\w+) \{(.*?)\n\}", text, re.S))
    assert set(upstreams) == {"vpmon_gateways", "vpmon_whip"}
    for body in upstreams.values():
        assert set(re.findall(r"server ([\w-]+):8080;", body)) == GATEWAYS
    assert "ip_hash;" in upstreams["vpmon_whip"]  # WHIP sessions stay where their offer was answered
    streams = re.search(r"location /v1/streams/ \{(.*?)\n    \}", text, re.S)
    assert streams is not None and "proxy_set_header Upgrade $http_upgrade;" in streams.group(1)
    assert "proxy_read_timeout 3600s;" in streams.group(1)
    proxied = set(re.findall(r"proxy_pass http://(\w+);", text))
    assert proxied == set(upstreams)
    assert text.count("{") == text.count("}")


def test_prometheus_scrapes_every_gateway(resolved: dict[str, Any]) -> None:
    prometheus = resolved["services"]["prometheus"]
    config_file = _mounted(prometheus, "/etc/prometheus/prometheus.yml")
    assert config_file == DEPLOY / "prometheus-scale-out.yml"
    config = yaml.safe_load(config_file.read_text())
    targets = {t for job in config["scrape_configs"] for c in job["static_configs"] for t in c["targets"]}
    assert targets == {f"{name}:8080" for name in GATEWAYS}
    assert _mounted(prometheus, "/etc/prometheus/rules").is_dir()
