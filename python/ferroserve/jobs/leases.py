"""Durable background work owned by this process, for any leased table (see
`gateway/batch_store.py`): stored background responses, batches.

Each server process has one owner id. While it runs a row's work it refreshes the row's
heartbeat every `HEARTBEAT_S`; the same round trip tells it which of its rows no longer have
work (cancelled or deleted through another process sharing the database) and it cancels those
tasks. Every other tick it claims rows nobody runs — a stopping server released them, or their
owner stopped beating for `STALE_S` (it died) — and runs their work again through `recover`.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
import uuid
from collections.abc import Callable, Coroutine
from typing import Any

from ferroserve.gateway.gate import Gateway
from ferroserve.gateway.store_api import open_store
from ferroserve.log import logger

HEARTBEAT_S = 2.0
# A heartbeat this old means the owner is gone. Much longer than a tick, so a busy event loop
# (a long prefill holds nothing here: the engine runs without the loop) never loses its work.
STALE_S = 10.0
# Claimed per sweep: recovery after a crash does not start more at once than a tick's worth.
CLAIM_LIMIT = 16
# This process, as every leased table names it.
OWNER = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Leases:
    """This process's tasks for one leased table, by row id (owned by the event loop).

    `capacity` bounds how many rows this process runs at once (claims stop when it is full)."""

    def __init__(self, gateway: Gateway, table: str, recover: Callable[[dict], Coroutine[Any, Any, None]], *,
                 noun: str, capacity: int = CLAIM_LIMIT, where: str = "", claimed: str | None = None) -> None:
        self.gateway = gateway
        self.noun = noun  # for the log: "response", "batch"
        self._claimed_message = claimed or f"background {noun} recovered"
        self.table = table
        self.owner = OWNER
        self.capacity = capacity
        self._where = where
        self._recover = recover
        self._tasks: dict[str, asyncio.Task] = {}
        self._ticker: asyncio.Task | None = None
        self._wake = asyncio.Event()

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._ticker = loop.create_task(self._tick())

    def stop(self) -> None:
        """At shutdown (the loop no longer runs): hand this process's rows to the next process
        at once instead of after `STALE_S`."""
        if self._ticker is not None:
            self._ticker.cancel()
        if self._tasks:
            # Its own connection: the store thread's is not to be shared across threads.
            settings = self.gateway.settings
            store = open_store(settings.data_dir, settings.database_url)
            try:
                released = store.release(self.table, self.owner)
            finally:
                store.close()
            logger.info(f"background {self.noun}s released", extra={"fields": {f"{self.noun}s": released}})

    def running(self, row_id: str) -> bool:
        return row_id in self._tasks

    def spawn(self, row_id: str, run: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(run)
        self._tasks[row_id] = task

        def done(_: asyncio.Task) -> None:
            self._tasks.pop(row_id, None)
            self._wake.set()  # a free slot: look for more work now

        task.add_done_callback(done)

    def poke(self) -> None:
        """New work was stored: sweep now rather than at the next tick."""
        self._wake.set()

    async def stop_local(self, row_id: str) -> bool:
        """Cancels this process's task for the row and waits for it to end; False if none."""
        task = self._tasks.get(row_id)
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
                if ticks % 2 == 0 or self._wake.is_set():  # orphans are looked for every other tick
                    self._wake.clear()
                    await self._sweep()
            except Exception:
                logger.exception(f"background {self.noun}s: bookkeeping failed")
            ticks += 1
            try:
                await asyncio.wait_for(self._wake.wait(), HEARTBEAT_S)
            except asyncio.TimeoutError:
                pass

    async def _beat(self) -> None:
        owner, table = self.owner, self.table
        active = await self.gateway.call(lambda s: s.beat(table, owner, time.time()))
        for row_id, task in list(self._tasks.items()):
            if row_id not in active:  # cancelled or deleted through another process
                task.cancel()

    async def _sweep(self) -> None:
        owner, table, now, where = self.owner, self.table, time.time(), self._where
        free = min(CLAIM_LIMIT, self.capacity - len(self._tasks))
        if free <= 0:
            return
        rows = await self.gateway.call(lambda s: s.claim(table, owner, now, now - STALE_S, free, where))
        for row in rows:
            if row["id"] in self._tasks:  # ours already (accepted here, claimed before it began)
                continue
            logger.info(self._claimed_message, extra={"fields": {f"{self.noun}_id": row["id"], "status": row["status"]}})
            self.spawn(row["id"], self._recover(row))
