"""Signed result URLs: HMAC-SHA-256 over the path and the expiry, with a key shared by every
process on the database (`server_secrets`), so any replica can check a URL another signed."""

from __future__ import annotations

import hashlib
import hmac
import time

from ferroserve.errors import ApiError

RESULT_URL_TTL_S = 24 * 3600
KEY_NAME = "result_urls"
# Where a batch's results are served (the path that is signed, whatever the base URL).
RESULTS_PREFIX = "/v1/batch-results/"


def signature(key: str, path: str, expires: int) -> str:
    return hmac.new(key.encode(), f"{path}\n{expires}".encode(), hashlib.sha256).hexdigest()


def signed_query(key: str, path: str, now: float) -> tuple[str, int]:
    expires = int(now) + RESULT_URL_TTL_S
    return f"expires={expires}&signature={signature(key, path, expires)}", expires


def results_url(key: str, base_url: str, batch_id: str, now: float) -> tuple[str, int]:
    """A batch's signed results URL under `base_url` (`scheme://host[:port]`, as clients reach
    this server), and when it expires."""
    path = RESULTS_PREFIX + batch_id
    query, expires = signed_query(key, path, now)
    return f"{base_url}{path}?{query}", expires


def check(key: str, path: str, params: dict[str, str], now: float | None = None) -> None:
    """403 unless `params` carry a valid, unexpired signature for `path`."""
    expires_text, given = params.get("expires", ""), params.get("signature", "")
    # isascii: "²".isdigit() is true and int("²") fails; compare_digest refuses non-ASCII str
    # (both were 500s).
    if not (expires_text.isascii() and expires_text.isdigit()) or not given or not given.isascii():
        raise ApiError(403, "This URL is not signed.", type="permission_error", code="invalid_signature")
    expires = int(expires_text)
    if not hmac.compare_digest(signature(key, path, expires), given):
        raise ApiError(403, "The URL's signature does not match.", type="permission_error", code="invalid_signature")
    if (now if now is not None else time.time()) >= expires:
        raise ApiError(403, "This URL has expired; ask GET /v1/batch/{id}/results for a new one.",
                       type="permission_error", code="url_expired")
