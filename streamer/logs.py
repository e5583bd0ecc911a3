"""Structured logs: one JSON object per line, with the call id on every line about a call.

``vpmon serve`` installs this for its own loggers and uvicorn's. Pass ``extra={"call_id": …,
"tenant": …}`` to a log call to tag it. Secrets never go in: API keys are logged by key id only, and
protocol metadata (phone numbers) is not logged.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

_TAGS = ("call_id", "tenant", "protocol", "agent_id", "key_id")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for tag in _TAGS:
            value = getattr(record, tag, None)
            if value is not None:
                line[tag] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
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
