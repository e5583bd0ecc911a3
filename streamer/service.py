"""The voiceprint service: the seed's operations on top of the verifier core and the store.

enrol (one or more recordings → a voiceprint, through the quality gates), 1:1 verify a recording against
an enrolled speaker, 1:1 compare two recordings, 1:N search, list / get / delete, and re-embed from
retained audio. Every method is synchronous and CPU-bound where it embeds: the HTTP layer runs them in
worker threads, the CLI calls them directly. One code path for both.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from streamer.archive import AudioArchive, TenantSettingsStore
from streamer.store import SearchHit, Voiceprint, VoiceprintStore, check_speaker, check_tenant
from streamer.voiceprint_means import TenantMeans
from verifier.adaptation import CallMaterial, updated_voiceprint
from verifier.audio import Audio, read_audio_bytes
from verifier.embedder import Embedder
from verifier.enrolment import Enrolment, EnrolmentPolicy, Recording, enrol
from verifier.errors import (
    AudioError,
    AudioLimitError,
    ConflictError,
    ModelMismatchError,
    NotFoundError,
)
from verifier.pipeline import SpeechEmbedding, VadConfig, embed_windows, prepare_speech, speech_windows
from verifier.scoring import Scorer, Verdict


@dataclass(frozen=True)
class Upload:
    """A recording as it arrived: its name (for messages) and the file's bytes."""

    name: str
    data: bytes


@dataclass(frozen=True)
class AudioLimits:
    max_seconds: float = 300.0
    min_sample_rate: int = 8000
    max_sample_rate: int = 48000


@dataclass(frozen=True)
class Side:
    """One recording of a 1:1 comparison, for the response."""

    name: str
    net_speech_seconds: float
    windows: int


@dataclass(frozen=True)
class SearchResult:
    hits: list[SearchHit]
    threshold: float
    net_speech_seconds: float | None  # of the query recording; None for a query by embedding
    model_id: str


@dataclass(frozen=True)
class EnrolResult:
    voiceprint: Voiceprint
    enrolment: Enrolment
    audio_bytes_retained: int = 0
    replaced: bool = False


