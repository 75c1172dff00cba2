"""What every handler of both kinds shares: request ids, X-Served-By, and the contract's JSON errors.

Every error leaves an instance as

    {"error": "<code>", "message": "...", "request_id": "..."}

with the status that says what happened; handlers end a request with `raise ApiError(...)` (or
Tornado's own HTTPError) and `write_error` renders it. Nothing ever sends a traceback to a client.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
import uuid
from contextvars import ContextVar
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from tornado import web

from services.common import metrics, watchdog
from services.common.addresses import plain_ip

log = logging.getLogger("fleet.web")

# Set in prepare(): every log line written while serving a request carries its id (logs.py).
current_request_id: ContextVar[str] = ContextVar("current_request_id", default="-")

# nginx always sends its own; kept only from the edge, and only if it has this shape.
SAFE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")

# The fleet's secret, which nginx adds to every request it passes on (nginx/nginx.conf.j2). Any
# local process can connect to an instance's port: only a request that carries it is the edge's,
# and only the edge's say about the client (X-Real-IP) and the request id are believed.
EDGE_HEADER = "X-Fleet-Edge"

# The contract's error codes for the statuses Tornado raises on its own.
ERROR_CODES = {
    400: "bad_request",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    411: "length_required",
    413: "payload_too_large",
    414: "uri_too_long",
    429: "rate_limited",
    431: "headers_too_large",
    500: "internal_error",
    502: "bad_gateway",
    503: "overloaded",
    504: "gateway_timeout",
}


class ApiError(web.HTTPError):
    """An error with the contract's code and a message meant for the client."""

    def __init__(self, status_code: int, error: str, message: str, headers: dict[str, str] | None = None,
                 **extra: Any):
        super().__init__(status_code, log_message=message.replace("%", "%%"))
        self.error = error
        self.message = message
        self.headers = headers or {}
        self.extra = extra

    def copy(self) -> "ApiError":
        return ApiError(self.status_code, self.error, self.message, dict(self.headers), **self.extra)


