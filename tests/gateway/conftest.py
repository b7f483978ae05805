"""A gateway-enabled server per test module, with keys made by the real `keys` CLI."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import httpx

EMBED = "all-minilm"
CHAT = "smollm2"
# $1 per embedding token makes budget arithmetic exact; chat prices are ordinary.
PRICES = ["--price", "all-minilm=1000000:0", "--price", "smollm2=1000:2000"]


def keys_cli(data_dir: Path, *args: str) -> str:
    r = subprocess.run([sys.executable, "-m", "ferroserve", "keys", *args, "--data-dir", str(data_dir)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def create_key(data_dir: Path, workspace: str, *flags: str) -> str:
    return keys_cli(data_dir, "create", "--workspace", workspace, *flags)


def key_id_of(data_dir: Path, hint_secret: str) -> str:
    for line in keys_cli(data_dir, "list").splitlines()[1:]:
        cols = line.split("\t")
        if hint_secret.startswith(cols[2].rstrip("…")):
            return cols[0]
    raise AssertionError("key not listed")


def auth(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def embed(url: str, key: str | None, text: str = "hello world", **kw) -> httpx.Response:
    headers = auth(key) if key else {}
    headers.update(kw.pop("headers", {}))
    return httpx.post(url + "/v1/embeddings", json={"model": EMBED, "input": text}, headers=headers, timeout=60, **kw)


def usage_rows(data_dir: Path) -> list[sqlite3.Row]:
    """The real SQLite file, read by a second connection (WAL allows it while the server runs)."""
    db = sqlite3.connect(data_dir / "ferroserve.sqlite3")
    db.row_factory = sqlite3.Row
    try:
        return db.execute("SELECT * FROM usage ORDER BY rowid").fetchall()
    finally:
        db.close()
