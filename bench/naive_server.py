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
import json
import signal
import time

from tornado import web
from tornado.httpserver import HTTPServer

from services.slow.tasks import fib


class Hello(web.RequestHandler):
    def get(self) -> None:
        self.set_header("Content-Type", "text/plain; charset=utf-8")
        self.finish("Hello!")


class Health(web.RequestHandler):
    def get(self) -> None:
        self.finish({"status": "ok", "role": "naive"})


class Fib(web.RequestHandler):
    def get(self, n: str) -> None:
        started = time.perf_counter()
        result = fib(int(n))  # blocks the event loop: the point of this configuration
        self.set_header("Content-Type", "application/json; charset=UTF-8")
        self.finish(json.dumps({"task": "fib", "n": int(n), "result": result,
                                "elapsed_ms": round(1000 * (time.perf_counter() - started), 2)}))


async def serve(port: int) -> None:
    # Tornado's defaults, as a first version would have them (its access log goes nowhere unless
    # logging is configured).
    app = web.Application([(r"/fast", Hello), (r"/healthz", Health), (r"/slow/fib/([0-9]|[12][0-9]|3[0-5])", Fib)])
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
    asyncio.run(serve(parser.parse_args().port))


if __name__ == "__main__":
    main()
