"""API keys: each bound to one tenant and one role, stored hashed in Redis.

A key looks like ``vpk_<key id>_<secret>``; the key id is public (it names the key in lists and logs),
the secret is 32 random bytes. Redis keeps only the SHA-256 of the secret: a leaked Redis dump gives
no working key. (A slow password hash buys nothing for 256-bit random secrets, and would cost every
request.) Lookups are by key id, and the hash is compared in constant time.

Roles, from most to least power; each route names the permission it needs (``ROLE_PERMISSIONS``):

- ``admin``: everything in its tenant, including keys and tenant settings;
- ``enrol``: create, replace and delete voiceprints, and all that ``read`` may;
- ``read``: list and fetch voiceprints, 1:1 verify and compare, 1:N search;
- ``monitor``: stream live calls, read the alert feed, acknowledge alerts (telephony, supervisors).

Redis layout: ``vpkey:<key id>`` is a HASH (tenant, role, name, secret_sha256, created_at,
revoked_at); ``vpkeys:{<tenant>}`` is the SET of a tenant's key ids, for listing.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum

import redis

from streamer.store import check_tenant
from verifier.errors import InvalidValueError, NotFoundError

KEY_PREFIX = "vpk_"
_TOKEN_RE = re.compile(r"vpk_([a-z0-9]{12})_([A-Za-z0-9_-]{43})")
_NAME_RE = re.compile(r"[\w .:@+-]{0,64}")


class Role(StrEnum):
    ADMIN = "admin"
    ENROL = "enrol"
    READ = "read"
    MONITOR = "monitor"


class Permission(StrEnum):
    HEALTH = "health"  # liveness, readiness: any valid key
    READ_VOICEPRINTS = "read_voiceprints"  # list, get, verify, compare, search
    WRITE_VOICEPRINTS = "write_voiceprints"  # enrol, re-enrol, delete
    MONITOR = "monitor"  # live calls, alert feed, acknowledgements
    ADMIN = "admin"  # keys, tenant settings, re-embedding


ROLE_PERMISSIONS: dict[Role, frozenset[Permission]] = {
    Role.ADMIN: frozenset(Permission),
    Role.ENROL: frozenset({Permission.HEALTH, Permission.READ_VOICEPRINTS, Permission.WRITE_VOICEPRINTS}),
    Role.READ: frozenset({Permission.HEALTH, Permission.READ_VOICEPRINTS}),
    Role.MONITOR: frozenset({Permission.HEALTH, Permission.MONITOR}),
}


@dataclass(frozen=True)
class ApiKey:
    """What is known about a key, never its secret."""

    key_id: str
    tenant: str
    role: Role
    name: str
    created_at: str
    revoked_at: str | None = None

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None

    def can(self, permission: Permission) -> bool:
        return not self.revoked and permission in ROLE_PERMISSIONS[self.role]

    def to_dict(self) -> dict[str, object]:
        return {
            "key_id": self.key_id,
            "tenant": self.tenant,
            "role": self.role.value,
            "name": self.name,
            "created_at": self.created_at,
            "revoked_at": self.revoked_at,
        }


@dataclass(frozen=True)
class NewKey:
    """A key just created: the only time its token is known."""

    key: ApiKey
    token: str


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def parse_role(role: str) -> Role:
    try:
        return Role(role)
    except ValueError:
        raise InvalidValueError(
            f"unknown role {role!r}: use one of {', '.join(r.value for r in Role)}"
        ) from None


class KeyStore:
    def __init__(self, client: redis.Redis) -> None:
        self.client = client

    @staticmethod
    def _key(key_id: str) -> str:
        return f"vpkey:{key_id}"

    @staticmethod
    def _index(tenant: str) -> str:
        return f"vpkeys:{{{tenant}}}"

    def create(self, tenant: str, role: Role | str, name: str = "") -> NewKey:
        check_tenant(tenant)
        role = parse_role(role) if isinstance(role, str) else role
        if not _NAME_RE.fullmatch(name):
            raise InvalidValueError(
                f"invalid key name {name!r}: up to 64 letters, digits, spaces and _ . : @ + -"
            )
        key_id = "".join(secrets.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(12))
        secret = secrets.token_urlsafe(32)  # 43 characters
        key = ApiKey(key_id, tenant, role, name, datetime.now(UTC).isoformat(timespec="seconds"))
        pipe = self.client.pipeline(transaction=False)  # two slots in a cluster: no MULTI
        pipe.hset(
            self._key(key_id),
            mapping={
                "tenant": tenant,
                "role": role.value,
                "name": name,
                "secret_sha256": _hash(secret),
                "created_at": key.created_at,
            },
        )
        pipe.sadd(self._index(tenant), key_id)
        pipe.execute()
        return NewKey(key, f"{KEY_PREFIX}{key_id}_{secret}")

    def authenticate(self, token: str) -> ApiKey | None:
        """The key a token belongs to, or None for a malformed, unknown, wrong or revoked token."""
        match = _TOKEN_RE.fullmatch(token)
        if match is None:
            return None
        key_id, secret = match.groups()
        fields = self.client.hgetall(self._key(key_id))
        if not fields:
            return None
        if not hmac.compare_digest(fields[b"secret_sha256"].decode(), _hash(secret)):
            return None
        key = _api_key(key_id, fields)
        return None if key.revoked else key

    def get(self, tenant: str, key_id: str) -> ApiKey:
        fields = self.client.hgetall(self._key(key_id)) if re.fullmatch(r"[a-z0-9]{12}", key_id) else {}
        if not fields or fields[b"tenant"].decode() != tenant:
            raise NotFoundError(f"no key {key_id!r} in tenant {tenant!r}")
        return _api_key(key_id, fields)

    def list(self, tenant: str) -> list[ApiKey]:
        ids = sorted(i.decode() for i in self.client.smembers(self._index(check_tenant(tenant))))
        pipe = self.client.pipeline(transaction=False)
        for key_id in ids:
            pipe.hgetall(self._key(key_id))
        return [
            _api_key(key_id, fields)
            for key_id, fields in zip(ids, pipe.execute(), strict=True)
            if fields and fields[b"tenant"].decode() == tenant
        ]

    def revoke(self, tenant: str, key_id: str) -> ApiKey:
        """Revoked keys stay listed (who had access, and until when) but never authenticate again."""
        key = self.get(tenant, key_id)
        if key.revoked:
            return key
        revoked_at = datetime.now(UTC).isoformat(timespec="seconds")
        self.client.hset(self._key(key_id), "revoked_at", revoked_at)
        return ApiKey(key.key_id, key.tenant, key.role, key.name, key.created_at, revoked_at)


def _api_key(key_id: str, fields: dict[bytes, bytes]) -> ApiKey:
    revoked = fields.get(b"revoked_at")
    return ApiKey(
        key_id=key_id,
        tenant=fields[b"tenant"].decode(),
        role=Role(fields[b"role"].decode()),
        name=fields.get(b"name", b"").decode(),
        created_at=fields[b"created_at"].decode(),
        revoked_at=revoked.decode() if revoked else None,
    )
