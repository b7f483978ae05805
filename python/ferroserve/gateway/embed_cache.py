"""The embedding response cache: identical requests (model, input, dimensions, encoding) are
answered from memory, byte for byte as the first time.

Embeddings are deterministic (the engine's batch invariance), so a cached answer is the answer.
Entries are keyed by a SHA-256 of the request's content only: two workspaces share an entry
only when they sent the same content, and nothing else about them. Bounded by size (LRU) and
age (TTL); everything runs on the event loop, so no locks.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict

import msgspec

_encode = msgspec.msgpack.Encoder().encode
_ENTRY_OVERHEAD = 200  # bytes of bookkeeping per entry, counted against the size bound


class EmbedCache:
    __slots__ = ("max_bytes", "ttl_s", "_entries", "size", "hits", "misses", "evictions")

    def __init__(self, max_bytes: int, ttl_s: float) -> None:
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        # key -> (expires_at (monotonic), data_json, prompt_tokens, size)
        self._entries: OrderedDict[bytes, tuple[float, bytes, int, int]] = OrderedDict()
        self.size = 0
        self.hits = self.misses = self.evictions = 0

    @staticmethod
    def key(model: str, texts: list[str] | None, token_lists: list[list[int]] | None, dimensions: int | None,
            encoding: str) -> bytes:
        return hashlib.sha256(_encode((model, texts, token_lists, dimensions, encoding))).digest()

    def get(self, key: bytes) -> tuple[bytes, int] | None:
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        if entry[0] <= time.monotonic():
            self._drop(key)
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry[1], entry[2]

    def put(self, key: bytes, data_json: bytes, prompt_tokens: int) -> None:
        size = len(data_json) + _ENTRY_OVERHEAD
        if size > self.max_bytes:
            return
        if key in self._entries:
            self._drop(key)
        self._entries[key] = (time.monotonic() + self.ttl_s, data_json, prompt_tokens, size)
        self.size += size
        while self.size > self.max_bytes:
            oldest = next(iter(self._entries))
            self._drop(oldest)
            self.evictions += 1

    def _drop(self, key: bytes) -> None:
        entry = self._entries.pop(key)
        self.size -= entry[3]

    def __len__(self) -> int:
        return len(self._entries)

    def stats(self) -> dict:
        return {"entries": len(self._entries), "bytes": self.size, "max_bytes": self.max_bytes,
                "hits": self.hits, "misses": self.misses, "evictions": self.evictions}
