"""Structured logs: one JSON object per line, with the call id on every line about a call.

``vpmon serve`` installs this for its own loggers and uvicorn's. Pass ``extra={"call_id": …,
"tenant": …}`` to a log call to tag it. Secrets never go in: API keys are logged by key id only, and
protocol metadata (phone numbers) is not logged.

What others write is scrubbed on its way out (``scrub``), whatever the logger and level: uvicorn prints
request paths with their query strings (where a careless client puts its key), and at debug level the
websockets library prints every upgrade request's headers (Authorization, X-API-KEY, the signatures).
"""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any

_TAGS = ("call_id", "tenant", "protocol", "agent_id", "key_id")

_SECRET_HEADERS = (
    "authorization|proxy-authorization|x-api-key|x-twilio-signature|signature-input|signature|"
    "cookie|set-cookie"
)
_KEY_ID = re.compile(r"vpk_[a-z0-9]{12}_")


def _mask_key(match: re.Match[str]) -> str:
    key_id = _KEY_ID.match(match.group(0))
    return (key_id.group(0) if key_id else "vpk_") + "***"


_SCRUBS: tuple[tuple[re.Pattern[str], Any], ...] = (
    # A header line, as the websockets library prints them at debug level: "< authorization: Bearer …".
    (re.compile(rf"(?i)\b({_SECRET_HEADERS})[ \t]*:[^\r\n]*"), r"\1: ***"),
    # Query-string values, as uvicorn prints paths: "GET /v1/voiceprints?api_key=*** HTTP/1.1".
    (re.compile(r"([?&][^=&\s\"'#]*=)[^&\s\"'#]*"), r"\1***"),
    # The password in a URL (a Redis URL in an error message).
    (re.compile(r"(?i)(\b[a-z][a-z0-9+.-]*://[^/\s:@]*:)[^@\s/]*@"), r"\1***@"),
    # vpmon's own secrets, wherever else they turn up; an API key keeps its key id, which is public.
    (re.compile(r"\bvpk_[A-Za-z0-9_-]+"), _mask_key),
    (re.compile(r"\bwhsec_[A-Za-z0-9+/=_-]+"), "whsec_***"),
    (re.compile(r"(?i)\b(bearer|basic) +(?!realm=)[^\s\"',;]+"), r"\1 ***"),
)


def scrub(text: str) -> str:
    """``text`` with every secret it may carry masked (the patterns above)."""
    for pattern, replacement in _SCRUBS:
        text = pattern.sub(replacement, text)
    return text


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": scrub(record.getMessage()),
        }
        for tag in _TAGS:
            value = getattr(record, tag, None)
            if value is not None:
                line[tag] = value
        if record.exc_info:
            line["exception"] = scrub(self.formatException(record.exc_info))
        return json.dumps(line, ensure_ascii=False, default=str)


def log_config(level: str = "info") -> dict[str, Any]:
    """A ``logging.config.dictConfig`` for the server (uvicorn takes it as ``log_config``)."""
    handler = {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}
    loggers = {name: {"handlers": ["json"], "level": level.upper(), "propagate": False}
               for name in ("vpmon", "uvicorn", "uvicorn.error", "uvicorn.access")}  # fmt: skip
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": JsonFormatter}},
        "handlers": {"json": handler},
        "loggers": loggers,
    }


def configure(level: str = "info") -> None:
    """For commands that log outside uvicorn."""
    import logging.config

    logging.config.dictConfig(log_config(level))
    sys.stderr.flush()
