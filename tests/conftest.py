"""Shared fixtures: a real ferroserve server on loopback, the official openai client."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO.parent / "shared" / "fixtures"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def f32_encoder_env() -> dict[str, str]:
    """Environment for a server whose embeddings must equal an f32 computation elsewhere to
    1e-5 (the Triton tests' numpy BERT): the `avx512bf16` and `amx` levels run the encoder's
    linear layers as bf16 dot products (cosine ≈ 0.99998 to f32), so on such a host the server
    is held at `avx512`, the best f32 level there."""
    from ferroserve import _core

    return {"FERROSERVE_ISA": "avx512"} if _core.cpu_isa() in ("avx512bf16", "amx") else {}


class Server:
    def __init__(
        self, args: list[str], env: dict[str, str] | None = None, data_dir: Path | None = None, wrapper: list[str] | None = None,
    ) -> None:
        self.port = free_port()
        # Each server gets its own gateway database unless a test shares one on purpose
        # (never the user's ~/.local/share/ferroserve, whose keys would lock the tests out).
        self.data_dir = data_dir or Path(tempfile.mkdtemp(prefix="ferroserve-data-"))
        if "--data-dir" not in args:
            args = [*args, "--data-dir", str(self.data_dir)]
        self.url = f"http://127.0.0.1:{self.port}"
        # `wrapper` runs the server under another command (e.g. a mount namespace hiding libOpenCL).
        cmd = [*(wrapper or []), sys.executable, "-m", "ferroserve", "serve", "--port", str(self.port), *args]
        self.log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"ferroserve-test-{self.port}.log"
        self.log = self.log_path.open("w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_path.read_text()}")
            try:
                if httpx.get(self.url + "/v1/ready", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"server not ready after {timeout}s:\n{self.log_path.read_text()}")

    def kill(self) -> None:
        """SIGKILL the server and its granian workers (a worker is the one serving): a crash."""
        pid = self.proc.pid
        for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
            os.kill(int(child), signal.SIGKILL)
        os.kill(pid, signal.SIGKILL)
        self.proc.wait()
        self.log.close()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def stop_process_group(proc: subprocess.Popen, timeout_s: float = 15) -> None:
    """SIGTERM to a process started with `start_new_session=True` and its children, SIGKILL to
    them if it has not exited in `timeout_s`."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def request_history(url: str, request_id: str) -> dict:
    """A request's record on a server (`GET /v1/request-history/{id}`), waiting up to 10 s for
    the usage writer to store it."""
    deadline = time.monotonic() + 10
    while True:
        r = httpx.get(f"{url}/v1/request-history/{request_id}", timeout=10)
        if r.status_code == 200 or time.monotonic() > deadline:
            assert r.status_code == 200, r.text
            return r.json()
        time.sleep(0.1)


def opencl_skip_reason() -> str | None:
    """Why the OpenCL tests cannot run here, or None. Asks the extension itself (the loader
    the server uses), not pyopencl."""
    from ferroserve import _core

    try:
        devices = _core.opencl_devices()
    except _core.DeviceError as exc:
        return f"no usable OpenCL: {exc}"
    return None if devices else "OpenCL platforms but no device; install pocl-opencl-icd (`make test` does)"


def run_cli(args: list[str], env: dict[str, str] | None = None, wrapper: list[str] | None = None, timeout: float = 120):
    return subprocess.run(
        [*(wrapper or []), sys.executable, "-m", "ferroserve", *args],
        env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=timeout,
    )


@pytest.fixture(scope="session")
def server():
    # --numerics exact: tests on this server compare greedy output with llama.cpp's (fixtures),
    # which only llama.cpp's arithmetic reproduces; the default (fast on AVX2 and up) has its
    # own server in tests/api/test_numerics.py.
    srv = Server(["--max-body-bytes", str(2 * 1024 * 1024), "--log-level", "warning", "--numerics", "exact"])
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="session")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="session")
def minilm_reference():
    return json.loads((FIXTURES / "minilm_reference.json").read_text())["items"]
