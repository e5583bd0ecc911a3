"""The HTTP API through a real running server (``vpmon serve``), a real Redis and a real HTTP client, on
real speech from the dev set."""

from __future__ import annotations

import io
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf

from streamer import api
from streamer.auth import Role
from tests.server_fixtures import RunningServer

ENROL_COUNT = 6  # utterances per enrolment: ≈ 15 s of speech (the policy wants 10 s)


def utterances(devset: Path, speaker: str) -> list[Path]:
    return sorted((devset / "wav" / speaker).glob("*.wav"))


@pytest.fixture(scope="module")
def voices(telephone_devset: Path) -> dict[str, list[Path]]:
    speakers = ["tuxpaint_ca", "tuxpaint_ro", "tuxpaint_es", "fillets_cs_big"]
    return {s: utterances(telephone_devset, s) for s in speakers}


def files(paths: list[Path], field: str = "files") -> list[tuple[str, tuple[str, bytes, str]]]:
    return [(field, (p.name, p.read_bytes(), "audio/wav")) for p in paths]


def enrol(client: httpx.Client, speaker_id: str, paths: list[Path], **data: str) -> httpx.Response:
    return client.post("/v1/voiceprints", data={"speaker_id": speaker_id, **data}, files=files(paths))


def wav_bytes(samples: np.ndarray, rate: int) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, samples, rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def assert_problem(response: httpx.Response, status: int, slug: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["type"] == f"urn:vpmon:problem:{slug}"
    assert body["status"] == status and body["title"] and body["detail"]
    return body


# --- the voiceprint service end to end -----------------------------------------------------------------
def test_enrol_verify_compare_search(vpmon_server: RunningServer, voices: dict[str, list[Path]]) -> None:
    admin = vpmon_server.client(vpmon_server.key("acme"))
    ca, ro, es = voices["tuxpaint_ca"], voices["tuxpaint_ro"], voices["tuxpaint_es"]

    created = enrol(admin, "agent-ca", ca[:ENROL_COUNT], site="lisbon", display_name="Carla", tags="day")
    assert created.status_code == 201, created.text
    body = created.json()
    assert created.headers["location"] == "/v1/voiceprints/agent-ca"
    assert body["voiceprint"]["speaker_id"] == "agent-ca" and body["voiceprint"]["site"] == "lisbon"
    assert body["voiceprint"]["model_id"] == "campplus-zh-en-16k"
    assert body["voiceprint"]["net_speech_seconds"] > 5
    assert [r["name"] for r in body["recordings"]] == [p.name for p in ca[:ENROL_COUNT]]
    assert all(r["consistency"] > r["consistency_threshold"] for r in body["recordings"])
    assert enrol(admin, "agent-ro", ro[:ENROL_COUNT], site="porto").status_code == 201
    assert enrol(admin, "agent-es", es[:ENROL_COUNT], site="lisbon").status_code == 201

    fetched = admin.get("/v1/voiceprints/agent-ca", params={"include_embedding": "true"}).json()
    assert fetched["display_name"] == "Carla" and fetched["tags"] == ["day"]
    assert len(fetched["embedding"]) == 192
    assert abs(np.linalg.norm(fetched["embedding"]) - 1) < 1e-4

    listed = admin.get("/v1/voiceprints").json()
    assert [vp["speaker_id"] for vp in listed["voiceprints"]] == ["agent-ca", "agent-es", "agent-ro"]
    assert listed["total"] == 3 and listed["voiceprints"][0]["embedding"] is None
    lisbon = admin.get("/v1/voiceprints", params={"site": "lisbon"}).json()
    assert {vp["speaker_id"] for vp in lisbon["voiceprints"]} == {"agent-ca", "agent-es"}

    # 1:1 against the enrolled voiceprint: an unseen utterance of the same speaker, and another speaker.
    same = admin.post("/v1/verify", data={"speaker_id": "agent-ca"}, files=files([ca[-1]], "file")).json()
    assert same["verdict"]["decision"] == "MATCH", same
    other = admin.post("/v1/verify", data={"speaker_id": "agent-ca"}, files=files([ro[-1]], "file")).json()
    assert other["verdict"]["decision"] == "MISMATCH", other
    assert other["verdict"]["score"] < same["verdict"]["score"]
    assert same["recording"]["name"] == ca[-1].name

    # 1:1 on two uploads.
    pair = files([ca[-2]], "first") + files([ca[-1]], "second")
    compared = admin.post("/v1/compare", files=pair).json()
    assert compared["verdict"]["decision"] == "MATCH" and len(compared["recordings"]) == 2

    # 1:N: the right speaker first and above the threshold; the site filter keeps only that site.
    found = admin.post("/v1/search", files=files([ro[-1]], "file"), data={"top_k": "3"}).json()
    assert found["hits"][0]["speaker_id"] == "agent-ro"
    assert found["hits"][0]["above_threshold"] and not found["hits"][-1]["above_threshold"]
    assert found["hits"] == sorted(found["hits"], key=lambda h: -h["score"])
    in_lisbon = admin.post("/v1/search", files=files([ro[-1]], "file"), data={"site": "lisbon"}).json()
    assert {h["speaker_id"] for h in in_lisbon["hits"]} == {"agent-ca", "agent-es"}

    # 1:N by embedding gives the same ranking as by audio, with the stored vector as the query.
    by_vector = admin.post(
        "/v1/search/by-embedding", json={"embedding": fetched["embedding"], "top_k": 2}
    ).json()
    assert by_vector["hits"][0]["speaker_id"] == "agent-ca"
    assert by_vector["hits"][0]["score"] == pytest.approx(1.0, abs=1e-4)


def test_duplicate_replace_and_delete(vpmon_server: RunningServer, voices: dict[str, list[Path]]) -> None:
    admin = vpmon_server.client(vpmon_server.key("dup"))
    ca, es = voices["tuxpaint_ca"], voices["tuxpaint_es"]
    assert enrol(admin, "a1", ca[:ENROL_COUNT]).status_code == 201
    assert_problem(enrol(admin, "a1", ca[:ENROL_COUNT]), 409, "conflict")

    replaced = admin.put("/v1/voiceprints/a1", files=files(es[:ENROL_COUNT]), data={"site": "x"})
    assert replaced.status_code == 200 and replaced.json()["replaced"] is True
    check = admin.post("/v1/verify", data={"speaker_id": "a1"}, files=files([es[-1]], "file")).json()
    assert check["verdict"]["decision"] == "MATCH"  # the new recordings' speaker, not the old one

    assert admin.delete("/v1/voiceprints/a1").status_code == 204
    assert_problem(admin.get("/v1/voiceprints/a1"), 404, "not-found")
    assert_problem(admin.delete("/v1/voiceprints/a1"), 404, "not-found")
    missing = admin.post("/v1/verify", data={"speaker_id": "a1"}, files=files([es[-1]], "file"))
    assert_problem(missing, 404, "not-found")


def test_enrolment_quality_gate_names_the_odd_recording(
    vpmon_server: RunningServer, voices: dict[str, list[Path]]
) -> None:
    admin = vpmon_server.client(vpmon_server.key("gates"))
    intruder = voices["fillets_cs_big"][6]  # a name none of the others has
    mixed = [*voices["tuxpaint_ca"][:4], intruder]
    body = assert_problem(enrol(admin, "mixed", mixed), 422, "unusable-audio")
    assert body["reason"] == "inconsistent"
    assert body["recording"] == intruder.name
    assert intruder.name in body["detail"]
    assert body["measured"] < body["limit"]
    assert admin.get("/v1/voiceprints").json()["total"] == 0  # nothing half-enrolled

    short = assert_problem(enrol(admin, "short", voices["tuxpaint_ca"][:1]), 422, "unusable-audio")
    assert short["reason"] == "too_little_speech"


def test_retained_audio_and_reembed(vpmon_server: RunningServer, voices: dict[str, list[Path]]) -> None:
    admin = vpmon_server.client(vpmon_server.key("keeper"))
    assert admin.get("/v1/tenant").json()["retain_audio"] is False
    assert admin.patch("/v1/tenant", json={"retain_audio": True}).json()["retain_audio"] is True

    created = enrol(admin, "kept", voices["tuxpaint_ro"][:ENROL_COUNT]).json()
    assert created["voiceprint"]["audio_retained"] is True
    wav_total = sum(p.stat().st_size for p in voices["tuxpaint_ro"][:ENROL_COUNT])
    assert 0 < created["audio_bytes_retained"] < wav_total  # FLAC: smaller than the WAV uploads
    before = admin.get("/v1/voiceprints/kept", params={"include_embedding": "true"}).json()["embedding"]

    rebuilt = admin.post("/v1/voiceprints/kept/reembed")
    assert rebuilt.status_code == 200, rebuilt.text
    after = admin.get("/v1/voiceprints/kept", params={"include_embedding": "true"}).json()["embedding"]
    # Lossless audio, same model: the same voiceprint.
    assert float(np.dot(before, after)) > 0.9999

    not_kept = enrol(admin, "not-kept", voices["tuxpaint_ca"][:ENROL_COUNT], retain_audio="false").json()
    assert not_kept["voiceprint"]["audio_retained"] is False
    assert_problem(admin.post("/v1/voiceprints/not-kept/reembed"), 404, "not-found")


# --- authentication, roles and tenants ---------------------------------------------------------------
def routes() -> list[tuple[str, str]]:
    """Every HTTP route the app serves (OpenAPI and docs pages aside), with path parameters filled."""
    found = []
    for route in api.router.routes:
        path = getattr(route, "path", "")
        for method in sorted(set(getattr(route, "methods", None) or ()) - {"HEAD", "OPTIONS"}):
            found.append(
                (method, path.replace("{speaker_id}", "agent-ca").replace("{key_id}", "abcdefabcdef"))
            )
    assert len(found) >= 15
    return found


@pytest.mark.parametrize(("method", "path"), routes())
def test_every_route_needs_a_valid_key(vpmon_server: RunningServer, method: str, path: str) -> None:
    for token in (None, "vpk_nonexistent00_" + "x" * 43, "not-a-key"):
        response = vpmon_server.client(token).request(method, path)
        body = assert_problem(response, 401, "unauthorized")
        assert "Bearer" in response.headers["www-authenticate"], body
    revoked = vpmon_server.keys.create("acme", Role.ADMIN, "to revoke")
    vpmon_server.keys.revoke("acme", revoked.key.key_id)
    assert_problem(vpmon_server.client(revoked.token).request(method, path), 401, "unauthorized")


def test_other_tenants_see_nothing(vpmon_server: RunningServer, voices: dict[str, list[Path]]) -> None:
    owner = vpmon_server.client(vpmon_server.key("tenant-a"))
    intruder = vpmon_server.client(vpmon_server.key("tenant-b"))
    assert enrol(owner, "secret-agent", voices["tuxpaint_es"][:ENROL_COUNT]).status_code == 201
    probe = voices["tuxpaint_es"][-1]

    assert_problem(intruder.get("/v1/voiceprints/secret-agent"), 404, "not-found")
    assert intruder.get("/v1/voiceprints").json()["total"] == 0
    assert intruder.post("/v1/search", files=files([probe], "file")).json()["hits"] == []
    assert_problem(
        intruder.post("/v1/verify", data={"speaker_id": "secret-agent"}, files=files([probe], "file")),
        404,
        "not-found",
    )
    assert_problem(intruder.delete("/v1/voiceprints/secret-agent"), 404, "not-found")
    assert_problem(intruder.post("/v1/voiceprints/secret-agent/reembed"), 404, "not-found")
    owner_keys = {k["key_id"] for k in owner.get("/v1/keys").json()}
    assert not owner_keys & {k["key_id"] for k in intruder.get("/v1/keys").json()}
    assert_problem(intruder.delete(f"/v1/keys/{sorted(owner_keys)[0]}"), 404, "not-found")
    # Still there for its owner, untouched.
    assert owner.get("/v1/voiceprints/secret-agent").status_code == 200


def test_roles(vpmon_server: RunningServer, voices: dict[str, list[Path]]) -> None:
    admin = vpmon_server.client(vpmon_server.key("roles"))
    made = admin.post("/v1/keys", json={"role": "read", "name": "dashboard"})
    assert made.status_code == 201 and made.json()["token"].startswith("vpk_")
    reader = vpmon_server.client(made.json()["token"])
    monitor = vpmon_server.client(vpmon_server.key("roles", Role.MONITOR))
    enroller = vpmon_server.client(vpmon_server.key("roles", Role.ENROL))

    assert enrol(enroller, "r1", voices["tuxpaint_ca"][:ENROL_COUNT]).status_code == 201
    assert reader.get("/v1/voiceprints/r1").status_code == 200
    assert_problem(enrol(reader, "r2", voices["tuxpaint_ca"][:ENROL_COUNT]), 403, "forbidden")
    assert_problem(reader.delete("/v1/voiceprints/r1"), 403, "forbidden")
    assert_problem(monitor.get("/v1/voiceprints"), 403, "forbidden")
    assert_problem(enroller.get("/v1/keys"), 403, "forbidden")
    assert_problem(enroller.post("/v1/voiceprints/r1/reembed"), 403, "forbidden")
    assert monitor.get("/healthz").status_code == 200

    # Revoking works at once, and the revoked key stays listed.
    key_id = made.json()["key"]["key_id"]
    assert admin.delete(f"/v1/keys/{key_id}").json()["revoked_at"]
    assert_problem(reader.get("/v1/voiceprints/r1"), 401, "unauthorized")
    assert any(k["key_id"] == key_id and k["revoked_at"] for k in admin.get("/v1/keys").json())


# --- bad input -----------------------------------------------------------------------------------------
def test_bad_audio_and_limits(vpmon_server: RunningServer, voices: dict[str, list[Path]]) -> None:
    admin = vpmon_server.client(vpmon_server.key("limits"))
    sample = voices["tuxpaint_ca"][-1]

    def verify_bytes(data: bytes, name: str = "x.wav") -> httpx.Response:
        return admin.post(
            "/v1/compare", files=[("first", (name, data)), ("second", (sample.name, sample.read_bytes()))]
        )

    assert_problem(verify_bytes(b"this is not audio at all" * 10), 415, "unsupported-audio")
    assert_problem(verify_bytes(b""), 422, "unusable-audio")
    rng = np.random.default_rng(0)
    low_rate = verify_bytes(wav_bytes(rng.uniform(-0.1, 0.1, 8000).astype(np.float32), 4000))
    assert "sample rate 4000 Hz" in assert_problem(low_rate, 422, "audio-limit")["detail"]
    speech, rate = sf.read(sample, dtype="float32")
    long = np.tile(speech, int(np.ceil(70 * rate / len(speech))))  # 70 s > the 60 s limit of this server
    assert (
        "longer than the 60 s"
        in assert_problem(verify_bytes(wav_bytes(long, rate)), 422, "audio-limit")["detail"]
    )
    silence = verify_bytes(wav_bytes(np.zeros(16000 * 3, np.float32), 16000))
    assert "no speech" in assert_problem(silence, 422, "unusable-audio")["detail"]

    # Over the body limit (3 MB on this server): refused before the upload is read.
    huge = admin.post("/v1/compare", files=[("first", ("big.wav", b"\0" * 3_200_000))])
    assert_problem(huge, 413, "too-large")

    assert_problem(enrol(admin, "bad id!", voices["tuxpaint_ca"][:ENROL_COUNT]), 422, "invalid-value")
    missing_field = admin.post("/v1/verify", files=files([sample], "file"))
    assert assert_problem(missing_field, 422, "invalid-request")["errors"]
    foreign = admin.post(
        "/v1/search/by-embedding", json={"embedding": [0.1] * 256, "model_id": "other-model"}
    )
    assert_problem(foreign, 409, "model-mismatch")
    assert_problem(admin.get("/v1/voiceprints", params={"limit": 0}), 422, "invalid-request")
    # Values the schemathesis run (tests/test_openapi_fuzz.py) once got through to Redis as 500 / 503.
    assert_problem(admin.get("/v1/voiceprints", params={"offset": 10**20}), 422, "invalid-request")
    for vector in ([0.0] * 192, [1e39] * 192):  # zero; infinite as float32
        by_vector = admin.post("/v1/search/by-embedding", json={"embedding": vector})
        assert_problem(by_vector, 422, "invalid-value")


def test_openapi_and_readiness(vpmon_server: RunningServer) -> None:
    client = vpmon_server.client(vpmon_server.key("ops", Role.MONITOR))
    ready = client.get("/readyz").json()
    assert ready["status"] == "ready" and ready["model_id"] == "campplus-zh-en-16k"
    assert ready["store_backend"] in {"vset", "ft"}
    schema = client.get("/openapi.json").json()
    assert {"/v1/voiceprints", "/v1/verify", "/v1/compare", "/v1/search"} <= set(schema["paths"])
    assert schema["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    # Errors are documented as what they are: problems (RFC 9457), for any 4xx and for 503.
    refused = schema["paths"]["/v1/verify"]["post"]["responses"]
    for status in ("4XX", "503"):
        assert refused[status]["content"] == {
            "application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}
        }
    assert schema["components"]["schemas"]["Problem"]["required"] == ["type", "title", "status", "detail"]
