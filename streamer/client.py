"""The voiceprint operations the CLI offers, two ways: on Redis directly (``LocalClient``) or through a
running server's HTTP API (``HttpClient``, ``--url``). Both return the API's JSON bodies, so the CLI
prints one shape whichever way it went.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import httpx

from streamer.api import (
    CompareOut,
    EnrolOut,
    HitOut,
    KeyOut,
    NewKeyOut,
    SearchOut,
    SideOut,
    VerdictOut,
    VerifyOut,
    VoiceprintOut,
    VoiceprintPage,
)
from streamer.auth import KeyStore, Role
from streamer.service import Upload, VoiceprintService
from verifier.errors import (
    AudioError,
    ConflictError,
    ModelMismatchError,
    NotFoundError,
    StoreError,
    UnsupportedAudioError,
    VpmonError,
)

JSON = dict[str, Any]


class VoiceprintClient(Protocol):
    def enrol(
        self,
        speaker_id: str,
        files: list[Path],
        *,
        site: str | None,
        display_name: str,
        tags: list[str],
        retain_audio: bool | None,
        replace: bool,
    ) -> JSON: ...
    def verify(self, speaker_id: str, file: Path) -> JSON: ...
    def compare(self, first: Path, second: Path) -> JSON: ...
    def search(self, file: Path, *, top_k: int, site: str | None, threshold: float | None) -> JSON: ...
    def list(self, *, site: str | None, offset: int, limit: int) -> JSON: ...
    def delete(self, speaker_id: str) -> None: ...
    def reembed(self, speaker_id: str) -> JSON: ...
    def create_key(self, role: Role, name: str) -> JSON: ...
    def list_keys(self) -> list[JSON]: ...
    def revoke_key(self, key_id: str) -> JSON: ...


def _upload(path: Path) -> Upload:
    if not path.is_file():
        raise AudioError(f"audio file not found: {path} (check the path)")
    return Upload(path.name, path.read_bytes())


class LocalClient:
    """Straight to Redis, for one tenant (what an operator on the server's machine uses)."""

    def __init__(self, service: VoiceprintService, keys: KeyStore, tenant: str) -> None:
        self.service = service
        self.keys = keys
        self.tenant = tenant

    def enrol(self, speaker_id: str, files: list[Path], **options: Any) -> JSON:
        uploads = [_upload(path) for path in files]
        return EnrolOut.of(self.service.enrol(self.tenant, speaker_id, uploads, **options)).model_dump()

    def verify(self, speaker_id: str, file: Path) -> JSON:
        verdict, _, side = self.service.verify(self.tenant, speaker_id, _upload(file))
        return VerifyOut(
            speaker_id=speaker_id, verdict=VerdictOut.of(verdict), recording=SideOut.of(side)
        ).model_dump()

    def compare(self, first: Path, second: Path) -> JSON:
        verdict, sides = self.service.compare(_upload(first), _upload(second))
        return CompareOut(
            verdict=VerdictOut.of(verdict), recordings=[SideOut.of(s) for s in sides]
        ).model_dump()

    def search(self, file: Path, *, top_k: int, site: str | None, threshold: float | None) -> JSON:
        result = self.service.search(
            self.tenant, upload=_upload(file), k=top_k, site=site, threshold=threshold
        )
        return SearchOut(
            hits=[HitOut.of(hit, result.threshold) for hit in result.hits],
            threshold=round(result.threshold, 4),
            net_speech_seconds=result.net_speech_seconds,
            model_id=result.model_id,
        ).model_dump()

    def list(self, *, site: str | None, offset: int, limit: int) -> JSON:
        page = self.service.list(self.tenant, site, offset, limit)
        return VoiceprintPage(
            voiceprints=[VoiceprintOut.of(vp) for vp in page],
            total=self.service.count(self.tenant, site),
            offset=offset,
            limit=limit,
        ).model_dump()

    def delete(self, speaker_id: str) -> None:
        if not self.service.delete(self.tenant, speaker_id):
            raise NotFoundError(f"speaker {speaker_id!r} is not enrolled in tenant {self.tenant!r}")

    def reembed(self, speaker_id: str) -> JSON:
        return EnrolOut.of(self.service.reembed(self.tenant, speaker_id)).model_dump()

    def create_key(self, role: Role, name: str) -> JSON:
        new = self.keys.create(self.tenant, role, name)
        return NewKeyOut(key=KeyOut(**new.key.to_dict()), token=new.token).model_dump()  # type: ignore[arg-type]

    def list_keys(self) -> list[JSON]:
        return [KeyOut(**k.to_dict()).model_dump() for k in self.keys.list(self.tenant)]  # type: ignore[arg-type]

    def revoke_key(self, key_id: str) -> JSON:
        return KeyOut(**self.keys.revoke(self.tenant, key_id).to_dict()).model_dump()  # type: ignore[arg-type]


# Problem types → the error class the CLI shows (exit status 2, one line).
_PROBLEM_ERRORS: dict[str, type[VpmonError]] = {
    "unsupported-audio": UnsupportedAudioError,
    "audio-limit": AudioError,
    "unusable-audio": AudioError,
    "not-found": NotFoundError,
    "conflict": ConflictError,
    "model-mismatch": ModelMismatchError,
}


class HttpClient:
    """Through a running vpmon server; the key decides the tenant."""

    def __init__(self, url: str, key: str, timeout: float = 120.0) -> None:
        self.http = httpx.Client(
            base_url=url.rstrip("/"), headers={"Authorization": f"Bearer {key}"}, timeout=timeout
        )

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise StoreError(f"cannot reach the vpmon server at {self.http.base_url}: {exc}") from None
        if response.status_code >= 400:
            try:
                problem = response.json()
                slug = str(problem.get("type", "")).rpartition(":")[2]
                detail = problem.get("detail") or problem.get("title") or response.reason_phrase
            except ValueError:
                slug, detail = "", response.text[:200] or response.reason_phrase
            error = _PROBLEM_ERRORS.get(slug, VpmonError)
            raise error(f"server said {response.status_code}: {detail}")
        return response.json() if response.content else None

    @staticmethod
    def _files(field: str, paths: list[Path]) -> list[tuple[str, tuple[str, bytes]]]:
        return [(field, (upload.name, upload.data)) for upload in map(_upload, paths)]

    def enrol(
        self,
        speaker_id: str,
        files: list[Path],
        *,
        site: str | None,
        display_name: str,
        tags: list[str],
        retain_audio: bool | None,
        replace: bool,
    ) -> JSON:
        data: dict[str, str] = {"display_name": display_name, "tags": ",".join(tags)}
        if site is not None:
            data["site"] = site
        if retain_audio is not None:
            data["retain_audio"] = "true" if retain_audio else "false"
        if replace:
            return self._call(
                "PUT", f"/v1/voiceprints/{speaker_id}", data=data, files=self._files("files", files)
            )
        data["speaker_id"] = speaker_id
        return self._call("POST", "/v1/voiceprints", data=data, files=self._files("files", files))

    def verify(self, speaker_id: str, file: Path) -> JSON:
        return self._call(
            "POST", "/v1/verify", data={"speaker_id": speaker_id}, files=self._files("file", [file])
        )

    def compare(self, first: Path, second: Path) -> JSON:
        files = self._files("first", [first]) + self._files("second", [second])
        return self._call("POST", "/v1/compare", files=files)

    def search(self, file: Path, *, top_k: int, site: str | None, threshold: float | None) -> JSON:
        data: dict[str, str] = {"top_k": str(top_k)}
        if site is not None:
            data["site"] = site
        if threshold is not None:
            data["threshold"] = str(threshold)
        return self._call("POST", "/v1/search", data=data, files=self._files("file", [file]))

    def list(self, *, site: str | None, offset: int, limit: int) -> JSON:
        params: dict[str, Any] = {"offset": offset, "limit": limit}
        if site is not None:
            params["site"] = site
        return self._call("GET", "/v1/voiceprints", params=params)

    def delete(self, speaker_id: str) -> None:
        self._call("DELETE", f"/v1/voiceprints/{speaker_id}")

    def reembed(self, speaker_id: str) -> JSON:
        return self._call("POST", f"/v1/voiceprints/{speaker_id}/reembed")

    def create_key(self, role: Role, name: str) -> JSON:
        return self._call("POST", "/v1/keys", json={"role": role.value, "name": name})

    def list_keys(self) -> list[JSON]:
        return self._call("GET", "/v1/keys")

    def revoke_key(self, key_id: str) -> JSON:
        return self._call("DELETE", f"/v1/keys/{key_id}")
