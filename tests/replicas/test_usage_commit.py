"""Usage records on PostgreSQL: the group commit, `--pg-async-commit`, and that nothing answered
is lost, on the real servers (tests/replicas/conftest.py).

Which transaction wrote a row is PostgreSQL's own `xmin`; which durability a commit ran at is
read inside it by a trigger (`current_setting('synchronous_commit')`), on a database whose own
setting is `on` (the test cluster's default is off, for speed).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import signal
import threading
import time

import httpx
import psycopg
import pytest

from ferroserve.gateway.keys import make_key
from ferroserve.gateway.pg_store import PostgresStore
from ferroserve.gateway.pg_usage import PgUsageWriter
from ferroserve.gateway.store import USAGE_COLUMNS
from ferroserve.gateway.worker import StoreWorker
from tests.conftest import Server, run_cli
from tests.gateway.conftest import EMBED, auth
from tests.replicas.test_two_replicas import _embedding_model_arg


def _row(i: int, cost: float = 0.0) -> tuple:
    row = (f"req-{i}", time.time(), None, "w", "embeddings", "m", "local", 0, 3, 0, 0, cost, 1.0, None, 200, None, None,
           None)
    assert len(row) == len(USAGE_COLUMNS)
    return row


def _database_with_durable_commits(postgres) -> str:
    """A new database whose commits wait for the WAL flush (synchronous_commit = on, PostgreSQL's
    default), with a trigger noting the setting each INSERT into usage or api_keys commits at."""
    url = postgres.new_database()
    with psycopg.connect(postgres.url(), autocommit=True) as admin:
        admin.execute(f"ALTER DATABASE {url.rsplit('/', 1)[1]} SET synchronous_commit = on")
    PostgresStore(url).close()  # the schema
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE commit_mode (tbl TEXT, synchronous_commit TEXT, statement_timeout TEXT)")
        conn.execute("""CREATE FUNCTION note_commit_mode() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                INSERT INTO commit_mode VALUES (TG_TABLE_NAME, current_setting('synchronous_commit'),
                                                current_setting('statement_timeout'));
                RETURN NULL;
            END $$""")
        for table in ("usage", "api_keys"):
            conn.execute(f"CREATE TRIGGER {table}_commit_mode AFTER INSERT ON {table} "
                         "FOR EACH STATEMENT EXECUTE FUNCTION note_commit_mode()")
    return url


def _commit_modes(url: str) -> list[tuple]:
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute("SELECT tbl, synchronous_commit, statement_timeout FROM commit_mode").fetchall()
        conn.execute("TRUNCATE commit_mode")
    return sorted(set(rows))


def test_pg_async_commit_applies_to_usage_records_only_and_keeps_the_urls_options(postgres):
    url = _database_with_durable_commits(postgres)
    # The operator's own options in the URL reach both connections.
    url_with_options = url + "?options=-c%20statement_timeout%3D12345"
    for async_commit, usage_mode in ((True, "off"), (False, "on")):
        store = PostgresStore(url_with_options, usage_async_commit=async_commit)
        try:
            store.insert_usage([_row(1)])
            store.insert_usage([_row(i) for i in range(2500)])  # three statements, one transaction
            store.insert_key(make_key(workspace="w", prefix="sk-", now=time.time())[1])
        finally:
            store.close()
        assert _commit_modes(url) == [("api_keys", "on", "12345ms"), ("usage", usage_mode, "12345ms")], async_commit
    with psycopg.connect(url) as conn:
        # Each insert_usage was one transaction, however many statements it took.
        assert conn.execute("SELECT count(DISTINCT xmin::text) FROM usage WHERE request_id <> 'req-1'").fetchone()[0] == 2


def test_answers_queued_during_a_commit_share_the_next_one_and_wait_for_it(postgres):
    url = _database_with_durable_commits(postgres)
    worker = StoreWorker(PostgresStore(url, usage_async_commit=True), on_external_change=lambda store: None)
    rows_seen_at_first_answer: list[int] = []

    def count_rows(_future) -> None:
        with psycopg.connect(url) as conn:
            rows_seen_at_first_answer.append(conn.execute("SELECT count(*) FROM usage").fetchone()[0])

    async def answer_200() -> None:
        writer_free = threading.Event()
        # The writer is busy (as during a commit) while 200 answered requests queue their records.
        busy = worker.call(lambda store: writer_free.wait(10))
        answers = [worker.record_committed(_row(i)) for i in range(200)]
        answers[0].add_done_callback(count_rows)
        await asyncio.sleep(0.1)
        assert not any(a.done() for a in answers), "an answer was released before its record was committed"
        writer_free.set()
        await asyncio.wait_for(asyncio.gather(busy, *answers), 10)

    try:
        asyncio.run(answer_200())
    finally:
        worker.close()
    assert rows_seen_at_first_answer == [200]  # released only after the commit, which held all of them
    with psycopg.connect(url) as conn:
        rows, transactions = conn.execute("SELECT count(*), count(DISTINCT xmin::text) FROM usage").fetchone()
    assert (rows, transactions) == (200, 1)
    assert (worker.written, worker.commits, worker.failed) == (200, 1, 0)


def test_the_loop_writer_groups_what_queued_during_a_commit_and_answers_only_after_it(postgres):
    """The server's writer on PostgreSQL (pg_usage.py, on the event loop): the first record's
    INSERT is held up by a lock on the table while 200 answered requests queue theirs; those
    200 go in the next commit, in one transaction, and none is released before it."""
    url = _database_with_durable_commits(postgres)
    store = PostgresStore(url, usage_async_commit=True)
    writer = store.usage_writer()
    rows_seen_at_answer: list[int] = []

    def count_rows(_future) -> None:
        with psycopg.connect(url) as conn:
            rows_seen_at_answer.append(conn.execute("SELECT count(*) FROM usage").fetchone()[0])

    async def answer_200() -> None:
        lock = await psycopg.AsyncConnection.connect(url)
        await lock.execute("LOCK TABLE usage IN EXCLUSIVE MODE")
        first = writer.record_committed(_row(0))  # its INSERT waits for the lock
        await asyncio.sleep(0.2)
        answers = [writer.record_committed(_row(i)) for i in range(1, 201)]
        answers[0].add_done_callback(count_rows)
        await asyncio.sleep(0.2)
        assert writer.queue_depth() == 201
        assert not first.done() and not any(a.done() for a in answers), "an answer was released before its commit"
        await lock.rollback()
        await lock.close()
        await asyncio.wait_for(asyncio.gather(first, *answers), 10)
        assert writer.queue_depth() == 0
        await writer.aclose()

    try:
        asyncio.run(answer_200())
    finally:
        store.close()
    assert rows_seen_at_answer == [201]
    with psycopg.connect(url) as conn:
        groups = conn.execute("SELECT count(*) FROM usage GROUP BY xmin::text ORDER BY count(*)").fetchall()
    assert groups == [(1,), (200,)]
    assert (writer.written, writer.commits, writer.failed) == (201, 2, 0)
    assert _commit_modes(url) == [("usage", "off", "0")]  # --pg-async-commit's durability, as insert_usage's


def test_a_usage_query_waits_for_the_records_queued_before_it(postgres, redis_server):
    """Metered 404s are answered without waiting for their records; a usage query asked after
    them must still count every one (`Gateway.call` waits for the loop writer), even while the
    writer is held up by a lock on the usage table (which does not block reading it)."""
    url = postgres.new_database()
    key = run_cli(["keys", "create", "--workspace", "w", "--rpm", "100000", "--database-url", url]).stdout.strip()
    srv = Server(["--log-level", "warning", "--model", _embedding_model_arg(), "--database-url", url,
                  "--redis-url", redis_server.new_url()])
    try:
        srv.wait_ready()
        with httpx.Client(base_url=srv.url, headers=auth(key), timeout=30) as client:
            assert client.get("/v1/usage").json()["total_requests"] == 0
            lock = psycopg.connect(url)
            lock.execute("LOCK TABLE usage IN EXCLUSIVE MODE")
            try:
                assert [_post(client, "no-such-model")[0] for _ in range(10)] == [404] * 10
                # The gauge counts the records waiting on PostgreSQL's usage writer.
                metrics = client.get("/metrics").text
                assert "ferroserve_usage_queue_depth 10\n" in metrics, [
                    line for line in metrics.splitlines() if "usage_queue" in line]
                with concurrent.futures.ThreadPoolExecutor(1) as pool:
                    usage = pool.submit(client.get, "/v1/usage")
                    time.sleep(0.5)
                    assert not usage.done(), "the usage query was answered before the records queued before it"
                    lock.rollback()
                    assert usage.result(30).json()["total_requests"] == 10
            finally:
                lock.close()
    finally:
        srv.stop()


def _post(client: httpx.Client, model: str) -> tuple[int, str, int]:
    r = client.post("/v1/embeddings", json={"model": model, "input": "count me"})
    tokens = r.json()["usage"]["prompt_tokens"] if r.status_code == 200 else 0
    return r.status_code, r.headers["x-request-id"], tokens


def test_concurrent_usage_sums_exactly_and_a_sigterm_loses_no_answered_request(postgres, redis_server):
    url = _database_with_durable_commits(postgres)
    r = run_cli(["keys", "create", "--workspace", "metered", "--budget-usd", "100000", "--rpm", "100000",
                 "--database-url", url])
    assert r.returncode == 0, r.stderr
    key = r.stdout.strip()
    srv = Server(["--log-level", "info", "--model", _embedding_model_arg(), "--price", f"{EMBED}=1000000:0",
                  "--database-url", url, "--redis-url", redis_server.new_url(), "--pg-async-commit"])
    try:
        srv.wait_ready()
        # Concurrent answers: embeddings (the answer waits for the commit) and metered 404s
        # (recorded without waiting), 16 at a time.
        with httpx.Client(base_url=srv.url, headers=auth(key), timeout=60) as client, \
                concurrent.futures.ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(lambda i: _post(client, EMBED if i % 3 else "no-such-model"), range(96)))
        assert sorted({status for status, _, _ in answers}) == [200, 404]
        with psycopg.connect(url) as conn:
            rows = dict(conn.execute("SELECT request_id, prompt_tokens FROM usage WHERE status = 200").fetchall())
            spent = conn.execute("SELECT SUM(cost_usd) FROM usage").fetchone()[0]
        answered_200 = {rid: tokens for status, rid, tokens in answers if status == 200}
        assert rows == answered_200  # every answered embedding, each once, with its tokens, already committed
        assert spent == sum(answered_200.values())  # $1 a token
        usage = httpx.get(srv.url + "/v1/usage", headers=auth(key), timeout=30).json()
        assert usage["total_requests"] == 96 and usage["total_tokens_in"] == sum(answered_200.values()), usage
        assert [mode for tbl, mode, _ in _commit_modes(url) if tbl == "usage"] == ["off"]

        # SIGTERM with the writer behind: every request that got an answer has its usage row.
        # A transaction holding the usage table stalls the writer's INSERT; metered 404s are
        # answered without waiting for their records, which pile up in its queue. The lock
        # goes a second after the SIGTERM, once the server has stopped serving and asked its
        # writer to stop: the stopping writer must still write every record queued.
        answered: list[tuple[int, str, int]] = []
        stop = threading.Event()

        def client_loop(i: int) -> None:
            with httpx.Client(base_url=srv.url, headers=auth(key), timeout=30) as client:
                while not stop.is_set():
                    try:
                        answered.append(_post(client, "no-such-model"))
                    except httpx.HTTPError:
                        return  # the server is going away

        lock = psycopg.connect(url)
        lock.execute("LOCK TABLE usage IN EXCLUSIVE MODE")
        threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while len(answered) < 60:
            assert time.monotonic() < deadline, "too few answers before the SIGTERM"
            time.sleep(0.01)
        srv.proc.send_signal(signal.SIGTERM)
        time.sleep(1.0)
        lock.rollback()
        lock.close()
        assert srv.proc.wait(30) == 0
        stop.set()
        for t in threads:
            t.join(30)
    finally:
        srv.stop() if srv.proc.poll() is None else srv.log.close()
    metered = {rid for status, rid, _ in answered if status == 404}
    assert len(metered) >= 60, sorted({status for status, _, _ in answered})
    with psycopg.connect(url) as conn:
        stored = {rid for (rid,) in conn.execute("SELECT request_id FROM usage")}
    assert metered <= stored, f"{len(metered - stored)} answered requests have no usage row after SIGTERM"


def test_a_lone_record_goes_through_the_prepared_statement_exactly_and_after_a_dropped_connection(postgres):
    """The one-row path (pg_usage.py: a `PREPARE`d INSERT driven through libpq with text
    parameters): every column comes back as written (float8 to the last bit, NULLs, ints), a NUL
    in a captured prompt becomes U+FFFD instead of cutting the text, and after the database
    dropped the writer's connection the next record is written on a new one (prepared again)."""
    url = postgres.new_database()
    store = PostgresStore(url, usage_async_commit=True)
    writer = store.usage_writer()
    first = ("req-exact", 1765300000.1234567, "key-1", "w", "chat", "m", "local", 1, 7, 11, 5, 3.0000000000000004e-07,
             12.345, None, 200, None, "a\x00b é", "x\ny")
    second = ("req-after", 1765300001.5, None, "w", "embeddings", None, None, 0, 0, 0, 0, 0.0, 0.25, 0.125, 404,
              "model_not_found", None, None)

    async def write() -> list[str]:
        await writer.record_committed(first)
        cursor = await writer._conn.execute("SELECT name FROM pg_prepared_statements")
        prepared = [name for (name,) in await cursor.fetchall()]
        with psycopg.connect(postgres.url(), autocommit=True) as admin:
            assert admin.execute("SELECT pg_terminate_backend(%s)", (writer._conn.info.backend_pid,)).fetchone()[0]
        await asyncio.wait_for(writer.record_committed(second), 10)
        await writer.aclose()
        return prepared

    try:
        prepared = asyncio.run(write())
    finally:
        store.close()
    assert prepared == ["ferroserve_usage_insert"]
    with psycopg.connect(url) as conn:
        rows = conn.execute(f"SELECT {', '.join(USAGE_COLUMNS)} FROM usage ORDER BY rowid").fetchall()
    assert rows == [first[:16] + ("a\ufffdb é", "x\ny"), second]
    assert (writer.written, writer.failed) == (2, 0)


