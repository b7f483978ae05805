"""The usage writer's handshake on a real SQLite file: a lone request's record committed on
the event loop when the writer is idle (`StoreWorker.commit_now`), and the queued group commit
whenever that would mean waiting (another connection's write lock, records queued before it)."""

from __future__ import annotations

import asyncio
import sqlite3
import time

from ferroserve.gateway.store import DB_NAME, USAGE_COLUMNS, Store
from ferroserve.gateway.worker import StoreWorker


def _row(i: int) -> tuple:
    row = (f"req-{i}", time.time(), None, "w", "embeddings", "m", "local", 0, 3, 0, 0, 0.0, 1.0, None, 200, None, None,
           None)
    assert len(row) == len(USAGE_COLUMNS)
    return row


def _ids(path) -> list[str]:
    with sqlite3.connect(path) as db:  # another connection: sees committed rows only
        return [r[0] for r in db.execute("SELECT request_id FROM usage ORDER BY rowid")]


def test_an_idle_writer_lets_the_loop_commit_a_record_at_once(tmp_path):
    worker = StoreWorker(Store(tmp_path), on_external_change=lambda store: None)
    try:
        async def main():
            assert worker.commit_now(_row(1))
            assert _ids(tmp_path / DB_NAME) == ["req-1"]  # committed before commit_now returned
            # The queued path still works after it, in order.
            await worker.record_committed(_row(2))
            assert _ids(tmp_path / DB_NAME) == ["req-1", "req-2"]

        asyncio.run(main())
        assert (worker.written, worker.commits) == (2, 2)
    finally:
        worker.close()


def test_the_loop_never_waits_for_another_connections_write_lock(tmp_path):
    worker = StoreWorker(Store(tmp_path), on_external_change=lambda store: None)
    other = sqlite3.connect(tmp_path / DB_NAME, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")  # as a long `keys` CLI transaction would
        t0 = time.perf_counter()
        assert not worker.commit_now(_row(1))
        assert time.perf_counter() - t0 < 0.1  # refused at once, not after the 10 s busy timeout

        async def main():
            # The writer thread waits for the lock instead, and the answer for the writer.
            committed = worker.record_committed(_row(1))
            await asyncio.sleep(0.2)
            assert not committed.done()
            asyncio.get_running_loop().call_later(0.1, other.execute, "COMMIT")
            await asyncio.wait_for(committed, 10)

        asyncio.run(main())
        assert _ids(tmp_path / DB_NAME) == ["req-1"]
        # The connection's own busy timeout is back after the refusal.
        assert worker.store.db.execute("PRAGMA busy_timeout").fetchone()[0] == 10_000
    finally:
        other.close()
        worker.close()


def test_records_queued_before_keep_their_order(tmp_path):
    store = Store(tmp_path)
    worker = StoreWorker(store, on_external_change=lambda store: None)
    try:
        with worker._busy:  # the writer is busy with an earlier batch
            assert not worker.commit_now(_row(1))
        worker.record(_row(2))
        # Queued before: not overtaken (the writer may or may not have taken it yet; either way
        # a True here would need the queue empty and the writer idle, i.e. req-2 committed).
        if worker.commit_now(_row(3)):
            assert _ids(tmp_path / DB_NAME) == ["req-2", "req-3"]
        else:
            async def main():
                await worker.record_committed(_row(3))

            asyncio.run(main())
            assert _ids(tmp_path / DB_NAME) == ["req-2", "req-3"]
    finally:
        worker.close()
