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


class TenantSettingsStore:
    def __init__(self, client: redis.Redis) -> None:
        self.client = client

    @staticmethod
    def _key(tenant: str) -> str:
        return f"vptenant:{{{check_tenant(tenant)}}}"

    def get(self, tenant: str) -> TenantSettings:
        retain = self.client.hget(self._key(tenant), "retain_audio")
        return TenantSettings(retain_audio=retain == b"1")

    def update(self, tenant: str, *, retain_audio: bool | None = None) -> TenantSettings:
        if retain_audio is not None:
            self.client.hset(self._key(tenant), "retain_audio", "1" if retain_audio else "0")
        return self.get(tenant)


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
