"""The fast app: routes that answer in microseconds and must stay that way under any heavy load.

    python -m services.fast --settings .run/settings.json --instance 1
    curl -s localhost:8080/fast        # through nginx -> Hello!
"""

from __future__ import annotations

import asyncio
import hashlib

from tornado import web

from services.common import server
from services.common.web import BaseHandler, HealthHandler, NotFoundHandler


class HelloHandler(BaseHandler):
    def get(self) -> None:
        self.set_header("Content-Type", "text/plain; charset=utf-8")
        self.finish("Hello!")


class EchoHandler(BaseHandler):
    """POST /echo: the fast path's non-idempotent route (body limits, requests during restarts)."""

    def post(self) -> None:
        body = self.request.body
        self.write_json({"bytes": len(body), "sha256": hashlib.sha256(body).hexdigest()})


def make_app(instance: server.Instance) -> web.Application:
    return web.Application(
        [
            (r"/fast", HelloHandler),
            (r"/echo", EchoHandler),
            (r"/healthz", HealthHandler),
        ],
        default_handler_class=NotFoundHandler,
        **server.app_settings(instance),
    )


def main(argv: list[str] | None = None) -> None:
    instance = server.parse_args("fast", argv)
    asyncio.run(server.serve(make_app(instance), instance))


if __name__ == "__main__":
    main()
