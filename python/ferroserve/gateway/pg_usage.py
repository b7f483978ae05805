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

The connection's socket stays registered with the loop while this writer drives it, with a
callback that completes the INSERT waiting for an answer: not `add_reader` and `remove_reader`
around each row (two `epoll_ctl` and a uvloop poll handle created and closed per request;
−35 to −70 µs of CPU per row on a Zen 1 core, bench/NOTES.md round four). `add_reader` is
still called before each wait (on a registered socket uvloop only swaps the callback), so a
registration that psycopg's own calls on the connection removed (connect, `PREPARE`,
multi-row batches: psycopg adds and removes its reader on the same socket) is made again.
The writer lets go of it before those calls and before closing a connection (a new one may
get the same file descriptor); between INSERTs, a connection the database dropped makes the
socket readable: the callback then lets go of it too (a closed socket stays readable).

A lone record that must be committed before its answer (`commit_now`: no other interactive
request in flight, the writer idle and its connection prepared) is committed on the calling
coroutine with the event loop blocked, as the SQLite store commits such a record (worker.py)
and as the Redis admission is made (shared_limits.py): sent, then `poll` on the socket until
the answer is in. No task, no future, no reader registered and removed (two `epoll_ctl`), no
loop turns: in one process on a Zen 1 core 67 µs of CPU and 154 µs wall against 163 µs and
251 µs through the writer's task (bench/NOTES.md, issue 18 round four). Only with
`--pg-async-commit` (the commit returns in tens of µs): a WAL flush of 4–7 ms would hold the
loop for it. The wait is bounded (`_INLINE_WAIT_S`): a commit that takes longer (a lock on the
table, a stalled server) is handed to the writer's task, which waits for it on the loop as
for any other; records queued meanwhile go after it, so the order is kept.

