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

import asyncio
import os
import socket
import time
import uuid
from collections.abc import Callable, Coroutine
from typing import Any

import msgspec

from ferroserve.backends.base import ChatRequest
from ferroserve.gateway.gate import Gateway
from ferroserve.gateway.store import Store
from ferroserve.log import logger
from ferroserve.schemas.chat import Route

HEARTBEAT_S = 2.0
# A heartbeat this old means the owner is gone. Much longer than a tick, so a busy event loop
# (a long prefill holds nothing here: the engine runs without the loop) never loses its jobs.
STALE_S = 10.0
# Claimed per sweep: recovery after a crash does not start more at once than a tick's worth.
CLAIM_LIMIT = 16


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


class BackgroundJobs:
    """This process's background generations, by response id (owned by the event loop)."""

    def __init__(self, gateway: Gateway, recover: Callable[[dict], Coroutine[Any, Any, None]]) -> None:
        self.gateway = gateway
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._recover = recover
        self._tasks: dict[str, asyncio.Task] = {}
        self._ticker: asyncio.Task | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._ticker = loop.create_task(self._tick())

    def stop(self) -> None:
        """At shutdown (the loop no longer runs): hand this process's running responses to the
        next process at once instead of after `STALE_S`."""
        if self._ticker is not None:
            self._ticker.cancel()
        if self._tasks:
            # Its own connection: the store thread's is not to be shared across threads.
            store = Store(self.gateway.settings.data_dir)
            try:
                released = store.release_responses(self.owner)
            finally:
                store.close()
            logger.info("background responses released", extra={"fields": {"responses": released}})

    def spawn(self, response_id: str, run: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(run)
        self._tasks[response_id] = task
        task.add_done_callback(lambda _: self._tasks.pop(response_id, None))

    async def stop_local(self, response_id: str) -> bool:
        """Cancels this process's generation of the response and waits until its final state
        is written; False if this process runs none."""
        task = self._tasks.get(response_id)
        if task is None:
            return False
        task.cancel()
        await asyncio.wait([task])
        return True

    async def _tick(self) -> None:
        ticks = 0
        while True:
            try:
                if self._tasks:
                    await self._beat()
                if ticks % 2 == 0:  # orphans are looked for every other tick
                    await self._sweep()
            except Exception:
                logger.exception("background responses: bookkeeping failed")
            ticks += 1
            await asyncio.sleep(HEARTBEAT_S)

    async def _beat(self) -> None:
        owner = self.owner
        active = await self.gateway.call(lambda s: s.beat_responses(owner, time.time()))
        for response_id, task in list(self._tasks.items()):
            if response_id not in active:  # cancelled or deleted through another process
                task.cancel()

    async def _sweep(self) -> None:
        owner, now = self.owner, time.time()
        rows = await self.gateway.call(lambda s: s.claim_responses(owner, now, now - STALE_S, CLAIM_LIMIT))
        for row in rows:
            logger.info("background response recovered", extra={"fields": {"response_id": row["id"], "status": row["status"]}})
            self.spawn(row["id"], self._recover(row))
