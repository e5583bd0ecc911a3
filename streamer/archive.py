"""Retained enrolment audio and per-tenant settings, in Redis next to the voiceprints.

The seed system kept the audio of every voiceprint; vpmon keeps it only for tenants that opt in
(``retain_audio``), because it is personal data and because a voiceprint alone cannot be rebuilt for
a new model: re-embedding (``vpmon reembed``) needs the recordings. Audio is stored as 16-bit FLAC at
its original sample rate (lossless, about half the size of PCM), one HASH per speaker,
``vpaudio:{<tenant>}:<speaker id>`` (field = recording name, value = FLAC bytes), and deleted with
the voiceprint.
"""

from __future__ import annotations

from dataclasses import dataclass

import redis

from streamer.store import check_speaker, check_tenant
from verifier.audio import Audio, encode_flac, read_audio_bytes


@dataclass(frozen=True)
class TenantSettings:
    retain_audio: bool = False
    voiceprint_updates: bool = False  # agents' verified calls update their voiceprints (opt-in)
    twilio_auth_token_set: bool = False  # the secrets themselves are never read back through the API
    audiohook_client_secret_set: bool = False


class TenantSettingsStore:
    """Per-tenant settings in ``vptenant:{<tenant>}``: audio retention, voiceprint updates from verified
    calls, and the secrets telephony
    platforms sign with (the Twilio auth token; the AudioHook client secret, base64)."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client

    @staticmethod
    def _key(tenant: str) -> str:
        return f"vptenant:{{{check_tenant(tenant)}}}"

    def get(self, tenant: str) -> TenantSettings:
        fields = self.client.hgetall(self._key(tenant))
        return TenantSettings(
            retain_audio=fields.get(b"retain_audio") == b"1",
            voiceprint_updates=fields.get(b"voiceprint_updates") == b"1",
            twilio_auth_token_set=bool(fields.get(b"twilio_auth_token")),
            audiohook_client_secret_set=bool(fields.get(b"audiohook_client_secret")),
        )

    def update(
        self,
        tenant: str,
        *,
        retain_audio: bool | None = None,
        voiceprint_updates: bool | None = None,
        twilio_auth_token: str | None = None,
        audiohook_client_secret: str | None = None,
    ) -> TenantSettings:
        """None leaves a setting as it is; an empty string removes a secret."""
        changes: dict[str, str] = {}
        for name, flag in (("retain_audio", retain_audio), ("voiceprint_updates", voiceprint_updates)):
            if flag is not None:
                changes[name] = "1" if flag else "0"
        for name, value in (
            ("twilio_auth_token", twilio_auth_token),
            ("audiohook_client_secret", audiohook_client_secret),
        ):
            if value is not None:
                changes[name] = value
        if changes:
            self.client.hset(self._key(tenant), mapping=changes)
        return self.get(tenant)

    def twilio_auth_token(self, tenant: str) -> str | None:
        value = self.client.hget(self._key(tenant), "twilio_auth_token")
        return value.decode() if value else None

    def audiohook_client_secret(self, tenant: str) -> str | None:
        value = self.client.hget(self._key(tenant), "audiohook_client_secret")
        return value.decode() if value else None


class AudioArchive:
    def __init__(self, client: redis.Redis) -> None:
        self.client = client

    @staticmethod
    def _key(tenant: str, speaker_id: str) -> str:
        return f"vpaudio:{{{check_tenant(tenant)}}}:{check_speaker(speaker_id)}"

    def replace(self, tenant: str, speaker_id: str, recordings: dict[str, Audio]) -> int:
        """Keep exactly these recordings for the speaker; returns the bytes stored."""
        encoded = {name: encode_flac(audio) for name, audio in recordings.items()}
        pipe = self.client.pipeline(transaction=True)
        pipe.delete(self._key(tenant, speaker_id))
        if encoded:
            pipe.hset(self._key(tenant, speaker_id), mapping=encoded)
        pipe.execute()
        return sum(len(data) for data in encoded.values())

    def load(self, tenant: str, speaker_id: str) -> dict[str, Audio]:
        stored = self.client.hgetall(self._key(tenant, speaker_id))
        return {
            name.decode(): read_audio_bytes(data, name=name.decode()) for name, data in sorted(stored.items())
        }

    def has(self, tenant: str, speaker_id: str) -> bool:
        return bool(self.client.exists(self._key(tenant, speaker_id)))

    def delete(self, tenant: str, speaker_id: str) -> bool:
        return bool(self.client.delete(self._key(tenant, speaker_id)))
