"""The fast app: routes that answer in microseconds and must stay that way under any heavy load.

    python -m services.fast --settings .run/settings.json --instance 1
    curl -s localhost:8080/fast        # through nginx -> Hello!
"""

from __future__ import annotations

import hashlib
import time

from tornado import web

from services.common import cpu_slice, metrics, server
from services.common.web import ApiError, BaseHandler, HealthHandler, MetricsHandler, NotFoundHandler
from services.fanout.client import Upstreams
from services.fast import fanout_routes, negative_control
from services.upstream import SERVICES


class HelloHandler(BaseHandler):
    def get(self) -> None:
        self.set_header("Content-Type", "text/plain; charset=utf-8")
        self.finish("Hello!")

    head = get  # HEAD /fast: the same headers, no body (Tornado drops it)


@web.stream_request_body
class EchoHandler(BaseHandler):
    """POST /echo: the fast path's non-idempotent route (body limits, requests during restarts).

    The body is hashed as it arrives, one read at a time (at most 64 KiB, Tornado's chunk size:
    about 30 us of SHA-256 here), never whole: the event loop never hashes more than that in one
    go, whatever edge.echo_max_body_kb allows, and never holds the body. Hashed whole, a 1 MiB
    body held the loop 0.5 ms in one step (and 16 MiB 8.6 ms), every other request waiting.
    """

    max_body_bytes = 0  # edge.echo_max_body_kb, from the route (make_app)
    digest = None  # set once prepare accepts the request: a refused one's body is read, never hashed

    def prepare(self) -> None:
        super().prepare()
        # nginx refuses a larger body already (the same setting); this keeps the promise for any
        # other way in, answered with the contract's JSON before a byte of the body is read.
        length = self.request.headers.get("Content-Length", "")
        if length.isdigit() and int(length) > self.max_body_bytes:
            raise ApiError(413, "payload_too_large",
                           f"a body of at most {self.max_body_bytes // 1024} KiB (edge.echo_max_body_kb)")
        # A body without a Content-Length (chunked) is cut off past the same size by Tornado.
        self.request.connection.set_max_body_size(self.max_body_bytes)
        self.digest = hashlib.sha256()
        self.size = 0

    def data_received(self, chunk: bytes) -> None:
        if self.digest is None:  # refused (413, 403): Tornado still reads the body it was sent
            return
        self.digest.update(chunk)
        self.size += len(chunk)

    def post(self) -> None:
        self.write_json({"bytes": self.size, "sha256": self.digest.hexdigest()})


def block_the_loop(ms: int) -> None:
    """What a heavy computation in a fast route does to the event loop (test-only route)."""
    time.sleep(ms / 1000)


class BlockTheLoopHandler(BaseHandler):
    """GET /_test/block/<ms>: blocks the loop on purpose, to see the watchdog report it."""

    def get(self, ms: str) -> None:
        block_the_loop(min(int(ms), 10_000))
        self.finish("blocked\n")


def make_app(instance: server.Instance) -> web.Application:
    # The fan-out routes, over this host's replicas of the upstream service (services/upstream).
    upstreams = Upstreams.from_settings(instance.settings, SERVICES)
    fanout = fanout_routes.routes(instance.settings, upstreams)
    hello, echo = HelloHandler, EchoHandler
    observe = instance.settings.observe
    metrics.FAST_P99_OBJECTIVE.set(observe.fast_p99_objective_ms / 1000)  # what FleetFastP99High compares with
    if observe.test_fast_delay_ms:  # the isolation check's negative controls: a fleet that must FAIL it
        sabotage = negative_control.Sabotage(negative_control.HeavyJobSensor(instance.settings),
                                             observe.test_fast_delay_ms, observe.test_fast_delay_every)
        hello, echo = (negative_control.delayed(h, sabotage) for h in (hello, echo))
        fanout = [(path, negative_control.delayed(h, sabotage), kwargs) for path, h, kwargs in fanout]
    routes = [
        (r"/fast", hello, {"route_pattern": "/fast"}),
        (r"/echo", echo, {"route_pattern": "/echo", "max_body_bytes": instance.settings.edge.echo_max_body_kb * 1024}),
        (r"/healthz", HealthHandler, {"route_pattern": "/healthz"}),
        (r"/metrics", MetricsHandler),
        *fanout,
    ]
    if instance.settings.observe.test_routes:
        routes.append((r"/_test/block/([0-9]{1,5})", BlockTheLoopHandler, {"route_pattern": "/_test/block/{ms}"}))
    return web.Application(routes, default_handler_class=NotFoundHandler, upstreams=upstreams,
                           **server.app_settings(instance))


async def serve(instance: server.Instance) -> None:
    app = make_app(instance)
    try:
        await server.serve(app, instance)
    finally:
        await app.settings["upstreams"].pool.close()  # its connections to the upstreams, once drained


def main(argv: list[str] | None = None) -> None:
    instance = server.parse_args("fast", argv)
    # Before any thread starts (threads inherit it): a slice shorter than the heavy path's, so a
    # request wakes this loop onto the CPU at once (services/common/cpu_slice.py).
    cpu_slice.request(instance.settings.fast.sched_slice_us)
    server.run(instance, lambda: serve(instance))


if __name__ == "__main__":
    main()
