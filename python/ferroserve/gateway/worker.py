"""The one thread that owns the server's SQLite connection.

The request path only puts tuples on a queue (`record`, ≈ 0.3 µs); this thread takes
everything queued, writes it in one statement and one transaction, and repeats: a group
commit whose size follows the load (what arrived during the previous commit), with no timer,
so a lone request never waits for others and a flood shares one commit (one WAL flush on
PostgreSQL) per round. A record
queued with `record_committed` comes with a future that is done once its transaction is
committed (the app answers a metered request only then); the records of one batch share one
commit and one wake-up of the event loop. A lone request (nothing else in flight on the
server) whose record finds this thread idle and the store able to commit at once (SQLite:
`insert_usage_nowait`, a few tens of µs in WAL mode) commits it on the event loop instead
(`commit_now`): two thread hand-offs (≈ 0.1–0.25 ms) saved where nothing could share the
commit; under concurrency records go through this thread as before. Reads and
admin writes reach the same thread as commands (`call`), queued behind the records before
them, so a usage query sees every request answered before it was asked. Between batches it
polls the store's data version (SQLite's `PRAGMA data_version`, PostgreSQL's key-version
counter) and reports changes made by other processes (the `keys` CLI, other replicas).

`close()` drains the queue before returning: `__rsgi_del__` calls it, so every record queued
(errors and disconnects too) is on disk before the process exits on SIGTERM.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from ferroserve.gateway.store_api import GatewayStore
from ferroserve.log import logger

_STOP = object()
MAX_BATCH = 4096


class _Call:
    __slots__ = ("fn", "future", "loop")

    def __init__(self, fn: Callable[[GatewayStore], Any], future: asyncio.Future, loop: asyncio.AbstractEventLoop) -> None:
        self.fn, self.future, self.loop = fn, future, loop


class _Committed:
    """A usage record whose writer waits for its commit."""

    __slots__ = ("row", "future", "loop")

    def __init__(self, row: tuple, future: asyncio.Future, loop: asyncio.AbstractEventLoop) -> None:
        self.row, self.future, self.loop = row, future, loop


def _settle_all(futures: list[asyncio.Future]) -> None:
    for future in futures:
        if not future.done():
            future.set_result(None)


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class StoreWorker:
    def __init__(self, store: GatewayStore, *, on_external_change: Callable[[GatewayStore], None], poll_s: float = 0.5) -> None:
        self.store = store
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._on_external_change = on_external_change
        self._poll_s = poll_s
        self.written = 0
        self.commits = 0  # transactions that wrote them: written / commits is the group size
        self.failed = 0
        # Held by this thread while it works on what it took from the queue, and by the event
        # loop while it commits a record itself (`commit_now`): one user of the connection at a time.
        self._busy = threading.Lock()
        self._nowait: Callable[[list[tuple]], bool] | None = getattr(store, "insert_usage_nowait", None)
        self._thread = threading.Thread(target=self._run, name="ferroserve-store", daemon=True)
        self._thread.start()

    # Called on the event loop -------------------------------------------------------
    def record(self, row: tuple) -> None:
        self._queue.put(row)

    def record_committed(self, row: tuple) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.put(_Committed(row, future, loop))
        return future

    def commit_now(self, row: tuple) -> bool:
        """Writes and commits `row` on the calling thread (the event loop) if that costs no
        waiting: the store commits locally, this thread is idle and nothing is queued before
        the row (so the order of records stays the order they were queued in), and no other
        connection holds the database's write lock. True once committed; False (nothing
        written) means: use `record_committed`."""
        if self._nowait is None or not self._queue.empty() or not self._busy.acquire(blocking=False):
            return False
        try:
            if not self._queue.empty() or not self._nowait([row]):
                return False
            self.written += 1
            self.commits += 1
            return True
        except Exception:
            logger.exception("writing a usage record on the event loop failed; queued for the writer")
            return False
        finally:
            self._busy.release()

    def call(self, fn: Callable[[GatewayStore], Any]) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.put(_Call(fn, future, loop))
        return future

    def queue_depth(self) -> int:
        return self._queue.qsize()

    def close(self) -> None:
        self._nowait = None  # from now on records only go to the thread (which drains them)
        self._queue.put(_STOP)
        self._thread.join()
        self.store.close()

    # The thread ---------------------------------------------------------------------
    def _run(self) -> None:
        version = self.store.data_version()
        next_poll = time.monotonic() + self._poll_s
        stopping = False
        while not stopping:
            try:
                first = self._queue.get(timeout=self._poll_s)
            except queue.Empty:
                first = None
            with self._busy:
                stopping = self._work(first)
            if time.monotonic() >= next_poll:
                next_poll = time.monotonic() + self._poll_s
                with self._busy:
                    now_version = self.store.data_version()
                    if now_version != version:
                        version = now_version
                        try:
                            self._on_external_change(self.store)
                        except Exception:
                            logger.exception("reloading keys failed")

    def _work(self, first: Any) -> bool:
        """Writes `first` and whatever else is queued (calls in their turn); True after `_STOP`."""
        stopping = False
        items = [] if first is None else [first]
        while len(items) < MAX_BATCH:
            try:
                items.append(self._queue.get_nowait())
            except queue.Empty:
                break
        rows: list[tuple] = []
        waiting: list[_Committed] = []
        for item in items:
            kind = type(item)
            if kind is tuple:
                rows.append(item)
                continue
            if kind is _Committed:
                rows.append(item.row)
                waiting.append(item)
                continue
            self._flush(rows, waiting)
            rows, waiting = [], []
            if item is _STOP:
                stopping = True  # keep going: records queued after it are written too
            else:
                self._run_call(item)
        self._flush(rows, waiting)
        if stopping:
            self._drain_rest()
        return stopping

    def _drain_rest(self) -> None:
        rows, waiting = [], []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if type(item) is tuple:
                rows.append(item)
            elif type(item) is _Committed:
                rows.append(item.row)
                waiting.append(item)
        self._flush(rows, waiting)

    def _flush(self, rows: list[tuple], waiting: list[_Committed] = ()) -> None:
        if rows:
            self._write(rows)
        if not waiting:
            return
        # The answers wait for this: one wake-up of their loop for the whole batch. (After five
        # failed attempts they are let go too; the failure is logged and counted.)
        by_loop: dict[asyncio.AbstractEventLoop, list[asyncio.Future]] = {}
        for item in waiting:
            by_loop.setdefault(item.loop, []).append(item.future)
        for loop, futures in by_loop.items():
            try:
                loop.call_soon_threadsafe(_settle_all, futures)
            except RuntimeError:  # the loop is closed (shutdown)
                pass

    def _write(self, rows: list[tuple]) -> None:
        for attempt in range(5):
            try:
                self.store.insert_usage(rows)
                self.written += len(rows)
                self.commits += 1
                return
            except Exception:
                # Most likely SQLITE_BUSY from a long CLI transaction (or a PostgreSQL
                # restart): wait and retry.
                logger.exception("writing usage records failed", extra={"fields": {"records": len(rows), "attempt": attempt}})
                time.sleep(0.2 * (attempt + 1))
        self.failed += len(rows)

    def _run_call(self, call: _Call) -> None:
        try:
            result, error = call.fn(self.store), None
        except BaseException as exc:  # handed to the awaiting handler
            result, error = None, exc
        try:
            call.loop.call_soon_threadsafe(_settle, call.future, result, error)
        except RuntimeError:  # the loop is closed (shutdown)
            pass