Failures (PostgreSQL restarting, a lock timeout): the batch is retried five times on a new
connection, 0.2, 0.4, … s apart, then counted as failed and its answers let go, as the
thread's writer does. The connection's durability is the store's (`PostgresStore.usage_connect_kwargs`:
`synchronous_commit=off` with `--pg-async-commit`).
"""

from __future__ import annotations

import asyncio
import itertools
import select
from functools import lru_cache
from typing import Any

import psycopg

from ferroserve.gateway.store import _INSERT_USAGE_HEAD, _ROW_PLACEHOLDERS, _ROWS_PER_INSERT, USAGE_COLUMNS
from ferroserve.log import logger

_ATTEMPTS = 5
# How long `commit_now` may hold the event loop for its commit before the writer's task takes
# over the wait: a loopback commit at synchronous_commit=off is 0.1–0.3 ms on a loaded Zen 1.
_INLINE_WAIT_S = 0.002

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
    def __init__(self, url: str, connect_kwargs: dict[str, Any], *, commit_inline: bool = False) -> None:
        self._url = url
        self._connect_kwargs = connect_kwargs
        # `commit_now` may commit on the calling coroutine (connections at synchronous_commit=off).
        self._commit_inline = commit_inline
        self._conn: psycopg.AsyncConnection | None = None
        self._prepared: psycopg.AsyncConnection | None = None  # the connection that has _STATEMENT
        self._poller = select.poll()  # registered with `_prepared`'s socket
        self._watched: int | None = None  # the socket registered with the loop (`_watch`)
        self._answered: asyncio.Future | None = None  # an INSERT waiting for its answer
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

    def commit_now(self, row: tuple) -> asyncio.Future | None:
        """Commits a lone record on the calling coroutine, the loop blocked for at most
        `_INLINE_WAIT_S` (see the module's doc): None once committed. Otherwise a future that is
        done once the row is committed: the writer is busy or not ready (the row is queued as by
        `record_committed`), the commit takes longer (the writer's task waits for it), or it
        failed (the row is queued again, retried on a new connection)."""
        conn = self._conn
        if (not self._commit_inline or self._task is not None or self._pending or conn is None
                or self._prepared is not conn or conn.closed):
            return self.record_committed(row)
        pgconn = conn.pgconn
        try:
            pgconn.send_query_prepared(_STATEMENT.encode(), text_params(row))
            sent = pgconn.flush() == 0  # (1: the kernel's buffer took part of it; the task sends the rest)
            if sent and pgconn.is_busy() and self._poller.poll(_INLINE_WAIT_S * 1000):
                pgconn.consume_input()
            if not sent or pgconn.is_busy():
                return self._hand_over(row)
            self._check_results(pgconn)
        except Exception:
            logger.exception("writing a usage record on the event loop failed; queued for the writer")
            self._conn = None  # (closed by the task, which retries the row on a new connection)
            self._discard(conn)
            return self.record_committed(row)
        self._queued += 1
        self._done += 1
        self.written += 1
        self.commits += 1
        return None

    def _hand_over(self, row: tuple) -> asyncio.Future:
        """The row's INSERT is sent and not answered yet: the writer's task waits for it first."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queued += 1
        self._task = loop.create_task(self._run((row, future)))
        return future

    def _discard(self, conn: psycopg.AsyncConnection) -> None:
        self._unwatch()
        self._prepared = None
        asyncio.get_running_loop().create_task(self._close_quietly(conn))

    @staticmethod
    async def _close_quietly(conn: psycopg.AsyncConnection) -> None:
        try:
            await conn.close()
        except Exception:
            pass

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

    async def _run(self, in_flight: tuple[tuple, asyncio.Future] | None = None) -> None:
        """Writes what is queued until nothing is; first, `in_flight`: a row `commit_now` sent
        whose answer it did not wait for."""
        try:
            while in_flight is not None or self._pending:
                if in_flight is not None:
                    batch = [in_flight]
                    in_flight = None
                    await self._finish_in_flight(batch[0][0])
                else:
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
                    self._unwatch()
                    self._conn = await psycopg.AsyncConnection.connect(self._url, **self._connect_kwargs)
                conn = self._conn
                if len(rows) == 1:
                    await self._insert_one(conn, rows[0])
                elif len(chunks) == 1:  # one statement in autocommit mode: one round trip
                    self._unwatch()  # (psycopg registers its own reader)
                    await conn.execute(usage_insert_sql(len(rows)), list(itertools.chain.from_iterable(map(_without_nul, rows))))
                else:
                    self._unwatch()
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

    async def _finish_in_flight(self, row: tuple) -> None:
        """Waits for the answer to the INSERT `commit_now` sent; if it fails, the row is written
        again as any batch is (a new connection, retries)."""
        conn = self._conn
        try:
            assert conn is not None
            await self._answer(conn.pgconn)
            self.written += 1
            self.commits += 1
        except Exception:
            logger.exception("writing usage records failed", extra={"fields": {"records": 1, "attempt": 0}})
            await self._drop_connection()
            await self._write([row])

    async def _insert_one(self, conn: psycopg.AsyncConnection, row: tuple) -> None:
        """One row in autocommit mode (one round trip), through libpq (see the module's doc)."""
        if self._prepared is not conn:
            self._unwatch()
            await conn.execute(_PREPARE_SQL)
            self._prepared = conn
            self._poller = select.poll()  # commit_now's wait on this connection's socket
            self._poller.register(conn.pgconn.socket, select.POLLIN)
        pgconn = conn.pgconn  # nonblocking: psycopg's async connect sets it
        pgconn.send_query_prepared(_STATEMENT.encode(), text_params(row))
        await self._answer(pgconn)

    async def _answer(self, pgconn) -> None:
        """After a query was sent: the rest of it flushed, its answer read and checked."""
        loop = asyncio.get_running_loop()
        fd = pgconn.socket
        if pgconn.flush():  # 1: the kernel's buffer took only part of it (rare for one row)
            await self._wait(loop.add_writer, loop.remove_writer, fd, lambda: pgconn.flush() == 0)
        if pgconn.is_busy():
            # Registered again each time: a no-op for the poller while it is (uvloop replaces
            # the callback; no `epoll_ctl`), and right after a psycopg call removed it.
            loop.add_reader(fd, self._readable, pgconn)
            self._watched = fd
            self._answered = loop.create_future()
            try:
                await self._answered
            finally:
                self._answered = None
        self._check_results(pgconn)

    def _readable(self, pgconn) -> None:
        """The watched socket has data: the answer an INSERT waits for, or, between INSERTs,
        a notice or the end of a connection the database dropped (then the registration goes:
        a closed socket stays readable; the next write sees the connection closed)."""
        waiting = self._answered
        try:
            pgconn.consume_input()
            if waiting is not None and not waiting.done() and not pgconn.is_busy():
                waiting.set_result(None)
        except BaseException as exc:  # a broken connection: raised in the writer, if it waits
            self._unwatch()
            if waiting is not None and not waiting.done():
                waiting.set_exception(exc)

    def _unwatch(self) -> None:
        if self._watched is not None:
            try:
                asyncio.get_running_loop().remove_reader(self._watched)
            except RuntimeError:  # no loop running (close() from outside it)
                pass
            self._watched = None

    @staticmethod
    def _check_results(pgconn) -> None:
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
        self._unwatch()
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
