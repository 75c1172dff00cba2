"""JSON-lines logging for the services: one object a line, each carrying the request id it serves.

supervisor writes each instance's stderr to the run directory (`make logs` follows them all), so a
request's X-Request-ID can be found in nginx's log and in the instance's lines alike.
"""

from __future__ import annotations

import json
import logging
import sys
import time

from services.common import metrics
from services.common.web import current_request_id


class JsonFormatter(logging.Formatter):
    def __init__(self, instance: str):
        super().__init__()
        self.instance = instance

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "instance": self.instance,
            "logger": record.name,
            "request_id": getattr(record, "request_id", None) or current_request_id.get(),
            "message": record.getMessage(),
        }
        line.update(getattr(record, "fields", {}))
        if record.exc_info:
            line["traceback"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def setup(instance: str, level: int = logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(instance))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def on_request_done(handler) -> None:
    """Tornado's `log_function`, called once per request: its metrics, and its log line."""
    metrics.observe_request(handler.route_pattern if hasattr(handler, "route_pattern") else "unmatched",
                            handler.request.method, handler.get_status(), handler.request.request_time())
    log_request(handler)


def log_request(handler) -> None:
    """An access line for each failed request, with its id and duration.

    Successful requests are already in nginx's access log; writing them twice would cost the fast
    path a JSON encode and a write per request.
    """
    status = handler.get_status()
    if status < 400:
        return
    level = logging.WARNING if status < 500 else logging.ERROR
    request = handler.request
    logging.getLogger("fleet.access").log(
        level,
        "%s %s %d",
        request.method,
        request.uri,
        status,
        extra={
            "request_id": getattr(handler, "request_id", None),
            "fields": {"status": status, "duration_ms": round(1000 * request.request_time(), 2)},
        },
    )
