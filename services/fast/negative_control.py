"""A deliberately broken fast instance: the isolation check's negative controls (test-only).

With `observe.test_fast_delay_ms = N` (0, the default, turns it off), the fast routes wait N ms
before answering whenever a heavy job runs on a slow instance of this host: the regression a
shared CPU, a shared lock or a blocking call would cause, small enough to hide in a loose check.
With `observe.test_fast_delay_every = K` (default 1: every request) only every Kth fast request of
an instance waits while a heavy job runs, so the same mechanism makes a regression of the tail
alone, whatever the machine's noise does to the sample: K = 100 with 1,000 ms stalls 1 % of the
requests (the check's stall count must see it); K = 50 with a few times the baseline's p99 moves
only the p99 (p50 and p95 stay). `make load-check` must FAIL against each such fleet while it
PASSes against the real one (tests/integration/test_load.py). Never set them in production.

Whether a heavy job runs is read from the slow instances' own /healthz ("running"), every 50 ms.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging

from tornado import httpclient, ioloop

from services.common.settings import Settings

log = logging.getLogger(__name__)

POLL_SECONDS = 0.05


class HeavyJobSensor:
    """Knows, to within POLL_SECONDS, whether any slow instance of this host is running a job."""

    def __init__(self, settings: Settings):
        self.urls = [f"http://{settings.address}:{port}/healthz" for _, port in settings.instances("slow")]
        self.heavy = False
        self._poller: ioloop.PeriodicCallback | None = None

    def start(self) -> None:
        """Starts polling on the running loop (first request): idempotent."""
        if self._poller is None:
            self._poller = ioloop.PeriodicCallback(self._poll, POLL_SECONDS * 1000)
            self._poller.start()

    async def _poll(self) -> None:
        client = httpclient.AsyncHTTPClient()
        running = 0
        for url in self.urls:
            try:
                # raise_error=False: a busy slow instance's /healthz may say 503 "degraded", and
                # still carries its running count.
                response = await client.fetch(url, request_timeout=POLL_SECONDS * 4, raise_error=False)
                running += int(json.loads(response.body or b"{}").get("running", 0))
            except (OSError, ValueError, httpclient.HTTPClientError) as exc:
                log.debug("negative control: %s unreadable: %s", url, exc)
        self.heavy = running > 0


class Sabotage:
    """Which fast requests wait, and how long: every `every`th one while a heavy job runs."""

    def __init__(self, sensor: HeavyJobSensor, delay_ms: int, every: int = 1):
        self.sensor, self.delay_ms, self.every = sensor, delay_ms, every
        self._count = itertools.count()  # requests seen while a heavy job ran, across both routes

    def delay(self) -> float:
        """Seconds this request waits (starts the sensor on the first request)."""
        self.sensor.start()
        if self.sensor.heavy and next(self._count) % self.every == 0:
            return self.delay_ms / 1000
        return 0.0


def delayed(handler_class: type, sabotage: Sabotage) -> type:
    """`handler_class` with the sabotage's wait before a request."""

    class Delayed(handler_class):  # type: ignore[valid-type, misc]
        async def prepare(self) -> None:
            super().prepare()
            wait = sabotage.delay()
            if wait:
                await asyncio.sleep(wait)

    Delayed.__name__ = f"Delayed{handler_class.__name__}"
    return Delayed
