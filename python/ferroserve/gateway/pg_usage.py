"""Usage records on PostgreSQL, written from the event loop (psycopg's async connection).

On SQLite the store's thread writes usage records (worker.py). On PostgreSQL a commit is a
network round trip the loop can wait for without blocking, so the server writes them here
instead: an answer that waits for its record no longer hops loop → writer thread → loop (two
wake-ups, on a busy machine two waits for a core). The contract is the thread's:

- one ordered writer: records are written in the order they were queued, each batch being
  whatever queued while the previous INSERT ran: a group commit whose size follows the load,
  with no timer, so a lone request waits for no company;
- `record_committed`'s future is done once its row is committed (the answer waits for it);
- `barrier()` waits for every record queued before it: `Gateway.call` passes it before its
  query reaches the store's thread, so a usage query sees every request answered before it;
- `close()` writes everything queued (the SIGTERM path: `__rsgi_del__` → `Gateway.stop`).

A batch of one row (every request at c=1, the latency that matters) skips psycopg's query
machinery: a statement prepared once per connection (`PREPARE`, parameter types given) is
executed through libpq directly (`send_query_prepared`, text parameters built here, the socket
watched with `add_reader` until the answer is in). In one process on a Zen 1 core this costs
99 µs of CPU and 204 µs wall per row against psycopg's async `execute` at 186 µs and 290 µs
(bench/NOTES.md, issue 18 round three). Larger batches keep psycopg's `execute` (their cost is
shared by their rows).

Failures (PostgreSQL restarting, a lock timeout): the batch is retried five times on a new
connection, 0.2, 0.4, … s apart, then counted as failed and its answers let go, as the
thread's writer does. The connection's durability is the store's (`PostgresStore.usage_connect_kwargs`:
`synchronous_commit=off` with `--pg-async-commit`).
"""

from __future__ import annotations

import asyncio
import itertools
from functools import lru_cache
from typing import Any

import psycopg

from ferroserve.gateway.store import _INSERT_USAGE_HEAD, _ROW_PLACEHOLDERS, _ROWS_PER_INSERT, USAGE_COLUMNS
from ferroserve.log import logger

_ATTEMPTS = 5

# The one-row INSERT as a named prepared statement, with the usage table's column types
# (pg_migrations.py) so that text parameters need no type inference.
_COLUMN_TYPES = ("text", "float8", "text", "text", "text", "text", "text", "int4", "int4", "int4", "int4",
                 "float8", "float8", "float8", "int4", "text", "text", "text")
assert len(_COLUMN_TYPES) == len(USAGE_COLUMNS)
_STATEMENT = "ferroserve_usage_insert"
_PREPARE_SQL = (f"PREPARE {_STATEMENT} ({', '.join(_COLUMN_TYPES)}) AS " + _INSERT_USAGE_HEAD
                + "(" + ", ".join(f"${i + 1}" for i in range(len(USAGE_COLUMNS))) + ")")
_KINDS = tuple({"text": str, "float8": float, "int4": int}[t] for t in _COLUMN_TYPES)


def text_params(row: tuple) -> list[bytes | None]:
    """A usage row as libpq text parameters. PostgreSQL's text cannot hold NUL, and libpq would
    cut a text parameter at one: a NUL (a captured prompt may hold one) becomes U+FFFD."""
    out: list[bytes | None] = []
    for value, kind in zip(row, _KINDS):
        if value is None:
            out.append(None)
        elif kind is int:
            out.append(b"%d" % value)
        elif kind is float:
            out.append(repr(float(value)).encode())
        else:
            text = str(value)
            if "\x00" in text:
                text = text.replace("\x00", "\ufffd")
            out.append(text.encode())
    return out


def _without_nul(row: tuple) -> tuple:
    """The same replacement for psycopg's path (which would refuse the row: retried, then lost)."""
    if any(type(v) is str and "\x00" in v for v in row):
        return tuple(v.replace("\x00", "\ufffd") if type(v) is str else v for v in row)
    return row


@lru_cache(maxsize=_ROWS_PER_INSERT)
def usage_insert_sql(rows: int) -> str:
    """The INSERT of `rows` usage records in one statement, with psycopg's placeholders (used
    by this writer and by `PostgresStore.insert_usage`)."""
    return (_INSERT_USAGE_HEAD + ", ".join([_ROW_PLACEHOLDERS] * rows)).replace("%", "%%").replace("?", "%s")


