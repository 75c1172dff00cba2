"""A minimal keep-alive HTTP/1.1 client on asyncio streams: requests without a body (GET, DELETE),
what the bench needs.

Small on purpose: the load generator shares this 2-core machine with the servers it measures, so
each request should cost it as little CPU as possible (no header objects, no redirects, no TLS).
"""

from __future__ import annotations

import asyncio


class HttpError(Exception):
    """The connection failed or the response was malformed."""


class HttpConnection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host_header: str):
        self.reader = reader
        self.writer = writer
        self.host_header = host_header
        self.closed = False
        self.headers: dict[str, str] = {}  # the last response's, names in lower case

    @classmethod
    async def open(cls, host: str, port: int, source: str | None = None, timeout: float = 5) -> "HttpConnection":
        """Connect (asyncio sets TCP_NODELAY); `source` binds the local address, e.g. 127.0.0.2."""
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host, port, local_addr=(source, 0) if source else None), timeout)
        except (OSError, asyncio.TimeoutError) as exc:
            raise HttpError(f"connect to {host}:{port} failed: {exc!r}") from None
        return cls(reader, writer, f"{host}:{port}")

    async def get(self, path: str) -> tuple[int, bytes]:
        """Send one GET and read its whole response: (status, body)."""
        return await self.request("GET", path)

    async def request(self, method: str, path: str, headers: str = "") -> tuple[int, bytes]:
        """Send one request without a body, `headers` as "Name: value\r\n" lines, and read its
        whole response: (status, body)."""
        if self.closed:
            raise HttpError("connection closed")
        try:
            self.writer.write(f"{method} {path} HTTP/1.1\r\nHost: {self.host_header}\r\nUser-Agent: fleet-bench\r\n"
                              f"{headers}\r\n".encode())
            head = await self.reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split(" ", 2)[1])
            length, chunked, close = None, False, lines[0].startswith("HTTP/1.0")
            self.headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                name = name.strip().lower()
                self.headers[name] = value.strip()
                if name == "content-length":
                    length = int(value)
                elif name == "transfer-encoding" and "chunked" in value.lower():
                    chunked = True
                elif name == "connection":
                    close = "close" in value.lower()
            if status in (204, 304):  # no body, whatever the headers say
                body = b""
            elif length is not None:
                body = await self.reader.readexactly(length)
            elif chunked:
                body = await self._chunked()
            else:
                body = await self.reader.read()
                close = True
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, IndexError) as exc:
            self.close()
            raise HttpError(f"{method} {path}: {exc!r}") from None
        if close:
            self.close()
        return status, body

    async def _chunked(self) -> bytes:
        parts = []
        while True:
            size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await self.reader.readuntil(b"\r\n")  # no trailers from our servers
                return b"".join(parts)
            parts.append(await self.reader.readexactly(size))
            await self.reader.readexactly(2)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.writer.close()


class ConnectionPool:
    """Idle keep-alive connections to one address; at most `limit` in use at once."""

    def __init__(self, host: str, port: int, limit: int = 256, source: str | None = None):
        self.host, self.port, self.source, self.limit = host, port, source, limit
        self._idle: list[HttpConnection] = []
        self._slots = asyncio.Semaphore(limit)

    async def prewarm(self, count: int) -> None:
        conns = await asyncio.gather(*(HttpConnection.open(self.host, self.port, self.source) for _ in range(count)))
        self._idle.extend(conns)

    async def acquire(self) -> HttpConnection:
        await self._slots.acquire()
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed:
                return conn
        try:
            return await HttpConnection.open(self.host, self.port, self.source)
        except BaseException:
            self._slots.release()
            raise

    def release(self, conn: HttpConnection) -> None:
        if not conn.closed:
            self._idle.append(conn)
        self._slots.release()

    def close(self) -> None:
        for conn in self._idle:
            conn.close()
        self._idle.clear()