def test_a_lone_record_commits_before_commit_now_returns_and_a_slow_or_failed_one_goes_to_the_writer(postgres):
    """`PgUsageWriter.commit_now` (a lone answer at --pg-async-commit, pg_usage.py): the record
    is committed on the calling coroutine before it returns None; a commit held up by a lock on
    the table is handed to the writer's task after a bounded wait (a future, done only after the
    commit; records queued meanwhile go after it); after the database dropped the writer's
    connection the record is written once on a new one; at the database's durability nothing
    is committed with the loop blocked."""
    url = _database_with_durable_commits(postgres)
    store = PostgresStore(url, usage_async_commit=True)
    writer = store.usage_writer()

    def stored() -> list[str]:
        with psycopg.connect(url) as conn:
            return [rid for (rid,) in conn.execute("SELECT request_id FROM usage ORDER BY rowid")]

    async def lone_records() -> None:
        first = writer.commit_now(_row(0))  # no connection yet: queued for the writer's task
        assert first is not None
        await asyncio.wait_for(first, 10)
        # Inline (None) unless the commit took longer than the bound, which a loaded machine's
        # scheduling can cause now and then: then it was handed over, and is awaited.
        inline = 0
        for i in range(1, 21):
            committed = writer.commit_now(_row(i))
            if committed is None:
                inline += 1
                assert stored()[-1] == f"req-{i}"  # committed before commit_now returned
            else:
                await asyncio.wait_for(committed, 10)
        assert inline > 0, "no lone record was committed inline"
        assert stored() == [f"req-{i}" for i in range(21)]

        lock = psycopg.connect(url)
        lock.execute("LOCK TABLE usage IN EXCLUSIVE MODE")
        began = time.perf_counter()
        slow = writer.commit_now(_row(21))  # its INSERT waits for the lock: handed over
        held = time.perf_counter() - began
        assert slow is not None, "commit_now returned before its record was committed"
        assert held < 0.1, f"the loop was held {held * 1000:.0f} ms"
        after = writer.record_committed(_row(22))
        busy = writer.commit_now(_row(23))  # the writer is busy: queued behind, not inline
        assert busy is not None
        await asyncio.sleep(0.3)
        assert not slow.done() and not after.done() and not busy.done(), "an answer was released before its commit"
        assert writer.queue_depth() == 3
        lock.rollback()
        lock.close()
        await asyncio.wait_for(asyncio.gather(slow, after, busy), 10)
        assert stored() == [f"req-{i}" for i in range(24)]

        with psycopg.connect(postgres.url(), autocommit=True) as admin:
            assert admin.execute("SELECT pg_terminate_backend(%s)", (writer._conn.info.backend_pid,)).fetchone()[0]
        time.sleep(0.3)
        retried = writer.commit_now(_row(24))  # fails on the dropped connection: queued again
        assert retried is not None, "a record that failed on the loop was let go as committed"
        await asyncio.wait_for(retried, 10)
        again = writer.commit_now(_row(25))  # on the new connection
        if again is not None:
            await asyncio.wait_for(again, 10)
        await writer.aclose()

    try:
        asyncio.run(lone_records())
    finally:
        store.close()
    assert stored() == [f"req-{i}" for i in range(26)]  # each once, in order
    assert (writer.written, writer.failed) == (26, 0)
    assert _commit_modes(url) == [("usage", "off", "0")]

    durable = PostgresStore(url)
    durable_writer = durable.usage_writer()

    async def at_database_durability() -> None:
        await durable_writer.record_committed(_row(26))
        for i in range(27, 37):  # a WAL flush (none on this test cluster): never with the loop blocked
            committed = durable_writer.commit_now(_row(i))
            assert committed is not None, "committed inline at the database's durability"
            await asyncio.wait_for(committed, 10)
        await durable_writer.aclose()

    try:
        asyncio.run(at_database_durability())
    finally:
        durable.close()
    assert stored()[-11:] == [f"req-{i}" for i in range(26, 37)]


