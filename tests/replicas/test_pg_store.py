"""The PostgreSQL store on a real server: migrations, the `db migrate` and `keys` CLI, and the
queries whose SQL differs from SQLite's (day grouping, claims that skip each other's rows)."""

from __future__ import annotations

import time

import psycopg
import pytest
import redis

from ferroserve.gateway.keys import make_key
from ferroserve.gateway.pg_migrations import MIGRATIONS
from ferroserve.gateway.pg_store import PostgresStore
from ferroserve.gateway.store import USAGE_COLUMNS
from tests.conftest import free_port, run_cli


def test_migrations_apply_once_and_cli_reports_them(database_url):
    r = run_cli(["db", "migrate", "--database-url", database_url])
    assert r.returncode == 0, r.stderr
    assert f"applied migrations 1" in r.stderr
    r = run_cli(["db", "migrate"], env={"FERROSERVE_DATABASE_URL": database_url})
    assert r.returncode == 0 and f"already at version {MIGRATIONS[-1][0]}" in r.stderr
    with psycopg.connect(database_url) as conn:
        assert [v for (v,) in conn.execute("SELECT version FROM schema_migrations ORDER BY version")] == \
            [v for v, _ in MIGRATIONS]


def test_db_migrate_without_url_or_with_a_wrong_one_is_a_clear_error():
    r = run_cli(["db", "migrate"], env={"FERROSERVE_DATABASE_URL": ""})
    assert r.returncode == 2 and "needs --database-url" in r.stderr
    r = run_cli(["db", "migrate", "--database-url", "mysql://x/y"])
    assert r.returncode == 2 and "postgresql://" in r.stderr


def test_keys_cli_on_postgres(database_url):
    r = run_cli(["keys", "create", "--workspace", "team", "--rpm", "5", "--budget-usd", "2.5", "--database-url", database_url])
    assert r.returncode == 0, r.stderr
    secret = r.stdout.strip()
    listing = run_cli(["keys", "list", "--database-url", database_url]).stdout.splitlines()
    assert len(listing) == 2 and "\tteam\t" in listing[1] and listing[1].endswith("\t2.5")
    key_id = listing[1].split("\t")[0]
    store = PostgresStore(database_url)
    try:
        version = store.data_version()
        [key] = store.keys()
        assert key.id == key_id and key.rpm == 5 and key.secret_sha256 and secret.startswith(key.hint.rstrip("…"))
        assert run_cli(["keys", "revoke", key_id, "--database-url", database_url]).returncode == 0
        assert store.data_version() > version  # what replicas poll to reload their keys
        assert store.keys()[0].revoked_at is not None
        assert run_cli(["keys", "revoke", key_id, "--database-url", database_url]).returncode == 1
    finally:
        store.close()


def test_usage_totals_by_day_and_rows_newest_first(database_url):
    store = PostgresStore(database_url)
    try:
        day = 1_767_225_600.0  # 2026-01-01T00:00:00Z
        rows = [("r1", day + 10, None, "w", "embeddings", "m", "local", 0, 3, 0, 0, 0.5, 1.0, None, 200, None, None, None),
                ("r2", day + 86400 + 5, None, "w", "chat", "m", "local", 1, 4, 6, 2, 0.25, 2.0, 1.5, 200, None, None, None),
                ("r3", day + 86400 + 5, None, "w", "chat", "n", "local", 0, 1, 1, 0, 0.125, 2.0, None, 500, "x", "p", "a\nb")]
        assert len(rows[0]) == len(USAGE_COLUMNS)
        store.insert_usage(rows)
        by_day = store.usage_totals(workspace="w", start=None, end=None, model=None, group_by="day")
        assert by_day == [("2026-01-01", 1, 3, 0, 0, 0.5), ("2026-01-02", 2, 5, 7, 2, 0.375)]
        newest = store.usage_rows(workspace="w", start=None, end=None, model=None, limit=2)
        assert [r["request_id"] for r in newest] == ["r3", "r2"]  # same time: the later insert first
        assert store.spend_since(day) == {"w": 0.875}
    finally:
        store.close()


def test_claims_by_two_replicas_take_disjoint_rows(database_url):
    a, b = PostgresStore(database_url), PostgresStore(database_url)
    try:
        now = time.time()
        for i in range(6):
            a.insert_batch({"id": f"batch_{i}", "workspace": "w", "kind": "openai", "status": "validating",
                            "endpoint": "/v1/embeddings", "input_path": "x", "total": 1, "created_at": now + i})
        # A holds its claim's row locks while B claims: B skips them instead of waiting.
        with a._transaction():
            first = a.db.execute("SELECT id FROM batches ORDER BY created_at LIMIT 3 FOR UPDATE").fetchall()
            got_b = b.claim("batches", "B", now, now - 10, 6)
        assert {r["id"] for r in got_b} == {f"batch_{i}" for i in range(3, 6)} and len(first) == 3
        got_a = a.claim("batches", "A", now, now - 10, 6)
        assert {r["id"] for r in got_a} == {f"batch_{i}" for i in range(3)}
        assert a.claim("batches", "A", now, now - 10, 6) == []  # B's are fresh: not stale yet
        # Twenty seconds on, every heartbeat is stale: all six are A's to take.
        assert len(a.claim("batches", "A", now + 20, now + 15, 6)) == 6
        assert a.get_batch("batch_4", None, "openai")["owner"] == "A"
    finally:
        a.close()
        b.close()


