"""The voiceprint commands of the CLI, as a user runs them: ``vpmon`` in a subprocess, on a real Redis
directly (``--tenant``) and through a real running server (``--url``), on real speech."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import get_args

import pytest
from pydantic import SecretStr

from streamer.redis_server import RedisServer
from streamer.settings import Settings
from tests.server_fixtures import RunningServer

REPO = Path(__file__).resolve().parent.parent


def vpmon(*args: str, env: dict[str, str], check: int | None = 0) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "streamer.cli", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    if check is not None:
        assert result.returncode == check, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def speakers(telephone_devset: Path) -> dict[str, list[Path]]:
    names = ["tuxpaint_ca", "tuxpaint_ro", "tuxpaint_es"]
    return {name: sorted((telephone_devset / "wav" / name).glob("*.wav")) for name in names}


@pytest.fixture
def direct(api_redis: RedisServer, request: pytest.FixtureRequest) -> dict[str, str]:
    """Environment for commands on Redis directly, with a tenant of this test's own."""
    return {"VPMON_REDIS_URL": api_redis.url, "VPMON_TENANT": f"cli-{request.node.name[:40]}"}


def test_enrol_verify_search_list_delete_on_redis(
    direct: dict[str, str], speakers: dict[str, list[Path]]
) -> None:
    ca, ro = speakers["tuxpaint_ca"], speakers["tuxpaint_ro"]
    enrolled = vpmon("enroll", "carla", *map(str, ca[:6]), "--site", "lisbon", "--name", "Carla", env=direct)
    assert "enrolled carla" in enrolled.stdout and "site lisbon" in enrolled.stdout
    assert ca[0].name in enrolled.stdout  # one line per recording, with its quality figures
    vpmon("enroll", "rui", *map(str, ro[:6]), "--site", "porto", "--json", env=direct)

    again = vpmon("enroll", "carla", *map(str, ca[:6]), env=direct, check=2)
    assert "already enrolled" in again.stderr and "Traceback" not in again.stderr

    same = json.loads(vpmon("verify", "carla", str(ca[-1]), "--json", env=direct).stdout)
    assert same["verdict"]["decision"] == "MATCH"
    other = vpmon("verify", "carla", str(ro[-1]), env=direct)
    assert other.stdout.startswith("MISMATCH carla")

    found = json.loads(vpmon("search", str(ro[-1]), "--top", "2", "--json", env=direct).stdout)
    assert [hit["speaker_id"] for hit in found["hits"]] == ["rui", "carla"]
    table = vpmon("search", str(ro[-1]), "--site", "lisbon", env=direct).stdout
    assert "carla" in table and "rui" not in table

    listed = json.loads(vpmon("voiceprints", "list", "--json", env=direct).stdout)
    assert [vp["speaker_id"] for vp in listed["voiceprints"]] == ["carla", "rui"]
    vpmon("voiceprints", "delete", "rui", env=direct)
    missing = vpmon("voiceprints", "delete", "rui", env=direct, check=2)
    assert "not enrolled" in missing.stderr
    assert json.loads(vpmon("voiceprints", "list", "--json", env=direct).stdout)["total"] == 1


def test_bulk_enrolment_reports_rejects(
    direct: dict[str, str], speakers: dict[str, list[Path]], tmp_path: Path
) -> None:
    folder = tmp_path / "agents"
    for name, files in (("agent-ca", speakers["tuxpaint_ca"][:6]), ("agent-es", speakers["tuxpaint_es"][:6])):
        (folder / name).mkdir(parents=True)
        for file in files:
            (folder / name / file.name).symlink_to(file)
    (folder / "too-short").mkdir()
    (folder / "too-short" / "one.wav").symlink_to(speakers["tuxpaint_ro"][0])

    result = vpmon("enroll-bulk", str(folder), "--json", env=direct, check=1)
    summary = json.loads(result.stdout)
    assert summary["enrolled"] == 2
    assert [r["speaker_id"] for r in summary["rejected"]] == ["too-short"]
    assert "speech" in summary["rejected"][0]["error"]

    csv_file = tmp_path / "agents.csv"
    rows = ["speaker_id,path,site,display_name"]
    rows += [f"agent-ro,{path},porto,Rui" for path in speakers["tuxpaint_ro"][:6]]
    csv_file.write_text("\n".join(rows) + "\n")
    vpmon("enroll-bulk", str(csv_file), env=direct)
    listed = json.loads(vpmon("voiceprints", "list", "--site", "porto", "--json", env=direct).stdout)
    assert [(vp["speaker_id"], vp["display_name"]) for vp in listed["voiceprints"]] == [("agent-ro", "Rui")]


