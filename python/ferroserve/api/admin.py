"""`/v1/admin/keys`: the `ferroserve keys` commands over HTTP (admin keys only)."""

from __future__ import annotations

import os
import time

import msgspec

from ferroserve.errors import ApiError, from_validation, invalid
from ferroserve.gateway import keys as keymod
from ferroserve.gateway.gate import Gateway, Ticket

_encode = msgspec.json.Encoder().encode


class CreateKey(msgspec.Struct, forbid_unknown_fields=True):
    workspace: str
    rpm: int | None = None
    tpm: int | None = None
    budget_usd: float | None = None
    models: list[str] | None = None
    expires: str | None = None  # YYYY-MM-DD or an ISO date-time
    admin: bool = False
    capture_prompts: bool | None = None


_decoder = msgspec.json.Decoder(CreateKey)


def list_keys(gateway: Gateway) -> bytes:
    now = time.time()
    return _encode({"object": "list", "data": [k.public(now) for k in gateway._keys_by_id.values()]})


def get_key(gateway: Gateway, key_id: str) -> bytes:
    key = gateway.key_by_id(key_id)
    if key is None:
        raise ApiError(404, f"No API key {key_id!r}.", param="id", code="not_found")
    return _encode(key.public(time.time()))


async def create_key(gateway: Gateway, body: bytes) -> bytes:
    try:
        req = _decoder.decode(body)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise from_validation(exc) from None
    if req.budget_usd is not None and req.budget_usd < 0:
        raise invalid("budget_usd must not be negative.", param="budget_usd")
    try:
        expires_at = keymod.parse_expiry(req.expires) if req.expires else None
        secret, key = keymod.make_key(
            workspace=req.workspace, prefix=os.environ.get("FERROSERVE_KEY_PREFIX") or keymod.DEFAULT_KEY_PREFIX,
            rpm=req.rpm, tpm=req.tpm, models=req.models, expires_at=expires_at, admin=req.admin, now=time.time(),
        )
    except ValueError as exc:
        raise invalid(str(exc)) from None

    def write(store):
        # The budget first: another replica that loads the key must find it (see cli.py).
        store.upsert_workspace(key.workspace, monthly_budget_usd=req.budget_usd, capture_prompts=req.capture_prompts)
        store.insert_key(key)
        return store.keys(), store.workspaces()

    gateway.replace_keys(*await gateway.call(write))
    return _encode({**key.public(time.time()), "key": secret})


async def revoke_key(gateway: Gateway, ticket: Ticket, key_id: str) -> bytes:
    # The key making the request cannot revoke itself: that would lock its holder out (revoke
    # it with another admin key, or the CLI).
    if ticket.key is not None and ticket.key.id == key_id:
        raise invalid("An API key cannot revoke itself; use another admin key or `ferroserve keys revoke`.", param="id",
                      code="cannot_revoke_self")
    def write(store):
        return store.revoke_key(key_id), store.keys(), store.workspaces()

    revoked, keys, workspaces = await gateway.call(write)
    gateway.replace_keys(keys, workspaces)
    if not revoked:
        raise ApiError(404, f"No active API key {key_id!r}.", param="id", code="not_found")
    key = gateway.key_by_id(key_id)
    return _encode(key.public(time.time()) if key is not None else {"id": key_id, "status": "revoked"})
