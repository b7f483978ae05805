"""Bytes of files and batches under the data dir: uploads, batch inputs and results.

Results are appended and fsync'd before the progress that counts them is committed, so the
database never claims more than the disk holds; a process taking a batch over truncates each
result file to its committed size, so rows written after the last commit are written once.
Reads are streamed in blocks: no file is ever held in memory whole.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

BLOCK_BYTES = 256 * 1024


class DataFiles:
    def __init__(self, data_dir: str | Path) -> None:
        self.root = Path(data_dir).expanduser()
        for sub in ("files", "batches"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    def path(self, relative: str) -> Path:
        return self.root / relative

    @staticmethod
    def upload(file_id: str) -> str:
        return f"files/{file_id}"

    @staticmethod
    def batch(batch_id: str, suffix: str) -> str:
        """A batch's own files: `in.jsonl` (its inputs), `out.jsonl`, `err.jsonl`, `f32`."""
        return f"batches/{batch_id}.{suffix}"

    def remove(self, relative: str) -> None:
        try:
            self.path(relative).unlink()
        except FileNotFoundError:
            pass


def write_durably(path: Path, data: bytes) -> None:
    """A whole new file, on disk before this returns (with its directory entry)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Appender:
    """A result file opened for appending at its committed size (bytes past it, written by a
    process that died before committing them, are cut off first)."""

    def __init__(self, path: Path, committed_bytes: int) -> None:
        self.path = path
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        self.file = os.fdopen(fd, "r+b", buffering=0)
        self.file.truncate(committed_bytes)
        self.file.seek(committed_bytes)
        self.size = committed_bytes

    def append(self, data: bytes) -> int:
        """Writes and fsyncs `data` (call it off the event loop); returns the new size."""
        if data:
            view = memoryview(data)
            while view:
                view = view[self.file.write(view):]
            os.fsync(self.file.fileno())
            self.size += len(data)
        return self.size

    def close(self) -> None:
        self.file.close()


async def append(appender: Appender, data: bytes) -> int:
    return await asyncio.get_running_loop().run_in_executor(None, appender.append, data)


async def read_blocks(path: Path, start: int = 0, end: int | None = None, block: int = BLOCK_BYTES) -> AsyncIterator[bytes]:
    """The bytes of `path` from `start` to `end` (its size when None), read off the event loop."""
    loop = asyncio.get_running_loop()
    with open(path, "rb") as f:
        f.seek(start)
        left = (end if end is not None else os.fstat(f.fileno()).st_size) - start
        while left > 0:
            chunk = await loop.run_in_executor(None, f.read, min(block, left))
            if not chunk:
                break
            left -= len(chunk)
            yield chunk


class LineReader:
    """JSONL lines from a byte offset, a few at a time; `offset` is where the next unread
    line starts (committed with the progress, so a resumed batch reads on from there)."""

    def __init__(self, path: Path, offset: int) -> None:
        self.file = open(path, "rb")
        self.file.seek(offset)
        self.offset = offset

    def read(self, count: int) -> list[bytes]:
        """Up to `count` non-blank lines (without their newline); fewer at the end."""
        out = []
        while len(out) < count:
            line = self.file.readline()
            if not line:
                break
            self.offset += len(line)
            line = line.strip()
            if line:
                out.append(line)
        return out

    def close(self) -> None:
        self.file.close()
