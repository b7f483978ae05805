"""Batch webhooks: `POST {event, batch_id, status, totals}` signed with the workspace's secret.

The signature is `sha256=<hex>` of HMAC-SHA-256 over the exact body bytes, sent as
`X-Ferroserve-Signature` and under NUREV's header name `X-NUREV-Signature`. A delivery that
does not get a 2xx is retried with exponential backoff and full jitter, `MAX_ATTEMPTS` times
in all; every attempt is stored (`GET /v1/batch/{id}/webhook-deliveries`) together with the
batch's webhook state, so a process that takes the batch over carries on where it stopped.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import random
import time

import httpx
import msgspec

from ferroserve.gateway.gate import Gateway
from ferroserve.log import logger

MAX_ATTEMPTS = 8
MAX_DELAY_S = 300.0
SIGNATURE_HEADERS = ("x-ferroserve-signature", "x-nurev-signature")
_encode = msgspec.json.Encoder().encode


def sign(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify(secret: str, body: bytes, header: str) -> bool:
    """What a receiver does (and the tests): constant-time comparison of the signature."""
    return hmac.compare_digest(sign(secret, body), header)


def backoff_s(attempt: int, base_s: float) -> float:
    """Delay after failed attempt number `attempt` (1-based): base·2^(n-1), capped, then
    jittered to between half and all of it so many failing receivers do not retry in step."""
    ceiling = min(MAX_DELAY_S, base_s * 2 ** (attempt - 1))
    return ceiling * random.uniform(0.5, 1.0)


def payload(batch_id: str, status: str, totals: dict, results: dict | None = None) -> bytes:
    """NUREV's `{event, batch_id, status, totals}`; with `results` (`{url, expires_at}`, a
    completed batch on a server that knows its public URL) the signed results URL too."""
    body = {"event": f"batch.{status}", "batch_id": batch_id, "status": status, "totals": totals}
    if results is not None:
        body["results"] = results
    return _encode(body)


async def deliver(gateway: Gateway, client: httpx.AsyncClient, row: dict, owner: str, body: bytes, event: str,
                  base_s: float) -> None:
    """Delivers the batch's webhook (resuming its attempts), recording each; returns when it
    was delivered or the attempts ran out."""
    batch_id, url, workspace = row["id"], row["webhook_url"], row["workspace"]
    attempt = row["webhook_attempts"] or 0
    wait = (row["webhook_next_at"] or 0.0) - time.time()
    if wait > 0:
        await asyncio.sleep(wait)
    secret = await gateway.call(lambda s: s.webhook_secret(workspace))
    signature = sign(secret, body)
    headers = {"content-type": "application/json", "user-agent": "ferroserve-webhooks",
               "x-ferroserve-event": event, **{h: signature for h in SIGNATURE_HEADERS}}
    while attempt < MAX_ATTEMPTS:
        attempt += 1
        started, status_code, error = time.perf_counter(), None, None
        try:
            response = await client.post(url, content=body, headers={**headers, "x-ferroserve-delivery-attempt": str(attempt)})
            status_code = response.status_code
            if not 200 <= status_code < 300:
                error = f"HTTP {status_code}"
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}"[:300]
        ok = error is None
        state = "delivered" if ok else ("failed" if attempt >= MAX_ATTEMPTS else "pending")
        delay = backoff_s(attempt, base_s) if state == "pending" else None
        delivery = {"batch_id": batch_id, "attempt": attempt, "event": event, "url": url, "created_at": time.time(),
                    "status_code": status_code, "error": error, "duration_ms": round((time.perf_counter() - started) * 1000, 3),
                    "delivered": int(ok)}
        next_at = time.time() + delay if delay is not None else None
        await gateway.call(lambda s: s.record_delivery(batch_id, owner, delivery, state, next_at))
        logger.info("webhook", extra={"fields": {"batch_id": batch_id, "attempt": attempt, "status_code": status_code,
                                                  "state": state}})
        if delay is None:
            return
        await asyncio.sleep(delay)
