"""Raw bytes to a port and the answer read back: the status (or a clean close), and everything the
server sent, the answer's end found by its framing rather than waited for.

For requests http.client cannot send (malformed, hostile, generated): tests/integration/
test_hostile_input.py and test_fuzz_edge.py.
"""

from __future__ import annotations

import re
import socket
import time

CLOSE = "close"  # the connection is closed with no answer (nginx's way with some garbage)

INTERIM = re.compile(rb"\AHTTP/1\.[01] 1\d\d [^\r\n]*\r\n(?:[^\r\n]+\r\n)*\r\n")  # "100 Continue"


def complete(data: bytes, head_only: bool) -> bytes | None:
    """The body once `data` holds a whole response (by Content-Length, chunked or a HEAD's
    headers), else None. A generated header may ask for keep-alive: the end is found, not waited for."""
    if b"\r\n\r\n" not in data:
        return None
    head, _, rest = data.partition(b"\r\n\r\n")
    if head_only:
        return b""
    fields = [line.split(b":", 1) for line in head.split(b"\r\n")[1:] if b":" in line]
    headers = {name.strip().lower(): value.strip() for name, value in fields}
    if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
        body, chunks = b"", rest
        while b"\r\n" in chunks:
            size_text, _, chunks = chunks.partition(b"\r\n")
            size = int(size_text.split(b";")[0], 16)
            if size == 0:
                return body
            if len(chunks) < size + 2:
                return None
            body, chunks = body + chunks[:size], chunks[size + 2:]
        return None
    if b"content-length" in headers:
        length = int(headers[b"content-length"])
        return rest[:length] if len(rest) >= length else None
    return None


def exchange(port: int, raw: bytes, wait: float = 5) -> tuple[object, bytes]:
    """Send raw bytes; return (status or CLOSE or "0.9", everything the server sent). The answer's
    end is found (Content-Length, chunked, a HEAD's headers), not waited for: a request may ask
    for keep-alive."""
    head_only = raw.startswith(b"HEAD ")
    data = b""
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as s:
        try:
            s.sendall(raw)
        except (BrokenPipeError, ConnectionResetError):
            pass  # answered and closed before all of the request was read
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            except socket.timeout:
                raise AssertionError(f"no answer and no close within {wait} s: the request hangs") from None
            if not chunk:
                break
            data += chunk
            data = INTERIM.sub(b"", data)  # "100 Continue" before the answer
            if data.startswith(b"HTTP/") and complete(data, head_only) is not None:
                break
        else:
            raise AssertionError(f"no answer and no close within {wait} s: the request hangs")
    if not data:
        return CLOSE, data
    if not data.startswith(b"HTTP/"):
        return "0.9", data
    assert complete(data, head_only) is not None, f"a cut-off answer: {data[:500]!r}"
    return int(data.split(b" ", 2)[1]), data
