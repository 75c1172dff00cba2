"""The usual first answer: one Tornado process handing the heavy task to a process pool, no nginx.

    python -m bench.pool_server --port 8002 --workers 2 [--nice 0]

GET /fast -> "Hello!"; GET /slow/fib/<n> -> the same JSON as the fleet, computed by
`loop.run_in_executor(ProcessPoolExecutor(workers), fib, n)`; GET /healthz -> 200.

The executor is concurrent.futures' own, with the platform's default start method, as people
write it first. Two precautions only, so that this configuration measures the pool and not a
known trap: the workers are started (a first job on each) before the port is bound, so none
inherits the listening socket, and --nice lets the bench show what niceness alone buys (default 0,
not niced, like the usual answer).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
from concurrent.futures import ProcessPoolExecutor

from tornado import web

from bench.naive_server import FIB_ROUTE, serve
from bench.peers.common import fib_body, timed_fib


def _worker_init(nice: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the server, which stops the pool
    if nice:
        os.nice(nice)


class Fib(web.RequestHandler):
    def initialize(self, executor: ProcessPoolExecutor) -> None:
        self.executor = executor

    async def get(self, n: str) -> None:
        result, elapsed_ms = await asyncio.get_running_loop().run_in_executor(self.executor, timed_fib, int(n))
        self.set_header("Content-Type", "application/json; charset=UTF-8")
        self.finish(fib_body(int(n), result, elapsed_ms))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--nice", type=int, default=0, help="niceness of the worker processes (0-19)")
    options = parser.parse_args()
    executor = ProcessPoolExecutor(max_workers=options.workers, initializer=_worker_init,
                                   initargs=(options.nice,))
    try:
        # Start every worker before binding (and before any event loop exists).
        list(executor.map(timed_fib, [1] * options.workers * 4))
        asyncio.run(serve(options.port, "pool", (FIB_ROUTE, Fib, {"executor": executor})))
    finally:
        executor.shutdown(wait=False, cancel_futures=True)


if __name__ == "__main__":
    main()
