"""Background responses (`background: true`) that outlive the process that accepted them.

Each server process has an owner id. A background response's row names its owner and carries
a heartbeat that the owner refreshes every `HEARTBEAT_S` while it runs the generation; the same
round trip tells the owner which of its rows stopped being active — cancelled or deleted
through another process sharing the database — and it cancels those generations. A row whose
owner stopped beating for `STALE_S` (the process died) or that a stopping server released is
claimed atomically by a live process, which runs the stored job again from the start: an
accepted background response always reaches a final state. (Tokens the dead process generated
are not metered: its usage records died with it; the new run is metered in full.)"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

import msgspec

from ferroserve.backends.base import ChatRequest
from ferroserve.gateway.gate import Gateway
from ferroserve.jobs import leases
from ferroserve.schemas.chat import Route

# The lease timings are every leased table's (jobs/leases.py); re-exported for the tests.
HEARTBEAT_S, STALE_S = leases.HEARTBEAT_S, leases.STALE_S


class Job(msgspec.Struct, kw_only=True):
    """What it takes to run a background response again: the model asked for, its routing
    options, the generation, and who pays (the usage record keeps the original request id)."""

    model: str
    route: Route | None
    max_tokens: int
    request: ChatRequest
    request_id: str
    key_id: str | None


_encode = msgspec.json.Encoder().encode
_decode_job = msgspec.json.Decoder(Job).decode


def encode_job(job: Job) -> str:
    # The memo holds per-model caches (token ids): rebuilt on recovery, not stored.
    return _encode(msgspec.structs.replace(job, request=msgspec.structs.replace(job.request, memo={}))).decode()


def decode_job(text: str) -> Job:
    return _decode_job(text)


class BackgroundJobs(leases.Leases):
    """This process's background generations, by response id (owned by the event loop)."""

    def __init__(self, gateway: Gateway, recover: Callable[[dict], Coroutine[Any, Any, None]]) -> None:
        # No cap: every accepted background response runs (the engine queues them).
        super().__init__(gateway, "responses", recover, noun="response", capacity=1 << 30, where="AND job IS NOT NULL")
