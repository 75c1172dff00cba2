"""One WSGI app for the gunicorn peers.

    gunicorn --workers 3 bench.peers.wsgi_app:app                        # sync: fib in the request
    gunicorn --worker-class gthread --threads 8 --workers 2 \
        --dirty-app bench.peers.wsgi_app:FibApp --dirty-workers 2 \
        bench.peers.wsgi_app:dirty_app                                    # fib in a dirty worker

`app` computes fib in the HTTP worker, as a plain WSGI app does: a sync worker busy with it
serves nothing else. `dirty_app` hands fib to gunicorn's dirty arbiter (gunicorn >= 25), a pool
of processes apart from the HTTP workers, reached with `get_dirty_client().execute(...)`: the
closest peer to the fleet in design.
"""

from __future__ import annotations

from typing import Callable, Iterable

from gunicorn.dirty import DirtyApp, get_dirty_client

from bench.peers.common import FIB_PATH, HELLO, fib_body, health_body, timed_fib

DIRTY_APP = "bench.peers.wsgi_app:FibApp"


class FibApp(DirtyApp):
    """Loaded once in every dirty worker; `fib` runs there."""

    def fib(self, n: int) -> list:
        result, elapsed_ms = timed_fib(n)
        return [result, elapsed_ms]


def _answer(start_response: Callable, status: str, body: bytes, content_type: str) -> Iterable[bytes]:
    start_response(status, [("Content-Type", content_type), ("Content-Length", str(len(body)))])
    return [body]


def _make(compute: Callable[[int], tuple[int, float]], role: str) -> Callable:
    def application(environ: dict, start_response: Callable) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if environ.get("REQUEST_METHOD") not in ("GET", "HEAD"):
            return _answer(start_response, "405 Method Not Allowed", b"", "text/plain")
        if path == "/fast":
            return _answer(start_response, "200 OK", HELLO, "text/plain; charset=utf-8")
        if path == "/healthz":
            return _answer(start_response, "200 OK", health_body(role).encode(), "application/json")
        match = FIB_PATH.fullmatch(path)
        if match:
            n = int(match[1])
            result, elapsed_ms = compute(n)
            return _answer(start_response, "200 OK", fib_body(n, result, elapsed_ms).encode(), "application/json")
        return _answer(start_response, "404 Not Found", b"", "text/plain")

    return application


def _in_dirty_worker(n: int) -> tuple[int, float]:
    result, elapsed_ms = get_dirty_client().execute(DIRTY_APP, "fib", n)
    return result, elapsed_ms


app = _make(timed_fib, "gunicorn-sync")
dirty_app = _make(_in_dirty_worker, "gunicorn-dirty")