def _loop_runners() -> list:
    runners = [pytest.param(asyncio.run, id="asyncio")]
    try:
        import uvloop  # the server's loop when installed (cli.py)

        runners.append(pytest.param(uvloop.run, id="uvloop"))
    except ImportError:
        pass
    return runners


@pytest.mark.parametrize("run", _loop_runners())
def test_the_writers_socket_stays_watched_and_is_let_go_when_the_database_drops_it(postgres, run):
    """Between INSERTs the writer's socket stays registered with the loop (pg_usage.py), also
    after psycopg's own calls on the connection (which add and remove their reader on it). When
    the database drops the connection (libpq closes the socket), the loop does not spin on it,
    and the next record goes on a new connection, once, which is watched afresh (it may get the
    dropped socket's file descriptor number)."""
    url = postgres.new_database()
    store = PostgresStore(url)  # the database's durability: every record through the writer's task
    writer = store.usage_writer()

    async def records() -> float:
        await writer.record_committed(_row(0))  # connects and prepares (psycopg's reader)
        await writer.record_committed(_row(1))  # the one-row path: the socket registered
        await asyncio.wait_for(asyncio.gather(*[writer.record_committed(_row(i)) for i in (2, 3)]), 10)  # psycopg's execute
        await asyncio.wait_for(writer.record_committed(_row(4)), 10)  # registered again
        with psycopg.connect(postgres.url(), autocommit=True) as admin:
            assert admin.execute("SELECT pg_terminate_backend(%s)", (writer._conn.info.backend_pid,)).fetchone()[0]
        cpu = time.process_time()
        await asyncio.sleep(0.5)
        spent = time.process_time() - cpu
        await asyncio.wait_for(writer.record_committed(_row(5)), 10)
        await writer.aclose()
        return spent

    try:
        spent = run(records())
    finally:
        store.close()
    assert spent < 0.2, f"the loop spent {spent:.2f} s of CPU in 0.5 s on a dropped connection's socket"
    with psycopg.connect(url) as conn:
        assert [rid for (rid,) in conn.execute("SELECT request_id FROM usage ORDER BY rowid")] == [f"req-{i}" for i in range(6)]
    assert (writer.written, writer.failed) == (6, 0)