def test_keys_and_the_api_through_the_cli(
    vpmon_server: RunningServer, speakers: dict[str, list[Path]]
) -> None:
    direct = {"VPMON_REDIS_URL": vpmon_server.redis.url, "VPMON_TENANT": "cli-api"}
    created = vpmon("keys", "create", "--role", "admin", "--name", "ops", env=direct)
    token = created.stdout.strip()
    assert token.startswith("vpk_") and "created admin key" in created.stderr
    remote = {"VPMON_URL": vpmon_server.url, "VPMON_API_KEY": token}

    enrolled = json.loads(
        vpmon("enroll", "ana", *map(str, speakers["tuxpaint_es"][:6]), "--json", env=remote).stdout
    )
    assert enrolled["voiceprint"]["speaker_id"] == "ana"
    verdict = json.loads(
        vpmon("verify", "ana", str(speakers["tuxpaint_es"][-1]), "--json", env=remote).stdout
    )
    assert verdict["verdict"]["decision"] == "MATCH"
    # The same voiceprint is visible on Redis directly, in the key's tenant.
    assert "ana" in vpmon("voiceprints", "list", env=direct).stdout

    reader = vpmon("keys", "create", "--role", "read", "--json", env=remote)
    reader_id = json.loads(reader.stdout)["key"]["key_id"]

    def revoked_at() -> str | None:
        keys = json.loads(vpmon("keys", "list", "--json", env=direct).stdout)
        return next(k["revoked_at"] for k in keys if k["key_id"] == reader_id)

    assert revoked_at() is None
    vpmon("keys", "revoke", reader_id, env=remote)
    assert revoked_at() is not None

    refused = vpmon("voiceprints", "delete", "ana", env={**remote, "VPMON_API_KEY": "vpk_bad"}, check=2)
    assert "401" in refused.stderr and "Traceback" not in refused.stderr
    no_key = vpmon("voiceprints", "list", "--url", vpmon_server.url, env={"VPMON_API_KEY": ""}, check=2)
    assert "API key" in no_key.stderr


def test_redis_start_status_stop(tmp_path: Path) -> None:
    from tests.redis_fixtures import free_port

    env = {"VPMON_HOME": str(tmp_path / "home"), "VPMON_REDIS_PORT": str(free_port())}
    assert vpmon("redis", "status", env=env, check=1).stdout.startswith("not running")
    started = vpmon("redis", "start", env=env).stdout
    assert started.startswith("running: redis 8.") and "AOF on" in started
    try:
        assert "running" in vpmon("redis", "status", env=env).stdout
        password = (tmp_path / "home" / "redis" / "password").read_text().strip()
        assert password not in started
    finally:
        assert vpmon("redis", "stop", env=env).stdout.strip() == "stopped"
    assert vpmon("redis", "status", env=env, check=1).stdout.startswith("not running")


def test_config_masks_the_redis_password() -> None:
    shown = vpmon("config", env={"VPMON_REDIS_URL": "redis://:hunter2@db:6379/0", "VPMON_PORT": "9001"})
    settings = json.loads(shown.stdout)
    assert settings["redis_url"] == "redis://:***@db:6379/0" and settings["port"] == 9001
    assert "hunter2" not in shown.stdout


def test_config_show_masks_every_secret_from_env_and_toml(tmp_path: Path) -> None:
    secrets = {
        "VPMON_REDIS_URL": "rediss://default:env-redis-password@db:6380/0",
        "VPMON_WHIP_ICE_SERVERS": json.dumps(
            [{"urls": "turn:turn.example:3478", "username": "u", "credential": "turn-credential"}]
        ),
    }
    # Every SecretStr setting, including any added later, gets a value that must not print.
    for name, field in Settings.model_fields.items():
        if SecretStr in (field.annotation, *get_args(field.annotation)):
            secrets.setdefault(f"VPMON_{name.upper()}", f"secret-{name}")
    shown = vpmon("config", "show", env={**secrets, "VPMON_CONFIG": str(tmp_path / "absent.toml")})
    for value in ("env-redis-password", "turn-credential", *secrets.values()):
        assert value not in shown.stdout
    settings = json.loads(shown.stdout)
    assert settings["redis_url"] == "rediss://default:***@db:6380/0"
    assert settings["whip_ice_servers"][0]["credential"] == "**********"

    toml = tmp_path / "vpmon.toml"
    toml.write_text('redis_url = "redis://:toml-redis-password@db:6379/0"\n')
    from_file = vpmon("config", "show", env={"VPMON_CONFIG": str(toml)})
    assert "toml-redis-password" not in from_file.stdout
    assert json.loads(from_file.stdout)["redis_url"] == "redis://:***@db:6379/0"


def test_reembed_a_whole_tenant_from_retained_audio(
    direct: dict[str, str], speakers: dict[str, list[Path]]
) -> None:
    vpmon("enroll", "kept", *map(str, speakers["tuxpaint_ca"][:6]), "--retain-audio", env=direct)
    before = json.loads(vpmon("voiceprints", "list", "--json", env=direct).stdout)["voiceprints"]
    assert vpmon("reembed", env=direct).stdout.strip() == "re-embedded 1 voiceprints with campplus-zh-en-16k"
    after = json.loads(vpmon("voiceprints", "list", "--json", env=direct).stdout)["voiceprints"]
    assert [vp["speaker_id"] for vp in after] == ["kept"] and after[0]["audio_retained"]
    assert after[0]["net_speech_seconds"] == before[0]["net_speech_seconds"]

    vpmon("enroll", "not-kept", *map(str, speakers["tuxpaint_ro"][:6]), "--no-retain-audio", env=direct)
    refused = vpmon("reembed", env=direct, check=2)
    assert "no retained audio" in refused.stderr and "not-kept" in refused.stderr
