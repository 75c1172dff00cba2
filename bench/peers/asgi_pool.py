"""The common modern choice: FastAPI under gunicorn's uvicorn workers, fib in a ProcessPoolExecutor.

    bench/peers/.venv/bin/gunicorn --worker-class uvicorn_worker.UvicornWorker --workers 2 \
        --bind 127.0.0.1:PORT bench.peers.asgi_pool:app

Written as FastAPI's documentation and most tutorials have it: an `async def` route awaiting
`loop.run_in_executor(ProcessPoolExecutor(), ...)`, one executor per HTTP worker created at
start-up, with its default size (one process per core), not niced.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ProcessPoolExecutor
from contextlib import asynccontextmanager

from fastapi import FastAPI, Path
from fastapi.responses import PlainTextResponse, Response

from bench.peers.common import FIB_MAX, HELLO, fib_body, health_body, timed_fib

executor: ProcessPoolExecutor | None = None


@asynccontextmanager
async def lifespan(_app: FastAPI):
    global executor
    executor = ProcessPoolExecutor()
    try:
        yield
    finally:
        executor.shutdown(wait=False, cancel_futures=True)


app = FastAPI(lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)


@app.get("/fast", response_class=PlainTextResponse)
async def fast() -> PlainTextResponse:
    return PlainTextResponse(HELLO)


@app.get("/healthz")
async def healthz() -> Response:
    return Response(health_body("asgi-pool"), media_type="application/json")


@app.get("/slow/fib/{n}")
async def slow_fib(n: int = Path(ge=0, le=FIB_MAX)) -> Response:
    result, elapsed_ms = await asyncio.get_running_loop().run_in_executor(executor, timed_fib, n)
    return Response(fib_body(n, result, elapsed_ms), media_type="application/json")
