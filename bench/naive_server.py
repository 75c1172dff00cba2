"""The "before": one Tornado process that computes the heavy task in its request handler.

    python -m bench.naive_server --port 8001

GET /fast -> "Hello!"; GET /slow/fib/<n> -> {"task": "fib", "n": n, "result": ...}, computed right
here in the event loop (the same fib function the fleet's workers run), so every other request
waits while it runs. GET /healthz -> 200.

It is also the isolation proof's negative control: locustfile.py run against it must say FAIL
(tests/integration/test_load.py); a check that cannot fail proves nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

from tornado import web
from tornado.httpserver import HTTPServer

from bench.peers.common import FIB_PATH, fib_body, timed_fib


FIB_ROUTE = FIB_PATH.pattern  # n <= 35, like the fleet (and every peer)


class HelloHandler(web.RequestHandler):
    """As the fleet's (services/fast/app.py), and named alike so that their profiles line up
    (bench/request_cost.py)."""

    def get(self) -> None:
        self.set_header("Content-Type", "text/plain; charset=utf-8")
        self.finish("Hello!")


class Health(web.RequestHandler):
    def get(self) -> None:
        self.finish({"status": "ok", "role": self.settings["role"]})


class Fib(web.RequestHandler):
    def get(self, n: str) -> None:
        result, elapsed_ms = timed_fib(int(n))  # blocks the event loop: the point of this configuration
        self.set_header("Content-Type", "application/json; charset=UTF-8")
        self.finish(fib_body(int(n), result, elapsed_ms))


async def serve(port: int, role: str, fib_route: tuple) -> None:
    """Serve /fast, /healthz and the given fib route until SIGTERM or SIGINT."""
    # Tornado's defaults, as a first version would have them (its access log goes nowhere unless
    # logging is configured).
    app = web.Application([(r"/fast", HelloHandler), (r"/healthz", Health), fib_route], role=role)
    server = HTTPServer(app)
    server.listen(port, address="127.0.0.1")
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(signum, stop.set)
    await stop.wait()
    server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio",
                        help="event loop (the floor's instance runs uvloop, as the fleet's instances do)")
    parser.add_argument("--role", default="naive")
    options = parser.parse_args()
    run = asyncio.run
    if options.loop == "uvloop":
        import uvloop
        run = uvloop.run
    run(serve(options.port, options.role, (FIB_ROUTE, Fib)))


if __name__ == "__main__":
    main()
