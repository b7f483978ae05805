"""Real PostgreSQL and Redis servers for the replica tests, on loopback in temporary
directories, one of each per test session (each test gets its own database and Redis db).

Debian's `postgresql` and `redis-server` packages (installed by `make test`, the
`.venv/.replicas` stamp). PostgreSQL refuses to run as root: as root the cluster is made and
run by the `postgres` system user (runuser). Where the binaries are missing the tests skip
with the reason; nothing here is mocked.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import free_port


def _pg_bindir() -> str | None:
    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if os.path.exists(os.path.join(candidate, "initdb")):
            return candidate
    found = shutil.which("initdb")
    return os.path.dirname(found) if found else None


def _as_db_user() -> list[str]:
    """The command prefix that runs PostgreSQL's tools: nothing as a normal user; as root,
    runuser to the `postgres` user (the package creates it)."""
    if os.geteuid() != 0:
        return []
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        pytest.skip("running as root and there is no `postgres` user to run PostgreSQL as (install Debian's postgresql)")
    return ["runuser", "-u", "postgres", "--"]


class Postgres:
    """`durable`: PostgreSQL's default durability (fsync, synchronous_commit on), as a
    benchmark measures it; the tests run without fsync. (Set on the command line, which
    ALTER SYSTEM cannot override.)"""

    def __init__(self, *, durable: bool = False) -> None:
        bindir = _pg_bindir()
        if bindir is None:
            pytest.skip("PostgreSQL is not installed (Debian's `postgresql`; `make test` installs it with apt)")
        self.bindir = bindir
        self.prefix = _as_db_user()
        self.dir = Path(tempfile.mkdtemp(prefix="ferroserve-pg-"))
        if self.prefix:
            shutil.chown(self.dir, "postgres", "postgres")
        self.data = self.dir / "data"
        self.port = free_port()
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "ferroserve", "--no-sync", "-E", "UTF8")
        options = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.dir} -c max_connections=100"
        if not durable:
            options += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.dir / "log"), "-w", "-t", "60", "start")
        self.databases = 0

    def _run(self, tool: str, *args: str) -> None:
        r = subprocess.run([*self.prefix, os.path.join(self.bindir, tool), *args], capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            raise RuntimeError(f"{tool} failed: {r.stdout}\n{r.stderr}")

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://ferroserve@127.0.0.1:{self.port}/{dbname}"

    def new_database(self) -> str:
        import psycopg

        self.databases += 1
        name = f"fs{os.getpid()}_{self.databases}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.dir, ignore_errors=True)


class Redis:
    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip("redis-server is not installed (Debian's `redis-server`; `make test` installs it with apt)")
        self.dir = Path(tempfile.mkdtemp(prefix="ferroserve-redis-"))
        self.port = free_port()
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir), "--save", "",
             "--appendonly", "no", "--databases", "64"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import redis

        client = redis.Redis(port=self.port)
        deadline = time.monotonic() + 20
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("redis-server did not start")
                time.sleep(0.05)
        client.close()
        self.databases = 0

    def new_url(self) -> str:
        self.databases += 1
        return f"redis://127.0.0.1:{self.port}/{self.databases % 64}"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres():
    pytest.importorskip("psycopg", reason="psycopg is not installed (make test installs it)")
    pg = Postgres()
    yield pg
    pg.stop()


@pytest.fixture(scope="session")
def redis_server():
    pytest.importorskip("redis", reason="redis-py is not installed (make test installs it)")
    r = Redis()
    yield r
    r.stop()


@pytest.fixture()
def database_url(postgres) -> str:
    """A new, empty database for one test."""
    return postgres.new_database()
