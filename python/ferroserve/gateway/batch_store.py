"""Persistence for files, batches and leased background work; mixed into `Store`.

Leases are one idea shared by every kind of durable background work (stored responses,
batches): a row names the process running it (`owner`) and when that process last said it was
alive (`heartbeat`). `beat` refreshes a process's rows, `claim` takes rows nobody runs (never
claimed, released by a stopping server, or whose owner fell silent) in one write transaction,
`release` hands a stopping process's rows back. Everything is a plain SQL statement on one
connection, so a shared database can replace SQLite: on PostgreSQL `claim`'s SELECT becomes
`SELECT … FOR UPDATE SKIP LOCKED` and several replicas work one queue.

Batch progress is committed in small transactions by its owner only (`batch_progress` checks
the owner and returns the status, so a cancel through another process is seen at the next
commit). The byte offsets committed with the counts say how much of the result files is
durable: a process that takes a batch over truncates them to those offsets first.
"""

from __future__ import annotations

import secrets
import sqlite3
import time
from dataclasses import dataclass

BATCH_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY,
    workspace TEXT NOT NULL,
    purpose TEXT NOT NULL,
    filename TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    created_at REAL NOT NULL,
    path TEXT NOT NULL,
    lines INTEGER,
    endpoint TEXT
);
CREATE INDEX IF NOT EXISTS files_workspace_time ON files(workspace, created_at);
CREATE TABLE IF NOT EXISTS batches (
    id TEXT PRIMARY KEY,
    workspace TEXT NOT NULL,
    kind TEXT NOT NULL,
    status TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    model TEXT,
    input_path TEXT NOT NULL,
    input_file_id TEXT,
    output_file_id TEXT,
    error_file_id TEXT,
    completion_window TEXT,
    metadata TEXT,
    errors TEXT,
    webhook_url TEXT,
    dimensions INTEGER,
    total INTEGER NOT NULL,
    completed INTEGER NOT NULL DEFAULT 0,
    failed INTEGER NOT NULL DEFAULT 0,
    total_tokens INTEGER NOT NULL DEFAULT 0,
    input_offset INTEGER NOT NULL DEFAULT 0,
    output_bytes INTEGER NOT NULL DEFAULT 0,
    error_bytes INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    expires_at REAL,
    in_progress_at REAL,
    finalizing_at REAL,
    completed_at REAL,
    failed_at REAL,
    expired_at REAL,
    cancelling_at REAL,
    cancelled_at REAL,
    key_id TEXT,
    webhook_state TEXT,
    webhook_attempts INTEGER NOT NULL DEFAULT 0,
    webhook_next_at REAL,
    owner TEXT,
    heartbeat REAL
);
CREATE INDEX IF NOT EXISTS batches_workspace_time ON batches(workspace, kind, created_at);
CREATE TABLE IF NOT EXISTS webhook_deliveries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    batch_id TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    event TEXT NOT NULL,
    url TEXT NOT NULL,
    created_at REAL NOT NULL,
    status_code INTEGER,
    error TEXT,
    duration_ms REAL NOT NULL,
    delivered INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS webhook_deliveries_batch ON webhook_deliveries(batch_id, id);
