"""Background responses outlive the process that accepted them: two real servers share one
gateway database (as replicas would); a crash of the owner, a graceful restart, and a cancel
that reaches the other process all end in a final state, with the usage metered once."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import httpx
import openai
import pytest

from ferroserve.api.response_jobs import HEARTBEAT_S, STALE_S
from tests.conftest import Server
from tests.gateway.conftest import auth, create_key, usage_rows

MODEL = "smollm2"
LONG = {"model": MODEL, "input": "Write a very long story about the sea.", "background": True, "temperature": 0}


@pytest.fixture()
def shared(request):
    """A data dir with a key, and a way to start servers on it (stopped at the end)."""
    data_dir = Path(tempfile.mkdtemp(prefix="ferroserve-durable-"))
    key = create_key(data_dir, "alpha")
    servers: list[Server] = []

    def start() -> Server:
        server = Server(["--log-level", "info"], data_dir=data_dir)
        servers.append(server)
        server.wait_ready()
        return server

    yield data_dir, key, start
    for server in servers:
        server.stop()


def _create(server: Server, key: str, max_tokens: int) -> tuple[str, str]:
    r = httpx.post(server.url + "/v1/responses", json={**LONG, "max_output_tokens": max_tokens}, headers=auth(key), timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["id"], r.headers["x-request-id"]


def _wait_status(client: openai.OpenAI, rid: str, done: tuple[str, ...], timeout: float):
    deadline = time.monotonic() + timeout
    while (got := client.responses.retrieve(rid)).status not in done:
        assert time.monotonic() < deadline, f"still {got.status} after {timeout} s"
        time.sleep(0.05)
    return got


def _usage_of(data_dir: Path, request_id: str, timeout: float = 10) -> list:
    deadline = time.monotonic() + timeout
    while not (rows := [r for r in usage_rows(data_dir) if r["request_id"] == request_id]):
        assert time.monotonic() < deadline, "no usage record"
        time.sleep(0.1)
    time.sleep(0.5)  # a second record would be written by now
    return [r for r in usage_rows(data_dir) if r["request_id"] == request_id]


def test_a_crashed_owners_response_is_finished_by_the_other_process(shared):
    data_dir, key, start = shared
    a, b = start(), start()
    rid, request_id = _create(a, key, 200)
    client = openai.OpenAI(base_url=b.url + "/v1", api_key=key, max_retries=0)
    _wait_status(client, rid, ("in_progress",), 30)
    a.kill()  # mid-generation: nothing of it was written
    assert client.responses.retrieve(rid).status == "in_progress"
    began = time.monotonic()
    got = _wait_status(client, rid, ("completed", "incomplete", "failed", "cancelled"), STALE_S + 4 * HEARTBEAT_S + 120)
    assert got.status in ("completed", "incomplete"), got
    assert got.output_text and 0 < got.usage.output_tokens <= 200
    assert time.monotonic() - began > STALE_S - 2 * HEARTBEAT_S  # claimed only once the owner fell silent
    # The same answer as the foreground one (temperature 0), and one usage record: the rerun's.
    fresh = client.responses.create(**{**LONG, "background": False, "max_output_tokens": 200})
    assert got.output_text == fresh.output_text
    [row] = _usage_of(data_dir, request_id)
    assert row["status"] == 200 and row["completion_tokens"] == got.usage.output_tokens
    assert f'"msg":"background response recovered","response_id":"{rid}"' in b.log_path.read_text()


def test_a_restarted_server_finishes_what_it_accepted(shared):
    data_dir, key, start = shared
    a = start()
    rid, request_id = _create(a, key, 200)
    client = openai.OpenAI(base_url=a.url + "/v1", api_key=key, max_retries=0)
    _wait_status(client, rid, ("in_progress",), 30)
    a.stop()  # graceful: the running response is handed over, not lost
    assert "background responses released" in a.log_path.read_text()
    began = time.monotonic()
    a2 = start()
    client = openai.OpenAI(base_url=a2.url + "/v1", api_key=key, max_retries=0)
    got = _wait_status(client, rid, ("completed", "incomplete", "failed", "cancelled"), 120)
    assert got.status in ("completed", "incomplete") and got.output_text
    # Released rows need no heartbeat to go stale: picked up at start.
    assert time.monotonic() - began < STALE_S + 60
    [row] = _usage_of(data_dir, request_id)
    assert row["completion_tokens"] == got.usage.output_tokens


def test_cancel_through_another_process_stops_the_owner(shared):
    data_dir, key, start = shared
    a, b = start(), start()
    rid, request_id = _create(a, key, 2000)
    via_b = openai.OpenAI(base_url=b.url + "/v1", api_key=key, max_retries=0)
    _wait_status(via_b, rid, ("in_progress",), 30)
    time.sleep(0.3)
    assert via_b.responses.cancel(rid).status == "cancelled"
    # The owner notices at its next heartbeat, stops, and writes what it generated.
    [row] = _usage_of(data_dir, request_id, timeout=4 * HEARTBEAT_S + 10)
    assert row["status"] == 499
    got = via_b.responses.retrieve(rid)
    assert got.status == "cancelled" and 0 < got.usage.output_tokens == row["completion_tokens"] < 2000
    assert got.output and got.output[0].status == "incomplete"


def test_deleting_through_another_process_stops_the_owner(shared):
    data_dir, key, start = shared
    a, b = start(), start()
    rid, request_id = _create(a, key, 2000)
    via_b = openai.OpenAI(base_url=b.url + "/v1", api_key=key, max_retries=0)
    _wait_status(via_b, rid, ("in_progress",), 30)
    assert via_b.responses.delete(rid) is None
    [row] = _usage_of(data_dir, request_id, timeout=4 * HEARTBEAT_S + 10)
    assert row["status"] == 499 and row["completion_tokens"] < 2000
    with pytest.raises(openai.NotFoundError):
        via_b.responses.retrieve(rid)
