"""The negative control for the isolation proof: one Tornado process that computes in its event loop.

    python -m tests.support.naive_server --port 8999
    curl -s localhost:8999/fast          # Hello!
    curl -s localhost:8999/slow/fib/25   # {"task": "fib", "n": 25, "result": 75025, "elapsed_ms": ...}

It offers the same routes as the fleet's edge (`/fast`, `/slow/fib/<n>`) but does what the fleet
exists to avoid: `fib` runs inside the request handler, so while one heavy request computes, every
fast request waits for the loop. `locustfile.py` run against it must say FAIL; a check that cannot
fail proves nothing (tests/integration/test_load.py). Test-only: never part of the product.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import time

from tornado import web

MAX_N = 35


def fib(n: int) -> int:
    return n if n < 2 else fib(n - 1) + fib(n - 2)


class FastHandler(web.RequestHandler):
    def get(self) -> None:
        self.set_header("Content-Type", "text/plain; charset=utf-8")
        self.finish("Hello!")


class FibHandler(web.RequestHandler):
    def get(self, n: str) -> None:
        if int(n) > MAX_N:
            self.set_status(400)
            self.finish({"error": "bad_argument", "message": f"n must be an integer 0-{MAX_N}, got {n!r}"})
            return
        started = time.perf_counter()
        result = fib(int(n))  # the mistake under test: the event loop computes
        elapsed_ms = round((time.perf_counter() - started) * 1000, 2)
        self.set_header("Content-Type", "application/json; charset=UTF-8")
        self.finish(json.dumps({"task": "fib", "n": int(n), "result": result, "elapsed_ms": elapsed_ms}))


def make_app() -> web.Application:
    return web.Application([(r"/fast", FastHandler), (r"/slow/fib/([0-9]+)", FibHandler)])


async def serve(port: int) -> None:
    server = make_app().listen(port, address="127.0.0.1")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"naive server on http://127.0.0.1:{port}", flush=True)
    await stop.wait()
    server.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, required=True)
    asyncio.run(serve(parser.parse_args(argv).port))


if __name__ == "__main__":
    main()
