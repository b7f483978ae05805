"""llama-server (built by bench/setup_llama_server.sh) on one GGUF, for the tests and bench
scripts that compare against it on the same file: one slot, two threads, `--no-repack` (its
repacked Q4_0/Q4_K layouts are one more arithmetic away from ours, and on AMX CPUs segfault;
see bench/README.md)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from tests.conftest import free_port, stop_process_group

LLAMA_SERVER = Path(__file__).resolve().parents[1] / "bench" / ".work" / "llama.cpp" / "build" / "bin" / "llama-server"


class LlamaServerFailed(RuntimeError):
    pass


@contextlib.contextmanager
def llama_server(path: Path, ready_s: float = 120.0) -> Iterator[tuple[str, Path]]:
    """Yields (its base URL, its log file) once /health answers; stops it on exit. Raises
    LlamaServerFailed with the log's tail if it exits or is not ready within `ready_s`."""
    port = free_port()
    log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"llama-server-{port}.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [str(LLAMA_SERVER), "-m", str(path), "-t", "2", "-c", "2048", "-np", "1",
             "--no-repack", "--host", "127.0.0.1", "--port", str(port)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ready_s
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise LlamaServerFailed(f"llama-server did not start on {path.name}: {log_path.read_text()[-1500:]}")
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        yield url, log_path
    finally:
        stop_process_group(proc)