class BaseHandler(web.RequestHandler):
    """Base of every route: request id, X-Served-By, JSON bodies and JSON errors."""

    def initialize(self, **kwargs: Any) -> None:
        for name, value in kwargs.items():
            setattr(self, name, value)

    def set_default_headers(self) -> None:
        self.clear_header("Server")  # nginx's server_tokens off would be undone by Tornado's version
        self.set_header("X-Served-By", self.settings["served_by"])
        self.set_header("X-Request-ID", self.request_id)

    def compute_etag(self) -> None:
        return None  # nothing here is cacheable; hashing every body would cost the fast path

    def log_exception(self, typ, value, tb) -> None:  # type: ignore[override]
        # HTTPErrors are expected outcomes, already in the access line; real bugs keep their
        # traceback in the log (never in the response).
        if not isinstance(value, web.HTTPError):
            super().log_exception(typ, value, tb)

    @property
    def request_id(self) -> str:
        if not hasattr(self, "_request_id"):
            incoming = self.request.headers.get("X-Request-ID", "") if self.from_edge else ""
            self._request_id = incoming if SAFE_REQUEST_ID.match(incoming) else uuid.uuid4().hex
        return self._request_id

    @property
    def from_edge(self) -> bool:
        """The request came through the fleet's nginx: it carries the edge's secret. (An app with no
        secret, as unit tests build them in-process, has no edge to tell apart: everything is.)"""
        if not hasattr(self, "_from_edge"):
            token = self.settings.get("edge_token")
            sent = self.request.headers.get(EDGE_HEADER)
            self._from_edge = token is None or (sent is not None and hmac.compare_digest(sent.encode(), token))
        return self._from_edge

    route_pattern = "unmatched"  # the route's pattern, the metrics label (set per route in make_app)
    # Routes any local process may call on an instance's own port (health checks, Prometheus);
    # every other route answers the edge only.
    open_to_all = False

    def prepare(self) -> None:
        current_request_id.set(self.request_id)
        watchdog.serving_request["id"] = self.request_id
        self.settings["in_flight"].enter()
        self._in_flight = True
        self.refuse_untrusted_peer()
        if self.from_edge:
            # The client's address as nginx saw it; from anyone else, the socket's peer stands
            # (the server runs with xheaders off, so no header can change it).
            self.request.remote_ip = self.request.headers.get("X-Real-IP") or self.request.remote_ip
        elif not self.open_to_all:
            raise ApiError(403, "forbidden", "this instance answers the fleet's edge only; send requests to "
                                             "the edge (nginx), or only /healthz and /metrics here")

    def refuse_untrusted_peer(self) -> None:
        """403 to anyone but the edge host and this host (a fleet across hosts): the TCP peer."""
        trusted = self.settings.get("trusted_peers")
        peer = getattr(self.request.connection, "context", None)
        address = getattr(peer, "address", None)
        if trusted is None or not isinstance(address, tuple) or address[0] in trusted:
            return  # unit tests' connections, Unix sockets; the usual case costs one set lookup
        if str(plain_ip(address[0])) not in trusted:  # ::ffff:10.0.0.1 is 10.0.0.1
            raise ApiError(403, "forbidden", "this instance answers the fleet's edge only")

    def _leave_in_flight(self) -> None:
        if getattr(self, "_in_flight", False):
            self._in_flight = False
            self.settings["in_flight"].leave()

    def on_finish(self) -> None:
        self._leave_in_flight()
        watchdog.serving_request["id"] = "-"

    def on_connection_close(self) -> None:
        # The client (nginx) went away before the answer: this request is no longer in flight.
        self._leave_in_flight()

    def write_json(self, body: dict[str, Any], status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(body)

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        self.clear_header("Content-Disposition")
        body: dict[str, Any] = {
            "error": ERROR_CODES.get(status_code, "error"),
            "message": self._reason,
            "request_id": self.request_id,
        }
        if isinstance(exc, ApiError):
            body.update(error=exc.error, message=exc.message, **exc.extra)
            for name, value in exc.headers.items():
                self.set_header(name, value)
        elif isinstance(exc, web.HTTPError) and exc.log_message and status_code < 500:
            body["message"] = exc.log_message % exc.args if exc.args else exc.log_message
        elif status_code >= 500:
            body["message"] = "internal error; the instance log has the details"
        self.set_header("Content-Type", "application/json")
        self.finish(body)


class NotFoundHandler(BaseHandler):
    """Every path no route matches: the contract's 404 instead of Tornado's HTML page."""

    def prepare(self) -> None:
        super().prepare()
        raise ApiError(404, "not_found", f"no route for {self.request.path}")


class HealthHandler(BaseHandler):
    """GET /healthz: the instance is up and its event loop answers (503 while it drains)."""

    open_to_all = True

    def get(self) -> None:
        figures = self.figures()
        body = {"role": self.settings["role"], "instance": self.settings["instance_name"], **figures}
        if self.settings.get("draining"):
            raise ApiError(503, "draining", "this instance is stopping; retry", headers={"Retry-After": "1"},
                           status="draining", **body)
        problem = self.unhealthy(figures)
        if problem:
            raise ApiError(503, "degraded", problem, headers={"Retry-After": "1"}, status="degraded", **body)
        self.write_json({"status": "ok", **body})

    head = get  # load balancers probe with HEAD; Tornado sends the headers alone

    def figures(self) -> dict:
        """Extra figures a kind of instance reports (the slow one: its pool and waiting line)."""
        return {}

    def unhealthy(self, figures: dict) -> str | None:
        """Why this instance cannot do its work though it answers (503 "degraded"), or None."""
        return None


class MetricsHandler(BaseHandler):
    """GET /metrics in Prometheus' text format (errors, like every route's, in the contract's JSON).

    The text is produced on a thread, not in the event loop: the loop keeps serving while a scrape
    runs (it holds the GIL a few milliseconds at a time at most). Every label comes from a fixed
    set (metrics.py), so the text stays a few tens of KiB whatever clients send.
    """

    route_pattern = "/metrics"
    open_to_all = True

    async def get(self) -> None:
        metrics.refresh()  # read the loop's own state here, on the loop
        text = await asyncio.get_running_loop().run_in_executor(None, generate_latest, REGISTRY)
        self.set_header("Content-Type", CONTENT_TYPE_LATEST)
        self.finish(text)
