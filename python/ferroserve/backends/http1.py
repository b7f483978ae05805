"""A minimal HTTP/1.1 keep-alive client for plain `http://` upstreams.

Why not httpx here: the upstream round trip sits on every proxied request, and httpx (client,
httpcore, anyio, h11) costs about 0.4-0.6 ms per streamed request on loopback against about
0.04 ms for the exchange itself (measured in the upstream backend's benchmark), which alone
is over the gateway's 0.3 ms overhead budget. This client does only what an OpenAI-compatible
upstream needs: one request per connection at a time, Content-Length request bodies,
Content-Length / chunked / until-close response bodies, read timeouts per read, idle
connections reused LIFO. TLS and HTTP/2 (https upstreams) stay with httpx.

Closing a response before its body ended closes the connection: that is how the upstream
learns that a request was cancelled.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

# Past this many unread body bytes the socket stops being read (the consumer is slow).
PAUSE_READING_BYTES = 1 << 20


class TransportError(Exception):
    """Any failure to exchange with the upstream; `connect` when no connection was made."""

    connect = False


class ConnectError(TransportError):
    connect = True


class ConnectTimeout(ConnectError):
    pass


class ReadTimeout(TransportError):
    pass


class ProtocolError(TransportError):
    pass


class Http1Pool:
    """Connections to one `http://host:port/prefix` with fixed extra request headers."""

    def __init__(self, base_url: str, headers: dict[str, str], *, connect_timeout_s: float, read_timeout_s: float) -> None:
        url = urlsplit(base_url)
        if url.scheme != "http":
            raise ValueError(f"Http1Pool serves http:// URLs only, got {base_url!r}")
        self.host = url.hostname or "localhost"
        self.port = url.port or 80
        self.prefix = url.path.rstrip("/")
        host = self.host if url.port is None else f"{self.host}:{self.port}"
        self.common_headers = f"host: {host}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self.idle: list[_Connection] = []
        self.closed = False

    async def request(self, method: str, path: str, body: bytes, headers: str) -> Response:
        """Sends the request and returns once the response head arrived. `headers` are extra
        header lines, each ending in CRLF."""
        head = (f"{method} {self.prefix}{path} HTTP/1.1\r\n{self.common_headers}{headers}"
                f"content-length: {len(body)}\r\n\r\n").encode("latin-1")
        while self.idle:
            conn = self.idle.pop()
            if conn.lost:
                continue
            try:
                return await conn.exchange(self, head + body)
            except _StaleConnection:
                continue  # the upstream closed it while idle: nothing was received, try another
        conn = await self._connect()
        try:
            return await conn.exchange(self, head + body)
        except _StaleConnection:
            raise ProtocolError("the upstream closed the connection without answering") from None

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        conn = _Connection(loop, self.read_timeout_s)
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                await loop.create_connection(lambda: conn, self.host, self.port)
        except TimeoutError:
            raise ConnectTimeout(f"no connection within {self.connect_timeout_s} s") from None
        except OSError as exc:
            raise ConnectError(str(exc) or type(exc).__name__) from None
        return conn

    def release(self, conn: _Connection) -> None:
        if self.closed or conn.lost:
            conn.close()
        else:
            self.idle.append(conn)

    def close(self) -> None:
        self.closed = True
        idle, self.idle = self.idle, []
        for conn in idle:
            conn.close()


class _StaleConnection(Exception):
    pass


class _Connection(asyncio.Protocol):
    __slots__ = ("loop", "read_timeout_s", "transport", "buffer", "waiter", "lost", "lost_error", "paused", "received")

    def __init__(self, loop: asyncio.AbstractEventLoop, read_timeout_s: float) -> None:
        self.loop = loop
        self.read_timeout_s = read_timeout_s
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.waiter: asyncio.Future | None = None
        self.lost = False
        self.lost_error: Exception | None = None
        self.paused = False
        self.received = False  # any byte of the current response

    # Protocol callbacks.
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self.received = True
        if len(self.buffer) > PAUSE_READING_BYTES and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self.lost = True
        self._wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.lost_error = exc
        self._wake()

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # Reading.
    async def wait(self) -> None:
        """Until more bytes arrive or the connection ends; ReadTimeout after the read timeout."""
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()
        waiter = self.waiter = self.loop.create_future()
        timer = self.loop.call_later(self.read_timeout_s, _expire, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self.waiter = None

    async def exchange(self, pool: Http1Pool, request: bytes) -> Response:
        self.received = False
        assert self.transport is not None  # connected before any exchange
        self.transport.write(request)
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end >= 0:
                break
            if self.lost:
                if not self.received:
                    self.close()
                    raise _StaleConnection
                raise ProtocolError("the upstream closed the connection inside the response head")
            await self.wait_or_close()
        head = bytes(self.buffer[:end]).decode("latin-1")
        del self.buffer[: end + 4]
        status_line, *lines = head.split("\r\n")
        try:
            status = int(status_line.split(" ", 2)[1])
        except (IndexError, ValueError):
            self.close()
            raise ProtocolError(f"not an HTTP response: {status_line[:80]!r}") from None
        headers: dict[str, str] = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        return Response(pool, self, status, headers)

    async def wait_or_close(self) -> None:
        try:
            await self.wait()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self.lost = True
        if self.transport is not None:
            self.transport.close()


def _expire(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_exception(ReadTimeout("no data within the read timeout"))


class Response:
    """A response whose head has arrived; iterate the body with `aiter_raw()`, then (or
    instead) `aclose()`."""

    def __init__(self, pool: Http1Pool, conn: _Connection, status: int, headers: dict[str, str]) -> None:
        self.pool = pool
        self.conn: _Connection | None = conn
        self.status_code = status
        self.headers = headers
        self.chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        length = headers.get("content-length")
        self.remaining = int(length) if length is not None and not self.chunked else None
        if status in (204, 304):
            self.remaining = 0
        self.reusable = headers.get("connection", "").lower() != "close" and (self.chunked or self.remaining is not None)

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        conn = self.conn
        if conn is None:
            return
        if self.chunked:
            async for piece in self._chunks(conn):
                yield piece
        elif self.remaining is not None:
            while self.remaining:
                if not conn.buffer:
                    if conn.lost:
                        raise ProtocolError("the upstream closed the connection inside the body")
                    await conn.wait_or_close()
                    continue
                piece = bytes(conn.buffer[: self.remaining])
                del conn.buffer[: len(piece)]
                self.remaining -= len(piece)
                yield piece
        else:  # until the connection closes
            while True:
                if conn.buffer:
                    piece = bytes(conn.buffer)
                    conn.buffer.clear()
                    yield piece
                elif conn.lost:
                    break
                else:
                    await conn.wait_or_close()
        self._done()

    async def _chunks(self, conn: _Connection) -> AsyncIterator[bytes]:
        buffer = conn.buffer
        size = -1  # bytes left in the current chunk; -1: a size line is next
        while True:
            out: list[bytes] = []
            while True:
                if size < 0:
                    line_end = buffer.find(b"\r\n")
                    if line_end < 0:
                        break
                    try:
                        size = int(bytes(buffer[:line_end]).split(b";", 1)[0], 16)
                    except ValueError:
                        conn.close()
                        raise ProtocolError("bad chunk size in the response body") from None
                    if size == 0:
                        # The last chunk: (no trailers expected) its final CRLF.
                        trailer_end = buffer.find(b"\r\n\r\n", line_end)
                        if trailer_end < 0:
                            size = -1
                            break
                        del buffer[: trailer_end + 4]
                        if out:
                            yield b"".join(out)
                        return
                    del buffer[: line_end + 2]
                if len(buffer) < size + 2:
                    if size > 0 and buffer:  # hand over what there is of a long chunk
                        take = min(size, len(buffer))
                        out.append(bytes(buffer[:take]))
                        del buffer[:take]
                        size -= take
                    break
                out.append(bytes(buffer[:size]))
                del buffer[: size + 2]
                size = -1
            if out:
                yield b"".join(out)
                continue
            if conn.lost:
                raise ProtocolError("the upstream closed the connection inside a chunked body")
            await conn.wait_or_close()

    async def aread(self) -> bytes:
        return b"".join([piece async for piece in self.aiter_raw()])

    def _done(self) -> None:
        conn, self.conn = self.conn, None
        if conn is None:
            return
        if self.reusable and not conn.buffer:
            self.pool.release(conn)
        else:
            conn.close()

    async def aclose(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:  # the body was not read to its end
            conn.close()