def test_a_connection_the_database_dropped_is_replaced_after_one_failed_call(database_url):
    store = PostgresStore(database_url)
    try:
        assert store.keys() == []
        with psycopg.connect(database_url, autocommit=True) as admin:
            killed = admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                   "WHERE datname = current_database() AND pid <> pg_backend_pid()").fetchall()
        assert killed
        try:
            store.keys()  # may fail once: the pool learns the connection is gone
        except psycopg.OperationalError:
            pass
        deadline = time.monotonic() + 10
        while True:
            try:
                assert store.keys() == []
                break
            except psycopg.OperationalError:
                assert time.monotonic() < deadline, "the store did not reconnect"
                time.sleep(0.1)
    finally:
        store.close()


def test_the_redis_client_holds_one_connection_and_starts_without_redis(redis_server):
    """A held connection when Redis is up (no pool checkout per call); when it is down at start,
    a client that connects on first use: no exception at start, a RedisError per call."""
    from ferroserve.gateway.shared_limits import connect

    client = connect(redis_server.new_url())
    try:
        assert client.connection is not None
        held = client.connection
        for _ in range(3):
            assert client.ping()
        assert client.connection is held
    finally:
        client.close()
    down = connect(f"redis://127.0.0.1:{free_port()}/0")
    assert down.connection is None
    with pytest.raises(redis.ConnectionError):
        down.ping()


def test_serve_with_an_unreachable_database_or_redis_exits_2_with_one_clear_line():
    port = free_port()  # nothing listens there
    for flags, words in ((["--database-url", f"postgresql://fs:secret@127.0.0.1:{port}/db"], "cannot use the database"),
                         (["--redis-url", f"redis://127.0.0.1:{port}/0"], "cannot reach Redis"),
                         (["--database-url", "mysql://127.0.0.1/db"], "must be a postgresql:// URL"),
                         (["--pg-async-commit"], "--pg-async-commit applies to a PostgreSQL store")):
        r = run_cli(["serve", "--port", str(free_port()), *flags], timeout=60)
        assert r.returncode == 2, r.stderr
        assert words in r.stderr and "secret" not in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_stored_responses_chain_update_finish_and_claim_on_postgres(database_url):
    store = PostgresStore(database_url)
    try:
        base = {"workspace": "w", "status": "completed", "model": "m", "request": "{}", "input_items": "[]",
                "output": "[]", "created_at": 1.0}
        store.insert_response({**base, "id": "resp_1"})
        store.insert_response({**base, "id": "resp_2", "previous_response_id": "resp_1", "created_at": 2.0})
        store.insert_response({**base, "id": "resp_3", "previous_response_id": "resp_2", "created_at": 3.0,
                               "status": "queued", "job": '{"x": 1}', "key_id": "key_a"})
        assert [r["id"] for r in store.response_chain("resp_3", "w")] == ["resp_1", "resp_2", "resp_3"]
        assert store.response_chain("resp_3", "other") == []
        [claimed] = store.claim_responses("A", 10.0, 5.0, 8)  # only the queued one has a job
        assert claimed["id"] == "resp_3" and claimed["owner"] == "A"
        assert store.beat_responses("A", 11.0) == {"resp_3"}
        assert store.update_response("resp_3", {"status": "in_progress"})
        assert store.finish_response("resp_3", "A", {"status": "completed", "output": '["done"]', "completed_at": 12.0})
        got = store.get_response("resp_3", "w")
        assert got["status"] == "completed" and got["output"] == '["done"]' and got["completed_at"] == 12.0
        assert not store.update_response("resp_3", {"status": "in_progress"})  # finished: left alone
        assert store.delete_response("resp_2", "w") and store.get_response("resp_2", "w") is None
        assert [r["id"] for r in store.response_chain("resp_3", "w")] == ["resp_3"]  # a deleted link ends it
    finally:
        store.close()


# Tables only one backend has, and why: PostgreSQL records its applied migrations and keeps
# the key-change counter replicas poll in a row (SQLite uses its own `PRAGMA data_version`).
PG_ONLY_TABLES = {"schema_migrations", "key_version"}
# Columns SQLite has implicitly: usage's newest-first tie-break orders by `rowid`, which
# PostgreSQL spells out as an identity column of that name.
PG_EXPLICIT_ROWID = {"usage"}


