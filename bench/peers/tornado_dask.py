"""Source document 000's answer: a Tornado app awaiting Dask futures from `Client(asynchronous=True)`.

    bench/peers/.venv/bin/python -m bench.peers.tornado_dask --port PORT

As the document has it: the client starts a local cluster of its own (worker processes, the
defaults for this machine's cores) and each request awaits `client.submit(fib, n)`. Two changes
only: `pure=False`, since Dask's default (pure) would merge identical requests in flight into one
job and overstate the throughput (20 concurrent fib(28) are one job), and every address on
loopback with no dashboard, as the bench requires of every subject.
"""

from __future__ import annotations

import argparse
import asyncio

from dask.distributed import Client
from tornado import web

from bench.naive_server import serve
from bench.peers.common import FIB_PATH, fib_body, timed_fib


class FibHandler(web.RequestHandler):
    def initialize(self, client: Client) -> None:
        self.client = client

    async def get(self, n: str) -> None:
        future = self.client.submit(timed_fib, int(n), pure=False)  # work happens elsewhere
        result, elapsed_ms = await future
        self.set_header("Content-Type", "application/json; charset=UTF-8")
        self.finish(fib_body(int(n), result, elapsed_ms))


async def serve_with_cluster(port: int) -> None:
    async with Client(asynchronous=True, host="127.0.0.1", dashboard_address=None) as client:
        # /fast and /healthz as the naive server has them; only the fib route differs
        await serve(port, "tornado-dask", (FIB_PATH.pattern, FibHandler, {"client": client}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, required=True)
    asyncio.run(serve_with_cluster(parser.parse_args().port))


if __name__ == "__main__":
    main()
