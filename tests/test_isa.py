"""FERROSERVE_ISA at start: a level this CPU lacks, or a name that is no level, is refused
with status 2 and a message naming what the CPU supports (never a silent fallback, never an
illegal instruction); a level it has is what the server reports."""

from __future__ import annotations

import pytest

from ferroserve import _core
from tests.conftest import Server, run_cli

ALL_LEVELS = ["portable", "avx2", "avx512", "avx512bf16", "amx"]
HOST_LEVELS = _core.cpu_isa_levels()
MISSING = [level for level in ALL_LEVELS if level not in HOST_LEVELS]


def test_the_host_levels_are_a_prefix_of_the_ladder():
    assert HOST_LEVELS == ALL_LEVELS[: len(HOST_LEVELS)]


@pytest.mark.parametrize("command", [["serve", "--port", "1"], ["devices"]])
def test_a_level_above_the_host_is_refused_at_start(command):
    if not MISSING:
        pytest.skip(f"this CPU supports every level ({', '.join(HOST_LEVELS)}): none is above it")
    level = MISSING[0]
    r = run_cli(command, env={"FERROSERVE_ISA": level}, timeout=60)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert f"FERROSERVE_ISA={level} needs" in r.stderr and "which this CPU lacks" in r.stderr, r.stderr
    assert f"it supports {', '.join(HOST_LEVELS)}" in r.stderr, r.stderr


@pytest.mark.parametrize("command", [["serve", "--port", "1"], ["devices"]])
def test_an_unknown_level_is_refused_at_start(command):
    r = run_cli(command, env={"FERROSERVE_ISA": "avx3"}, timeout=60)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert 'FERROSERVE_ISA="avx3" is not a kernel level' in r.stderr, r.stderr


@pytest.mark.parametrize("level", HOST_LEVELS)
def test_every_host_level_is_reported_as_chosen(level):
    r = run_cli(["devices"], env={"FERROSERVE_ISA": level}, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"cpu\tisa={level}\tlevels={','.join(HOST_LEVELS)}\t"), r.stdout


def test_the_server_runs_the_level_it_was_given():
    """The lowest level end to end: the model list names the device's level."""
    srv = Server(["--log-level", "warning"], env={"FERROSERVE_ISA": "portable"})
    try:
        srv.wait_ready()
        import httpx

        models = httpx.get(srv.url + "/v1/models").json()["data"]
        assert {m["device"] for m in models} == {"cpu(portable)"}, models
    finally:
        srv.stop()


@pytest.mark.isa_matrix
def test_the_session_server_runs_this_level(server):
    """Under the ISA matrix (tests/isa_matrix.sh) the shared server really runs the level
    FERROSERVE_ISA names, so the other isa_matrix tests check that level."""
    import httpx

    devices = {m["device"] for m in httpx.get(server.url + "/v1/models").json()["data"]}
    assert devices == {f"cpu({_core.cpu_isa()})"}, devices