class PgUsageWriter:
    def __init__(self, url: str, connect_kwargs: dict[str, Any]) -> None:
        self._url = url
        self._connect_kwargs = connect_kwargs
        self._conn: psycopg.AsyncConnection | None = None
        self._prepared: psycopg.AsyncConnection | None = None  # the connection that has _STATEMENT
        self._pending: list[tuple[tuple, asyncio.Future | None]] = []
        self._task: asyncio.Task | None = None
        self._queued = 0  # records queued so far; `_done` of them written (or given up)
        self._done = 0
        self._barriers: list[tuple[int, asyncio.Future]] = []
        self.written = 0
        self.commits = 0
        self.failed = 0

    # On the event loop ------------------------------------------------------------------
    def record(self, row: tuple) -> None:
        self._pending.append((row, None))
        self._queued += 1
        self._kick()

    def record_committed(self, row: tuple) -> asyncio.Future:
        future = asyncio.get_running_loop().create_future()
        self._pending.append((row, future))
        self._queued += 1
        self._kick()
        return future

    def queue_depth(self) -> int:
        return self._queued - self._done

    async def barrier(self) -> None:
        """Returns once every record queued before this call is written."""
        if self._done >= self._queued:
            return
        future = asyncio.get_running_loop().create_future()
        self._barriers.append((self._queued, future))
        await future

    def _kick(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                await self._write([row for row, _ in batch])
                self._done += len(batch)
                for _, future in batch:
                    if future is not None and not future.done():
                        future.set_result(None)
                if self._barriers:
                    waiting = []
                    for target, future in self._barriers:
                        if target <= self._done:
                            if not future.done():
                                future.set_result(None)
                        else:
                            waiting.append((target, future))
                    self._barriers = waiting
        finally:
            self._task = None

    async def _write(self, rows: list[tuple]) -> None:
        chunks = [rows[start:start + _ROWS_PER_INSERT] for start in range(0, len(rows), _ROWS_PER_INSERT)]
        for attempt in range(_ATTEMPTS):
            try:
                if self._conn is None or self._conn.closed:
                    self._conn = await psycopg.AsyncConnection.connect(self._url, **self._connect_kwargs)
                conn = self._conn
                if len(rows) == 1:
                    await self._insert_one(conn, rows[0])
                elif len(chunks) == 1:  # one statement in autocommit mode: one round trip
                    await conn.execute(usage_insert_sql(len(rows)), list(itertools.chain.from_iterable(map(_without_nul, rows))))
                else:
                    async with conn.transaction():
                        for chunk in chunks:
                            await conn.execute(usage_insert_sql(len(chunk)),
                                               list(itertools.chain.from_iterable(map(_without_nul, chunk))))
                self.written += len(rows)
                self.commits += 1
                return
            except Exception:
                logger.exception("writing usage records failed", extra={"fields": {"records": len(rows), "attempt": attempt}})
                await self._drop_connection()
                if attempt + 1 < _ATTEMPTS:
                    await asyncio.sleep(0.2 * (attempt + 1))
        self.failed += len(rows)

    async def _insert_one(self, conn: psycopg.AsyncConnection, row: tuple) -> None:
        """One row in autocommit mode (one round trip), through libpq (see the module's doc)."""
        if self._prepared is not conn:
            await conn.execute(_PREPARE_SQL)
            self._prepared = conn
        pgconn = conn.pgconn  # nonblocking: psycopg's async connect sets it
        pgconn.send_query_prepared(_STATEMENT.encode(), text_params(row))
        loop = asyncio.get_running_loop()
        fd = pgconn.socket
        if pgconn.flush():  # 1: the kernel's buffer took only part of it (rare for one row)
            await self._wait(loop.add_writer, loop.remove_writer, fd, lambda: pgconn.flush() == 0)
        if pgconn.is_busy():
            def arrived() -> bool:
                pgconn.consume_input()
                return not pgconn.is_busy()
            await self._wait(loop.add_reader, loop.remove_reader, fd, arrived)
        error = None
        while (result := pgconn.get_result()) is not None:
            if result.status != psycopg.pq.ExecStatus.COMMAND_OK and error is None:
                error = result.get_error_field(psycopg.pq.DiagnosticField.MESSAGE_PRIMARY) or pgconn.error_message
        if error is not None:
            raise psycopg.OperationalError(f"usage INSERT failed: {error.decode(errors='replace')}")

    @staticmethod
    async def _wait(add, remove, fd: int, done) -> None:
        """Until `done()` (called on each readiness of `fd`) is true; its exception is raised."""
        future = asyncio.get_running_loop().create_future()

        def ready() -> None:
            if future.done():
                return
            try:
                if done():
                    future.set_result(None)
            except BaseException as exc:  # a broken connection: raised in the writer
                future.set_exception(exc)

        add(fd, ready)
        try:
            await future
        finally:
            remove(fd)

    async def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        self._prepared = None
        if conn is not None:
            try:
                await conn.close()
            except Exception:
                pass

    async def aclose(self) -> None:
        """Writes everything queued, then closes the connection."""
        while self._task is not None or self._pending:
            if self._task is None:
                self._kick()
            await asyncio.shield(self._task)
        await self._drop_connection()

    def close(self, loop: asyncio.AbstractEventLoop | None) -> list[tuple]:
        """From outside the loop (shutdown): runs the loop until everything queued is written.
        Returns the rows it could not hand to a loop (the loop is gone), for the caller to
        write another way."""
        if loop is not None and not loop.is_closed() and not loop.is_running():
            loop.run_until_complete(self.aclose())
            return []
        rows = [row for row, _ in self._pending]
        self._pending = []
        return rows