CREATE TABLE IF NOT EXISTS server_secrets (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL,
    created_at REAL NOT NULL
);
"""

FILE_COLUMNS = ("id", "workspace", "purpose", "filename", "bytes", "created_at", "path", "lines", "endpoint")
BATCH_COLUMNS = (
    "id", "workspace", "kind", "status", "endpoint", "model", "input_path", "input_file_id", "output_file_id",
    "error_file_id", "completion_window", "metadata", "errors", "webhook_url", "dimensions", "total", "completed",
    "failed", "total_tokens", "input_offset", "output_bytes", "error_bytes", "created_at", "expires_at",
    "in_progress_at", "finalizing_at", "completed_at", "failed_at", "expired_at", "cancelling_at", "cancelled_at",
    "key_id", "webhook_state", "webhook_attempts", "webhook_next_at", "owner", "heartbeat",
)
DELIVERY_COLUMNS = ("id", "batch_id", "attempt", "event", "url", "created_at", "status_code", "error", "duration_ms", "delivered")
# Statuses (OpenAI's words) in which a batch still has work for its owner.
ACTIVE_BATCH = ("validating", "in_progress", "finalizing", "cancelling")
# Columns the owner writes as it goes (progress) and when it ends (finish).
_PROGRESS_COLUMNS = frozenset(("status", "completed", "failed", "total_tokens", "input_offset", "output_bytes",
                               "error_bytes", "dimensions", "in_progress_at", "errors"))
_FINISH_COLUMNS = _PROGRESS_COLUMNS | {"output_file_id", "error_file_id", "finalizing_at", "completed_at", "failed_at",
                                       "expired_at", "cancelled_at", "webhook_state"}


@dataclass(frozen=True)
class Leased:
    """A table of leased work: `active` is the SQL condition of rows with work left."""

    columns: tuple[str, ...]
    active: str


_BATCH_ACTIVE = f"(status IN {ACTIVE_BATCH!r} OR webhook_state = 'pending')"


class BatchStore:
    """Mixed into `Store` (which provides `db` and `_transaction`)."""

    db: sqlite3.Connection
    LEASED: dict[str, Leased] = {}
    # Appended to `claim`'s SELECT: SQLite's BEGIN IMMEDIATE already excludes other writers;
    # PostgreSQL locks the rows it takes and skips the ones another replica is taking.
    CLAIM_LOCK = ""

    def _init_batch_schema(self) -> None:
        self.db.executescript(BATCH_SCHEMA)
        if "webhook_secret" not in {row[1] for row in self.db.execute("PRAGMA table_info(workspaces)")}:
            self.db.execute("ALTER TABLE workspaces ADD COLUMN webhook_secret TEXT")

    # Leases --------------------------------------------------------------------------------
    def beat(self, table: str, owner: str, now: float) -> set[str]:
        """The owner is alive: refresh its rows' heartbeat; returns the ids that still have work
        (the others were cancelled or deleted through another process)."""
        lease = self.LEASED[table]
        self.db.execute(f"UPDATE {table} SET heartbeat = ? WHERE owner = ? AND {lease.active}", (now, owner))
        return {r[0] for r in self.db.execute(f"SELECT id FROM {table} WHERE owner = ? AND {lease.active}", (owner,))}

    def claim(self, table: str, owner: str, now: float, stale_before: float, limit: int, where: str = "") -> list[dict]:
        """Takes over up to `limit` rows with work that nobody runs: never claimed, released, or
        whose owner's heartbeat is older than `stale_before`. Atomic across processes."""
        lease = self.LEASED[table]
        if limit <= 0:
            return []
        with self._transaction():
            rows = self.db.execute(
                f"SELECT {', '.join(lease.columns)} FROM {table} WHERE {lease.active} {where} "
                f"AND (owner IS NULL OR heartbeat IS NULL OR heartbeat < ?) ORDER BY created_at LIMIT ?{self.CLAIM_LOCK}",
                (stale_before, limit)).fetchall()
            for r in rows:
                self.db.execute(f"UPDATE {table} SET owner = ?, heartbeat = ? WHERE id = ?", (owner, now, r[0]))
        return [{**dict(zip(lease.columns, r)), "owner": owner, "heartbeat": now} for r in rows]

    def release(self, table: str, owner: str) -> int:
        """A stopping server hands its rows to whoever starts next."""
        lease = self.LEASED[table]
        return self.db.execute(f"UPDATE {table} SET owner = NULL, heartbeat = NULL WHERE owner = ? AND {lease.active}",
                               (owner,)).rowcount

    # Secrets -------------------------------------------------------------------------------
    def server_secret(self, name: str) -> str:
        """A random secret shared by every process on this database, made on first use."""
        self.db.execute("INSERT INTO server_secrets (name, value, created_at) VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
                        (name, secrets.token_hex(32), time.time()))
        return self.db.execute("SELECT value FROM server_secrets WHERE name = ?", (name,)).fetchone()[0]

    def webhook_secret(self, workspace: str, *, rotate: bool = False) -> str:
        """The workspace's webhook signing secret (made on first use; a new one if `rotate`)."""
        with self._transaction():
            self.db.execute("INSERT INTO workspaces (name, created_at) VALUES (?, ?) ON CONFLICT DO NOTHING",
                            (workspace, time.time()))
            row = self.db.execute("SELECT webhook_secret FROM workspaces WHERE name = ?", (workspace,)).fetchone()
            if row[0] is not None and not rotate:
                return row[0]
            secret = "whsec_" + secrets.token_urlsafe(32)
            self.db.execute("UPDATE workspaces SET webhook_secret = ? WHERE name = ?", (secret, workspace))
        return secret

    # Files ---------------------------------------------------------------------------------
    def insert_file(self, row: dict) -> None:
        self.db.execute(f"INSERT INTO files ({', '.join(FILE_COLUMNS)}) VALUES ({', '.join('?' * len(FILE_COLUMNS))})",
                        [row.get(c) for c in FILE_COLUMNS])

    def get_file(self, file_id: str, workspace: str) -> dict | None:
        row = self.db.execute(f"SELECT {', '.join(FILE_COLUMNS)} FROM files WHERE id = ? AND workspace = ?",
                              (file_id, workspace)).fetchone()
        return dict(zip(FILE_COLUMNS, row)) if row is not None else None

    def list_files(self, workspace: str, purpose: str | None, limit: int, after: str | None, ascending: bool) -> list[dict]:
        return self._page("files", FILE_COLUMNS, "workspace = ?", [workspace], purpose and ("purpose = ?", purpose),
                          limit, after, ascending)

    def delete_file(self, file_id: str, workspace: str) -> dict | None:
        with self._transaction():
            row = self.get_file(file_id, workspace)
            if row is not None:
                self.db.execute("DELETE FROM files WHERE id = ?", (file_id,))
        return row

    def _page(self, table, columns, where, args, extra, limit, after, ascending) -> list[dict]:
        """Newest first (or oldest first), `limit` rows after the row `after`."""
        clauses, args = [where], list(args)
        if extra:
            clauses.append(extra[0])
            args.append(extra[1])
        order = "ASC" if ascending else "DESC"
        if after is not None:
            clauses.append(f"(created_at, id) {'>' if ascending else '<'} (SELECT created_at, id FROM {table} WHERE id = ?)")
            args.append(after)
        rows = self.db.execute(f"SELECT {', '.join(columns)} FROM {table} WHERE {' AND '.join(clauses)} "
                               f"ORDER BY created_at {order}, id {order} LIMIT ?", [*args, limit])
        return [dict(zip(columns, r)) for r in rows]

    # Batches -------------------------------------------------------------------------------
    def insert_batch(self, row: dict) -> None:
        self.db.execute(f"INSERT INTO batches ({', '.join(BATCH_COLUMNS)}) VALUES ({', '.join('?' * len(BATCH_COLUMNS))})",
                        [row.get(c, 0 if c in ("completed", "failed", "total_tokens", "input_offset", "output_bytes",
                                               "error_bytes", "webhook_attempts") else None) for c in BATCH_COLUMNS])

    def get_batch(self, batch_id: str, workspace: str | None, kind: str) -> dict | None:
        """The batch if it is in `workspace` (None: any, for a signed URL that proves access)."""
        row = self.db.execute(f"SELECT {', '.join(BATCH_COLUMNS)} FROM batches WHERE id = ? AND kind = ? "
                              "AND (CAST(? AS TEXT) IS NULL OR workspace = ?)", (batch_id, kind, workspace, workspace)).fetchone()
        return dict(zip(BATCH_COLUMNS, row)) if row is not None else None

    def list_batches(self, workspace: str, kind: str, limit: int, after: str | None) -> list[dict]:
        return self._page("batches", BATCH_COLUMNS, "workspace = ? AND kind = ?", [workspace, kind], None, limit, after, False)

    def cancel_batch(self, batch_id: str, workspace: str, kind: str, now: float) -> dict | None:
        """Marks a running batch `cancelling` (its owner finishes it as `cancelled` at its next
        commit, or whoever claims it next); a finished one is returned as it is."""
        with self._transaction():
            self.db.execute("UPDATE batches SET status = 'cancelling', cancelling_at = ? WHERE id = ? AND workspace = ? "
                            "AND kind = ? AND status IN ('validating', 'in_progress', 'finalizing')",
                            (now, batch_id, workspace, kind))
            return self.get_batch(batch_id, workspace, kind)

    def batch_progress(self, batch_id: str, owner: str, values: dict, now: float) -> str | None:
        """The owner's commit of a chunk's results; returns the batch's status now (None when
        this process no longer owns it)."""
        columns = [c for c in values if c in _PROGRESS_COLUMNS]
        # Only a batch not yet begun changes status here (a cancel meanwhile is kept).
        sets = ", ".join([*(("status = CASE WHEN status = 'validating' THEN ? ELSE status END" if c == "status" else c + " = ?")
                            for c in columns), "heartbeat = ?"])
        row = self.db.execute(f"UPDATE batches SET {sets} WHERE id = ? AND owner = ? RETURNING status",
                              [*(values[c] for c in columns), now, batch_id, owner]).fetchone()
        return row[0] if row is not None else None

    def finish_batch(self, batch_id: str, owner: str, values: dict, files: list[dict]) -> bool:
        """The final state, and the output/error files it publishes, in one transaction. The
        lease ends unless a webhook is still to be delivered."""
        columns = [c for c in values if c in _FINISH_COLUMNS]
        sets = ", ".join(c + " = ?" for c in columns)
        with self._transaction():
            done = self.db.execute(f"UPDATE batches SET {sets} WHERE id = ? AND owner = ?",
                                   [*(values[c] for c in columns), batch_id, owner]).rowcount == 1
            if done:
                for f in files:
                    self.insert_file(f)
                if values.get("webhook_state") != "pending":
                    self.db.execute("UPDATE batches SET owner = NULL, heartbeat = NULL WHERE id = ?", (batch_id,))
        return done

    def record_delivery(self, batch_id: str, owner: str, delivery: dict, state: str, next_at: float | None) -> None:
        cols = [c for c in DELIVERY_COLUMNS if c != "id"]
        with self._transaction():
            self.db.execute(f"INSERT INTO webhook_deliveries ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                            [delivery.get(c) for c in cols])
            release = ", owner = NULL, heartbeat = NULL" if state != "pending" else ""
            self.db.execute(f"UPDATE batches SET webhook_state = ?, webhook_attempts = ?, webhook_next_at = ?{release} "
                            "WHERE id = ? AND owner = ?", (state, delivery["attempt"], next_at, batch_id, owner))

    def webhook_deliveries(self, batch_id: str) -> list[dict]:
        rows = self.db.execute(f"SELECT {', '.join(DELIVERY_COLUMNS)} FROM webhook_deliveries WHERE batch_id = ? ORDER BY id",
                               (batch_id,))
        return [dict(zip(DELIVERY_COLUMNS, r)) for r in rows]


BatchStore.LEASED["batches"] = Leased(BATCH_COLUMNS, _BATCH_ACTIVE)
