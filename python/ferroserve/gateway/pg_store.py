"""The gateway store on PostgreSQL (psycopg 3), for replicas that share keys, usage, budgets,
stored responses, files and batches.

`PostgresStore` is `Store` with another connection under it: the queries are the same text
(store.py keeps to SQL both engines accept), written with SQLite's `?` placeholders, which
`_Connection.execute` turns into psycopg's `%s` once per statement text. What differs is
here: the schema comes from versioned migrations (pg_migrations.py) applied at start under an
advisory lock (replicas starting together migrate once), `data_version` reads the key-version
counter the triggers bump, the day grouping, and `claim`'s `FOR UPDATE SKIP LOCKED`, so
replicas take disjoint rows of one queue without waiting on each other.

Like the SQLite store, an instance belongs to one thread (the store worker, or the CLI). Its
connection comes from a psycopg pool of one, in autocommit mode: a connection broken by a
database restart or failover is thrown away when it goes back, so after one failed call (the
usage writer retries) the next gets a fresh connection. `_transaction` holds one connection
for what must land together.

Usage records and durability. The server's writer (pg_usage.py, on the event loop; `insert_usage`
below is the same INSERT for the CLI and tests) commits whatever was queued while its
previous commit ran as one statement, one transaction: under load that is a group commit
(one WAL flush for many answers), and a lone request waits for no timer. Each answer waits
for its record's commit, as in SQLite mode. How durable that commit is, is the database's
setting (`synchronous_commit`, on by default: the WAL is flushed to disk before the commit
returns) unless the operator passes `--pg-async-commit`: usage records then go through a
second connection of their own with `synchronous_commit=off`, so the commit returns once the
rows are in PostgreSQL's WAL buffers, visible to every replica, and survives this server being
killed; a PostgreSQL or OS crash can lose the last ≤ 3 × `wal_writer_delay` (0.6 s by default)
of them. That is the class of SQLite's WAL with synchronous=NORMAL (a process crash loses
nothing, an OS crash the last commits). Keys, budgets, files, batches and stored responses
stay on the first connection, at the database's durability.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import ConnectionPool

from ferroserve.gateway.pg_migrations import MIGRATIONS
from ferroserve.gateway.pg_usage import PgUsageWriter, usage_insert_sql
from ferroserve.gateway.store import _ROWS_PER_INSERT, Store

# Any constant: the advisory lock only has to be the same number in every replica.
_MIGRATION_LOCK = 0x66657272  # "ferr"


@lru_cache(maxsize=512)
def _to_pyformat(sql: str) -> str:
    # The statements are our own text: a literal % only ever appears in SQLite's strftime,
    # which PostgresStore replaces, but it is escaped anyway.
    return sql.replace("%", "%%").replace("?", "%s")


class _Connection:
    """The slice of sqlite3.Connection the store uses, on a pooled psycopg connection: the one
    a transaction holds, else one checked out for the statement. (Results are fetched whole
    by psycopg's client-side cursors, so they outlive the checkout.)"""

    def __init__(self, pool: ConnectionPool) -> None:
        self.pool = pool
        self.held: psycopg.Connection | None = None

    def execute(self, sql: str, args=()) -> psycopg.Cursor:
        params = list(args) if args else None
        if self.held is not None:
            return self.held.execute(_to_pyformat(sql), params)
        with self.pool.connection() as conn:
            return conn.execute(_to_pyformat(sql), params)


def describe(url: str) -> str:
    """The URL without its password, for logs."""
    info = conninfo_to_dict(url)
    info.pop("password", None)
    return "postgresql://{user}@{host}:{port}/{dbname}".format(**{k: info.get(k, "") for k in ("user", "host", "port", "dbname")})


def migrate(conn: psycopg.Connection) -> list[int]:
    """Applies the migrations this database lacks, each in its own transaction; returns their
    versions. Safe to run from several processes at once."""
    applied: list[int] = []
    conn.execute("SELECT pg_advisory_lock(%s)", (_MIGRATION_LOCK,))
    try:
        conn.execute("CREATE TABLE IF NOT EXISTS schema_migrations "
                     "(version INTEGER PRIMARY KEY, applied_at DOUBLE PRECISION NOT NULL)")
        have = {row[0] for row in conn.execute("SELECT version FROM schema_migrations")}
        for version, sql in MIGRATIONS:
            if version in have:
                continue
            with conn.transaction():
                conn.execute(sql)
                conn.execute("INSERT INTO schema_migrations (version, applied_at) VALUES (%s, %s)", (version, time.time()))
            applied.append(version)
    finally:
        conn.execute("SELECT pg_advisory_unlock(%s)", (_MIGRATION_LOCK,))
    return applied


class PostgresStore(Store):
    DAY_EXPR = "to_char(to_timestamp(created_at) AT TIME ZONE 'UTC', 'YYYY-MM-DD')"
    CLAIM_LOCK = " FOR UPDATE SKIP LOCKED"

    def __init__(self, url: str, *, usage_async_commit: bool = False) -> None:
        self.location = describe(url)
        # A plain connection first: a wrong URL or a database that is down fails here at once,
        # with the driver's own message.
        with psycopg.connect(url, autocommit=True) as conn:
            self.applied_migrations = migrate(conn)
        self._pool = ConnectionPool(url, min_size=1, max_size=1, kwargs={"autocommit": True}, timeout=10.0, open=True,
                                    name="ferroserve-store")
        self.db = _Connection(self._pool)  # type: ignore[assignment]
        self.url = url
        self.usage_async_commit = usage_async_commit
        self.usage_connect_kwargs: dict = {"autocommit": True}
        self._usage_pool = self._pool
        if usage_async_commit:
            # A session setting on a connection that writes nothing else: each usage INSERT stays
            # one statement and one round trip (SET LOCAL would need BEGIN and COMMIT around it).
            # The operator's own `options` in the URL are kept.
            options = f"{conninfo_to_dict(url).get('options') or ''} -c synchronous_commit=off"
            self.usage_connect_kwargs["options"] = options.strip()
            self._usage_pool = ConnectionPool(url, min_size=1, max_size=1, timeout=10.0, open=True,
                                              kwargs=self.usage_connect_kwargs, name="ferroserve-usage")

    def usage_writer(self) -> PgUsageWriter:
        """The server's writer of usage records, on the event loop (pg_usage.py), with the same
        durability as `insert_usage`. A lone record may be committed with the loop blocked only
        where a commit needs no WAL flush (`--pg-async-commit`)."""
        return PgUsageWriter(self.url, dict(self.usage_connect_kwargs), commit_inline=self.usage_async_commit)

    def close(self) -> None:
        if self._usage_pool is not self._pool:
            self._usage_pool.close()
        self._pool.close()

    @contextmanager
    def _transaction(self) -> Iterator[_Connection]:
        with self._pool.connection() as conn, conn.transaction():
            self.db.held = conn
            try:
                yield self.db
            finally:
                self.db.held = None

    def insert_usage(self, records: list[tuple]) -> None:
        """One transaction for the whole batch (one WAL flush, unless `usage_async_commit`).
        Up to `_ROWS_PER_INSERT` rows are one statement, which in autocommit mode is its own
        transaction: one round trip instead of BEGIN, INSERT, COMMIT (the writer usually
        flushes a few rows at a time)."""
        chunks = [records[start:start + _ROWS_PER_INSERT] for start in range(0, len(records), _ROWS_PER_INSERT)]
        with self._usage_pool.connection() as conn:
            if len(chunks) == 1:
                self._insert_usage_chunk(conn, chunks[0])
                return
            with conn.transaction():
                for chunk in chunks:
                    self._insert_usage_chunk(conn, chunk)

    @staticmethod
    def _insert_usage_chunk(conn: psycopg.Connection, chunk: list[tuple]) -> None:
        conn.execute(usage_insert_sql(len(chunk)), list(itertools.chain.from_iterable(chunk)))

    def data_version(self) -> int:
        return self.db.execute("SELECT version FROM key_version").fetchone()[0]
