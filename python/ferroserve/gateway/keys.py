"""API keys and workspaces: generation, hashing, and the checks made on every request.

A key is `<prefix><43 url-safe characters>` made from 32 bytes of `secrets`. Only its SHA-256
is stored. A fast hash is the right choice here (unlike passwords): with 256 bits of entropy
there is nothing to brute-force, and a slow KDF would cost milliseconds on every request.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import secrets
from dataclasses import dataclass

DEFAULT_KEY_PREFIX = "fs-"


@dataclass(slots=True)
class Workspace:
    name: str
    monthly_budget_usd: float | None = None
    capture_prompts: bool = False


@dataclass(slots=True)
class ApiKey:
    id: str
    workspace: str
    hint: str  # the prefix and first characters, for `keys list`; never enough to use
    rpm: int | None = None
    tpm: int | None = None
    models: frozenset[str] | None = None  # None: every model
    expires_at: float | None = None
    admin: bool = False
    created_at: float = 0.0
    revoked_at: float | None = None
    secret_sha256: str = ""

    def state(self, now: float) -> str:
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and now >= self.expires_at:
            return "expired"
        return "active"

    def allows(self, names: tuple[str, ...]) -> bool:
        """Whether the key may use a model known under any of `names` (canonical + aliases)."""
        return self.models is None or not self.models.isdisjoint(names)

    def public(self, now: float) -> dict:
        return {
            "id": self.id, "object": "api_key", "workspace": self.workspace, "hint": self.hint,
            "rpm": self.rpm, "tpm": self.tpm, "models": sorted(self.models) if self.models is not None else None,
            "expires_at": self.expires_at, "admin": self.admin, "created_at": self.created_at,
            "revoked_at": self.revoked_at, "status": self.state(now),
        }


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_secret(prefix: str) -> str:
    return prefix + secrets.token_urlsafe(32)


def new_key_id() -> str:
    return "key_" + secrets.token_hex(6)


def parse_expiry(text: str) -> float:
    """`2027-01-31` (end of that day, UTC) or an ISO date-time (UTC unless it says otherwise)."""
    try:
        if len(text) == 10:
            day = _dt.date.fromisoformat(text)
            return _dt.datetime(day.year, day.month, day.day, tzinfo=_dt.timezone.utc).timestamp() + 86400
        moment = _dt.datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"expiry must be a date (YYYY-MM-DD) or an ISO date-time, got {text!r}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=_dt.timezone.utc)
    return moment.timestamp()


def make_key(*, workspace: str, prefix: str, rpm: int | None = None, tpm: int | None = None,
             models: list[str] | None = None, expires_at: float | None = None, admin: bool = False,
             now: float) -> tuple[str, ApiKey]:
    """A new key: (the secret, shown once; its record, which holds only the hash)."""
    if not workspace:
        raise ValueError("workspace must not be empty")
    for name, value in (("rpm", rpm), ("tpm", tpm)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be at least 1")
    secret = new_secret(prefix)
    key = ApiKey(
        id=new_key_id(), workspace=workspace, hint=secret[: len(prefix) + 4] + "…", rpm=rpm, tpm=tpm,
        models=frozenset(m for m in models if m) if models else None, expires_at=expires_at, admin=admin,
        created_at=now, secret_sha256=hash_secret(secret),
    )
    return secret, key
