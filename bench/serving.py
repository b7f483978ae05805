"""What the bench scripts share: a free port, and a `ferroserve serve` started, waited for and stopped."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: list[str], *, name: str, timeout_s: float = 180,
                 env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str, Path]:
    """Starts `ferroserve serve` on a free port with its own data dir (and `env` over this
    process's environment) and waits until it is ready. Returns (process, base URL, log
    file); exits with the log's path if it does not start."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    data_dir = tempfile.mkdtemp(prefix=f"ferroserve-bench-{name}-")
    log_path = Path(tempfile.gettempdir()) / f"ferroserve-bench-{name}-{port}.log"
    cmd = [sys.executable, "-m", "ferroserve", "serve", "--port", str(port), "--data-dir", data_dir, "--log-level", "warning",
           *args]
    proc = subprocess.Popen(cmd, stdout=log_path.open("w"), stderr=subprocess.STDOUT, cwd=REPO,
                            env={**os.environ, **env} if env else None)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(url + "/v1/ready", timeout=1).status_code == 200:
                return proc, url, log_path
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            raise SystemExit(f"server did not start; see {log_path}")
        time.sleep(0.2)


def stop_server(proc: subprocess.Popen, timeout_s: float = 20) -> None:
    """SIGTERM (the server drains and flushes its usage), SIGKILL if it has not exited in `timeout_s`."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
