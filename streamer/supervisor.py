"""The supervisor page: static HTML, CSS and JavaScript modules from ``streamer/static/``, served by the
gateway at ``/supervisor/`` (no CDN, no build step).

The files are public; they hold no data. The page asks for a monitor key, keeps it in the tab's
sessionStorage, and sends it as ``Authorization: Bearer`` on every data request, the SSE feeds included
(read with fetch(), since EventSource cannot send headers), so keys never appear in URLs or logs.
``publish.html`` next to it publishes the browser's microphone to ``POST /v1/whip``, to try WebRTC ingest.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).resolve().parent / "static"


def mount_supervisor_page(app: FastAPI) -> None:
    app.mount("/supervisor", StaticFiles(directory=STATIC_DIR, html=True), name="supervisor")

    @app.get("/", include_in_schema=False)
    async def home() -> RedirectResponse:
        return RedirectResponse("/supervisor/")
