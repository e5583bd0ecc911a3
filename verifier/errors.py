"""Errors a user can act on. Each message says what went wrong and what to do about it."""


class VpmonError(Exception):
    """Base class: the CLI prints the message on one line and exits with status 2."""


class AudioError(VpmonError):
    """The audio could not be read, or is not usable (empty, silent, too short, wrong format)."""


class ModelError(VpmonError):
    """A model could not be fetched, checked, converted or loaded."""


class CalibrationError(VpmonError):
    """A trials list or calibration could not be used."""


class StoreError(VpmonError):
    """The voiceprint store or its Redis server refused, failed, or holds data that does not fit."""
