"""The container's health check: ``python -m streamer.healthcheck`` exits 0 when the gateway answers.

``/healthz`` needs an API key, like every route. With ``VPMON_HEALTHCHECK_KEY`` set, the check wants
``200`` (the key works, so Redis answers too); without it, the ``401`` for a keyless request is enough:
uvicorn answers HTTP only once the app has started (Redis reached, the model loaded), so an answer at
all means the process is up and serving. Anything else (no answer, a 5xx) exits 1.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request

TIMEOUT_S = 4.0


def healthz_url() -> str:
    host = os.environ.get("VPMON_HOST", "127.0.0.1")
    if host in ("0.0.0.0", "::", ""):  # listening everywhere: loopback reaches it
        host = "127.0.0.1"
    return f"http://{host}:{os.environ.get('VPMON_PORT', '8080')}/healthz"


def check(url: str, key: str | None) -> tuple[bool, str]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            return True, f"{url}: {response.status}"
    except urllib.error.HTTPError as exc:
        healthy = exc.code == 401 and not key
        hint = " (check VPMON_HEALTHCHECK_KEY)" if exc.code in (401, 403) and key else ""
        return healthy, f"{url}: {exc.code}{hint}"
    except OSError as exc:
        return False, f"{url}: no answer ({exc})"


def main() -> None:
    healthy, detail = check(healthz_url(), os.environ.get("VPMON_HEALTHCHECK_KEY") or None)
    print(detail)
    sys.exit(0 if healthy else 1)


if __name__ == "__main__":
    main()
