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

ACCESS_LOGGER = "fleet.access"  # one line per failed request (log_request); rate-limited
FANOUT_LOGGER = "fleet.fanout"  # one line per fan-out request that was not clean, with its calls; rate-limited


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


class FailedRequestLines(logging.Filter):
    """Lets through at most `rate` failed-request lines a second (bursts of 10 x rate); counts the
    rest, and the next line let through says how many were left out (`suppressed`).

    A client can make an instance fail requests as fast as it can send them (bad input, a flood
    past the per-client limit): without this, a minute of it would rotate the job tracebacks, which
    are logged by other loggers, out of the instance's log files. nginx still logs every request:
    answered ones in its access log, refused ones (4xx) in nginx-refused.log.
    """

    def __init__(self, rate: float, clock=time.monotonic):
        super().__init__()
        self.rate, self.burst = rate, 10 * rate
        self.tokens = self.burst
        self.clock = clock
        self.updated = clock()
        self.suppressed = 0

    def filter(self, record: logging.LogRecord) -> bool:
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens < 1:
            self.suppressed += 1
            return False
        self.tokens -= 1
        if self.suppressed:
            record.fields = {**getattr(record, "fields", {}), "suppressed": self.suppressed}
            record.msg += " (%d similar lines left out before this one)"
            record.args = (*record.args, self.suppressed)
            self.suppressed = 0
        return True


def setup(instance: str, level: int = logging.INFO, failed_request_lines_per_second: float = 20) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(instance))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    access = logging.getLogger(ACCESS_LOGGER)
    access.filters[:] = [FailedRequestLines(failed_request_lines_per_second)]
    logging.getLogger(FANOUT_LOGGER).filters[:] = [FailedRequestLines(failed_request_lines_per_second)]


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
    logging.getLogger(ACCESS_LOGGER).log(
        level,
        "%s %s %d",
        request.method,
        # A POST's query is refused (services/slow/app.py) and may hold a secret: never logged, as at the edge.
        request.path if request.method == "POST" else request.uri,
        status,
        extra={
            "request_id": getattr(handler, "request_id", None),
            "fields": {"status": status, "duration_ms": round(1000 * request.request_time(), 2)},
        },
    )