@dataclass
class VoiceprintService:
    store: VoiceprintStore
    embedder: Embedder
    scorer: Scorer
    archive: AudioArchive
    tenants: TenantSettingsStore
    limits: AudioLimits = field(default_factory=AudioLimits)
    policy: EnrolmentPolicy = field(default_factory=EnrolmentPolicy)
    vad: VadConfig = field(default_factory=VadConfig)
    centring: bool = True  # centre scores on the tenant's other voiceprints (verifier/score_norm.py)
    means: TenantMeans = field(init=False)

    def __post_init__(self) -> None:
        self.means = TenantMeans(self.store)

    @property
    def model_id(self) -> str:
        return self.embedder.model_id

    # --- audio ----------------------------------------------------------------------------------
    def decode(self, upload: Upload) -> Audio:
        """Bytes → mono audio, refused with a clear error outside the configured limits."""
        audio = read_audio_bytes(upload.data, name=upload.name)
        limits = self.limits
        if not limits.min_sample_rate <= audio.sample_rate <= limits.max_sample_rate:
            raise AudioLimitError(
                f"{upload.name}: sample rate {audio.sample_rate} Hz is outside the accepted "
                f"{limits.min_sample_rate}-{limits.max_sample_rate} Hz; "
                "resample it (e.g. sox in.wav -r 16000 out.wav)"
            )
        if audio.duration > limits.max_seconds:
            raise AudioLimitError(
                f"{upload.name}: {audio.duration:.0f} s of audio is longer than the "
                f"{limits.max_seconds:.0f} s accepted per recording; cut it into shorter recordings"
            )
        return audio

    def embed(self, upload: Upload) -> SpeechEmbedding:
        audio = self.decode(upload)
        speech = prepare_speech(audio.samples, audio.sample_rate)
        windows = speech_windows(speech, self.vad, audio.sample_rate)
        if not windows:
            raise AudioError(f"no speech found in {upload.name}: it is silent, too quiet or too short")
        return embed_windows(self.embedder, windows)

    # --- enrolment ------------------------------------------------------------------------------
    def enrol(
        self,
        tenant: str,
        speaker_id: str,
        uploads: Sequence[Upload],
        *,
        site: str | None = None,
        display_name: str = "",
        tags: Sequence[str] = (),
        retain_audio: bool | None = None,
        replace: bool = False,
    ) -> EnrolResult:
        """A voiceprint from one or more recordings. ``replace=False`` refuses an existing speaker id
        (re-enrolment must be asked for); ``retain_audio=None`` follows the tenant's setting."""
        check_tenant(tenant)
        check_speaker(speaker_id)
        if not uploads:
            raise AudioLimitError("enrolment needs at least one recording")
        existing = self.store.get(tenant, speaker_id)
        if existing is not None and not replace:
            raise ConflictError(
                f"speaker {speaker_id!r} is already enrolled in tenant {tenant!r}: "
                "re-enrol it explicitly (PUT, or --replace) or delete it first"
            )
        names = _unique_names(uploads)
        audios = {name: self.decode(upload) for name, upload in zip(names, uploads, strict=True)}
        enrolment = self._enrol(audios)
        if retain_audio is None:
            retain_audio = self.tenants.get(tenant).retain_audio
        voiceprint = Voiceprint(
            tenant=tenant,
            speaker_id=speaker_id,
            vector=enrolment.vector,
            model_id=enrolment.model_id,
            site=site,
            display_name=display_name,
            tags=tuple(tags),
            net_speech_seconds=round(enrolment.net_speech_seconds, 2),
            quality=enrolment.quality(),
            audio_retained=retain_audio,
        )
        self.store.put(voiceprint)
        self.means.forget(tenant)
        retained = 0
        if retain_audio:
            retained = self.archive.replace(tenant, speaker_id, audios)
        else:
            self.archive.delete(tenant, speaker_id)  # a re-enrolment without retention drops old audio
        return EnrolResult(voiceprint, enrolment, retained, replaced=existing is not None)

    def reembed(self, tenant: str, speaker_id: str) -> EnrolResult:
        """Rebuild a voiceprint from its retained audio with the current model (keeps its metadata)."""
        old = self.get(tenant, speaker_id)
        if old.model_id != self.model_id:
            # A tenant holds one model at a time: move the whole tenant (reembed_tenant).
            raise ModelMismatchError(
                f"speaker {speaker_id!r} was enrolled with {old.model_id!r}; re-embed the whole tenant "
                f"to move it to {self.model_id!r} (vpmon reembed --tenant {tenant})"
            )
        voiceprint, enrolment = self._rebuild(old)
        self.store.put(voiceprint)
        self.means.forget(tenant)
        return EnrolResult(voiceprint, enrolment, replaced=True)

    def reembed_tenant(self, tenant: str) -> list[Voiceprint]:
        """Move a whole tenant to the current model. Every voiceprint needs retained audio; all new
        vectors are computed before anything is replaced, so a failure there leaves the tenant as it was
        (a failure while writing leaves it to be re-run: the audio is still there)."""
        old = self.list_all(tenant)
        missing = [vp.speaker_id for vp in old if not self.archive.has(tenant, vp.speaker_id)]
        if missing:
            raise NotFoundError(
                f"{len(missing)} voiceprint(s) of tenant {tenant!r} have no retained audio "
                f"({', '.join(missing[:5])}{'…' if len(missing) > 5 else ''}): "
                "re-enrol them or delete them first"
            )
        rebuilt = [self._rebuild(vp)[0] for vp in old]
        self.store.delete_tenant(tenant)
        self.store.put_many(rebuilt)
        self.means.forget(tenant)
        return rebuilt

    def _rebuild(self, old: Voiceprint) -> tuple[Voiceprint, Enrolment]:
        """A voiceprint's retained audio → the same voiceprint (metadata kept) with the current model."""
        audios = self.archive.load(old.tenant, old.speaker_id)
        if not audios:
            raise NotFoundError(
                f"no retained audio for speaker {old.speaker_id!r} in tenant {old.tenant!r}: re-enrol it "
                "from new recordings (audio is kept only when the tenant's retain_audio setting is on)"
            )
        enrolment = self._enrol(audios)
        voiceprint = replace(
            old,
            vector=enrolment.vector,
            model_id=enrolment.model_id,
            net_speech_seconds=round(enrolment.net_speech_seconds, 2),
            quality=enrolment.quality(),
            audio_retained=True,
            updates=0,  # the calls' audio is not retained: what they taught is not carried over
            updated_from_calls_seconds=0.0,
        )
        return voiceprint, enrolment

    def _enrol(self, audios: dict[str, Audio]) -> Enrolment:
        recordings = [Recording(name, a.samples, a.sample_rate) for name, a in audios.items()]
        return enrol(self.embedder, recordings, self.policy, self.scorer, self.vad)

    # --- 1:1 and 1:N ----------------------------------------------------------------------------
    def verify(self, tenant: str, speaker_id: str, upload: Upload) -> tuple[Verdict, Voiceprint, Side]:
        voiceprint = self.get(tenant, speaker_id)
        self._check_model(voiceprint.model_id)
        side = self.embed(upload)
        mean = self.centring_mean(voiceprint)
        verdict = self.scorer.verdict(voiceprint.vector, side.embedding, side.net_speech_seconds, mean)
        return verdict, voiceprint, Side(upload.name, side.net_speech_seconds, side.windows)

    def update_from_call(self, tenant: str, speaker_id: str, material: CallMaterial) -> Voiceprint | None:
        """Average a verified call into the agent's voiceprint (verifier/adaptation.py); None when the
        voiceprint has gone, changed (re-enrolled, another model, another update first), or already
        holds all the calls it may."""
        old = self.store.get(tenant, speaker_id)
        if old is None or old.model_id != self.model_id:
            return None
        updated = updated_voiceprint(
            old.vector, old.net_speech_seconds, old.updated_from_calls_seconds, material
        )
        if updated is None:
            return None
        vector, seconds = updated
        new = replace(old, vector=vector, updates=old.updates + 1, updated_from_calls_seconds=seconds)
        if not self.store.put_if_unchanged(old, new):
            return None
        self.means.forget(tenant)
        return new

    def centring_mean(self, voiceprint: Voiceprint) -> np.ndarray | None:
        """The mean of the tenant's other voiceprints to centre this one's scores on; None when centring
        is off, not calibrated for this model, or the tenant has too few other voiceprints."""
        if not self.centring or not self.scorer.can_centre() or voiceprint.model_id != self.model_id:
            return None
        means = self.means.get(voiceprint.tenant, self.model_id)
        return None if means is None else means.for_speaker(voiceprint.speaker_id, voiceprint.vector)

    def compare(self, first: Upload, second: Upload) -> tuple[Verdict, list[Side]]:
        sides = [self.embed(first), self.embed(second)]
        speech = min(side.net_speech_seconds for side in sides)
        verdict = self.scorer.verdict(sides[0].embedding, sides[1].embedding, speech)
        described = [
            Side(upload.name, side.net_speech_seconds, side.windows)
            for upload, side in zip((first, second), sides, strict=True)
        ]
        return verdict, described

    def search(
        self,
        tenant: str,
        *,
        upload: Upload | None = None,
        embedding: Sequence[float] | np.ndarray | None = None,
        model_id: str | None = None,
        k: int = 10,
        site: str | None = None,
        tags: Sequence[str] = (),
        threshold: float | None = None,
        net_speech_seconds: float = 3.0,
    ) -> SearchResult:
        """1:N: the ``k`` most similar voiceprints of the tenant to a recording or to an embedding made
        by ``model_id``. Each hit's ``score`` is compared with ``threshold`` (default: the calibrated
        threshold for the query's net speech, or ``net_speech_seconds`` for a query by embedding)."""
        if (upload is None) == (embedding is None):
            raise AudioLimitError("search needs either a recording or an embedding, not both")
        speech: float | None
        if upload is not None:
            side = self.embed(upload)
            vector, speech, model = side.embedding, side.net_speech_seconds, self.model_id
        else:
            vector, speech, model = np.asarray(embedding, dtype=np.float32), None, model_id or self.model_id
            self._check_model(model)
        hits = self.store.search(tenant, vector, model_id=model, k=k, site=site, tags=tags)
        if threshold is None:
            threshold = self.scorer.threshold(speech if speech is not None else net_speech_seconds)
        return SearchResult(hits, float(threshold), speech, model)

    # --- records --------------------------------------------------------------------------------
    def get(self, tenant: str, speaker_id: str) -> Voiceprint:
        voiceprint = self.store.get(tenant, speaker_id)
        if voiceprint is None:
            raise NotFoundError(f"speaker {speaker_id!r} is not enrolled in tenant {tenant!r}")
        return voiceprint

    def list(
        self, tenant: str, site: str | None = None, offset: int = 0, limit: int = 100
    ) -> list[Voiceprint]:
        return self.store.list(tenant, site=site, offset=offset, limit=limit)

    def list_all(self, tenant: str) -> list[Voiceprint]:
        found: list[Voiceprint] = []
        while page := self.store.list(tenant, offset=len(found), limit=500):
            found += page
        return found

    def count(self, tenant: str, site: str | None = None) -> int:
        return self.store.count(tenant, site=site)

    def delete(self, tenant: str, speaker_id: str) -> bool:
        """The voiceprint and its retained audio; False if neither existed."""
        deleted = self.store.delete(tenant, speaker_id)
        self.means.forget(tenant)
        audio_deleted = self.archive.delete(tenant, speaker_id)
        return deleted or audio_deleted

    def _check_model(self, model_id: str) -> None:
        if model_id != self.model_id:
            raise ModelMismatchError(
                f"the voiceprint was made by model {model_id!r}, this server embeds with {self.model_id!r}: "
                "scores across models mean nothing. Re-embed the tenant (vpmon reembed) or serve that model"
            )


def _unique_names(uploads: Sequence[Upload]) -> list[str]:
    """Recording names key the retained audio and name the odd one out: keep them distinct."""
    names: list[str] = []
    for upload in uploads:
        name, n = upload.name or "recording", 1
        while name in names:
            n += 1
            name = f"{upload.name or 'recording'} ({n})"
        names.append(name)
    return names
