"""Errors a user can act on. Each message says what went wrong and what to do about it.

The CLI prints any ``VpmonError`` on one line and exits with status 2; the HTTP API maps each class to a
status code (``streamer/problems.py``), so the classes below are as precise as a caller needs.
"""


class VpmonError(Exception):
    """Base class: the CLI prints the message on one line and exits with status 2."""


class AudioError(VpmonError):
    """The audio could not be read, or is not usable (empty, silent, too short, wrong format)."""


class UnsupportedAudioError(AudioError):
    """The bytes are not audio in a format vpmon reads (WAV, FLAC, OGG)."""


class AudioLimitError(AudioError):
    """The audio is readable but outside the configured limits (duration, sample rate)."""


class ModelError(VpmonError):
    """A model could not be fetched, checked, converted or loaded."""


class CalibrationError(VpmonError):
    """A trials list or calibration could not be used."""


class StoreError(VpmonError):
    """The voiceprint store or its Redis server refused, failed, or holds data that does not fit."""


class InvalidValueError(StoreError):
    """An id (tenant, speaker, site, tag, model) or a parameter (page, k) that vpmon does not accept."""


class ModelMismatchError(StoreError):
    """Voiceprints made by one model cannot be scored against embeddings of another."""


class NotFoundError(VpmonError):
    """The voiceprint, key or call asked for does not exist (for this tenant)."""


class ConflictError(VpmonError):
    """The request contradicts what is stored (e.g. enrolling a speaker id that is already enrolled)."""
