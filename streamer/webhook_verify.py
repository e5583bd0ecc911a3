"""Standard Webhooks signatures (https://www.standardwebhooks.com), symmetric scheme ``v1``: HMAC-SHA256.

vpmon signs every webhook it sends with this module; a receiver verifies with it too. It needs nothing
beyond the Python standard library, so a receiver may copy this one file into its own code.

- The secret is ``whsec_`` + base64 of random bytes (vpmon makes 32); the HMAC key is the decoded bytes.
- The signed content is ``{webhook-id}.{webhook-timestamp}.{body}``, the body exactly as sent (bytes).
- ``webhook-signature`` is a space-separated list of ``v1,<base64 HMAC>``: during a secret rotation the
  sender signs with the new and the previous secret, and a receiver accepts any one that matches.
- A receiver refuses a timestamp more than ``tolerance`` seconds from its clock (a replayed request),
  compares signatures in constant time, and treats ``webhook-id`` as an idempotency key: a delivery that
  is retried carries the same id.

Receiver example (any framework; pass the raw body, not re-serialised JSON)::

    from webhook_verify import WebhookVerificationError, verify

    try:
        event = verify(SECRET, request.headers, raw_body)
    except WebhookVerificationError as exc:
        return 400, str(exc)
    if not seen_before(request.headers["webhook-id"]):
        handle(event)
    return 204
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Iterable, Mapping
from typing import Any

SECRET_PREFIX = "whsec_"
SIGNATURE_VERSION = "v1"
DEFAULT_TOLERANCE_SECONDS = 300


class WebhookVerificationError(ValueError):
    """The request is not a valid webhook signed with this secret; the message says why."""


def new_secret(size: int = 32) -> str:
    """A fresh signing secret: ``whsec_`` + base64 of ``size`` random bytes (the spec asks 24 to 64)."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(size)).decode()


def secret_key(secret: str) -> bytes:
    """The HMAC key of a secret, with or without its ``whsec_`` prefix."""
    encoded = secret.removeprefix(SECRET_PREFIX)
    try:
        key = base64.b64decode(encoded, validate=True)
    except binascii.Error:
        raise ValueError("a webhook secret is 'whsec_' followed by base64: copy it again") from None
    if not key:
        raise ValueError("the webhook secret is empty")
    return key


def sign(secret: str, webhook_id: str, timestamp: int, body: bytes) -> str:
    """One signature, ``v1,<base64 HMAC-SHA256 of id.timestamp.body>``."""
    content = f"{webhook_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret_key(secret), content, hashlib.sha256).digest()
    return f"{SIGNATURE_VERSION},{base64.b64encode(digest).decode()}"


def signature_header(signing_secrets: Iterable[str], webhook_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` value: one signature per secret (current first), space-separated."""
    return " ".join(sign(secret, webhook_id, timestamp, body) for secret in signing_secrets)


def verify(
    secret: str,
    headers: Mapping[str, str],
    body: bytes | str,
    tolerance: float = DEFAULT_TOLERANCE_SECONDS,
    now: float | None = None,
) -> Any:
    """Check a received webhook and return its JSON payload, or raise ``WebhookVerificationError``.

    ``headers``: the request's headers (any mapping; names are matched without regard to case);
    ``body``: the raw request body; ``tolerance``: how far (s) ``webhook-timestamp`` may be from now."""
    lowered = {name.lower(): value for name, value in headers.items()}
    webhook_id = lowered.get("webhook-id")
    timestamp_text = lowered.get("webhook-timestamp")
    signatures = lowered.get("webhook-signature")
    if not webhook_id or not timestamp_text or not signatures:
        raise WebhookVerificationError("missing webhook-id, webhook-timestamp or webhook-signature header")
    try:
        timestamp = int(timestamp_text)
    except ValueError:
        raise WebhookVerificationError(f"webhook-timestamp {timestamp_text!r} is not an integer") from None
    now = time.time() if now is None else now
    if abs(now - timestamp) > tolerance:
        raise WebhookVerificationError(
            f"webhook-timestamp is {now - timestamp:+.0f} s from now (tolerance {tolerance:.0f} s): "
            "a replay, or a clock out of sync"
        )
    raw = body.encode() if isinstance(body, str) else body
    expected = sign(secret, webhook_id, timestamp, raw).encode()
    # Every offered signature is compared (constant time each), so timing says nothing about which matched.
    matched = False
    for offered in signatures.split(" "):
        matched |= hmac.compare_digest(offered.encode(), expected)
    if not matched:
        raise WebhookVerificationError("no webhook-signature matches this secret and body")
    return json.loads(raw)