def test_sqlite_and_postgres_schemas_have_the_same_tables_and_columns(database_url, tmp_path):
    """The two schemas are written twice (store.py / batch_store.py for SQLite, pg_migrations.py
    for PostgreSQL): a column added to one and not the other would break only the other backend."""
    from ferroserve.gateway.store import Store

    sqlite = Store(tmp_path)
    try:
        tables = [t for (t,) in sqlite.db.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")]
        lite = {t: {row[1] for row in sqlite.db.execute(f"PRAGMA table_info({t})")} for t in tables}
        for t in PG_EXPLICIT_ROWID:
            lite[t].add("rowid")
    finally:
        sqlite.close()
    PostgresStore(database_url).close()  # applies the migrations
    with psycopg.connect(database_url) as conn:
        pg: dict[str, set[str]] = {}
        for table, column in conn.execute(
                "SELECT table_name, column_name FROM information_schema.columns WHERE table_schema = 'public'"):
            pg.setdefault(table, set()).add(column)
    assert set(pg) - PG_ONLY_TABLES == set(lite)
    for table, columns in lite.items():
        assert pg[table] == columns, f"{table}: only SQLite {columns - pg[table]}, only PostgreSQL {pg[table] - columns}"


def test_scripts_on_the_held_connection_survive_a_script_flush_and_a_killed_connection(redis_server):
    """The admission scripts are sent by EVALSHA on the held connection, packed by
    shared_limits.Script: every call counts exactly once, including the one after Redis forgot
    the script (SCRIPT FLUSH, as after a restart: NOSCRIPT, loaded again) and the one after
    Redis dropped the connection (CLIENT KILL: reconnected); keys and arguments arrive intact."""
    from ferroserve.gateway.shared_limits import _ADMIT_REQUEST, Pipe, Script, connect

    url = redis_server.new_url()
    client = connect(url)
    admin = redis.Redis.from_url(url)
    try:
        script = Script(Pipe(client), _ADMIT_REQUEST)
        key = "ferroserve:rate:clé-ü"  # not ASCII: bytes lengths in the packed command
        counts = []
        for i in range(9):
            if i == 3:
                admin.script_flush()
            if i == 6:
                assert admin.client_kill_filter(_type="normal", skipme=True) >= 1
            ok, started, requests, tokens, what = script(keys=[key], args=[repr(1000.5), 60000, 100, -1])
            assert (ok, started, tokens, what) == (1, b"1000.5", 0, b"")
            counts.append(requests)
        assert counts == list(range(1, 10))
        assert admin.hget(key, "requests") == b"9"
        assert client.connection is not None  # still the held connection, not a pool
    finally:
        client.close()
        admin.close()


def test_calls_in_flight_on_the_held_connection_get_their_own_answers_in_any_order(redis_server):
    """shared_limits.Pipe: calls written before earlier ones are read (an admission travelling
    while its request's work runs, and others meanwhile) each get their own answer whatever
    order they are read in, redis-py's own calls on the connection read after them, a NOSCRIPT
    among them is handed to redis-py for that call alone, and a connection killed under calls
    in flight fails each of them over to redis-py's reconnecting path: counted exactly once."""
    from ferroserve.gateway.shared_limits import _ADMIT_REQUEST, Pipe, Script, _pack, connect

    url = redis_server.new_url()
    client = connect(url)
    admin = redis.Redis.from_url(url)
    try:
        pipe = Pipe(client)
        script = Script(pipe, _ADMIT_REQUEST)
        keys = [f"ferroserve:rate:k{i}" for i in range(4)]
        for i, key in enumerate(keys):  # key i starts with i requests
            admin.hset(key, mapping={"started": "5.0", "requests": i, "tokens": 0})

        def call(i: int):
            return script.send(keys=[keys[i]], args=[repr(7.0), 60000, 100, -1])

        calls = [call(i) for i in range(4)]
        incr = pipe.send(_pack((b"INCRBYFLOAT", "ferroserve:spend:x", "0.25")), what="test")
        for i in (2, 0, 3, 1):  # read out of order: each its own key's count
            assert script.result(calls[i]) == [1, b"5.0", i + 1, 0, b""]
        assert not incr.done  # nobody asked for it yet
        pipe.drain()  # (what every fall-back to redis-py's path does first)
        assert incr.done and incr.value == b"0.25"
        assert client.get("ferroserve:spend:x") == b"0.25"

        calls = [call(0), call(1)]
        admin.script_flush()  # Redis forgets the script: both answers are NOSCRIPT
        calls.append(call(2))
        assert [script.result(c)[2] for c in calls] == [2, 3, 4]

        calls = [call(i) for i in range(4)]
        pipe.result(calls[3][0])  # all four ran and are read: now one in flight
        calls = [call(0)]
        assert admin.client_kill_filter(_type="normal", skipme=True) >= 1
        # Written before the kill: its answer is lost with the connection; redis-py's retry runs it again.
        counted = script.result(calls[0])[2]
        assert counted in (4, 5)
        assert int(admin.hget(keys[0], "requests")) == counted
        assert script(keys=[keys[1]], args=[repr(7.0), 60000, 100, -1])[2] == 5
        assert client.connection is not None
    finally:
        client.close()
        admin.close()
