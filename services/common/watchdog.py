"""Watch an instance's event loop: how late it runs, and who blocks it.

A probe coroutine wakes every 100 ms and records how late it woke (fleet_event_loop_lag_seconds).
A watchdog thread checks that the probe keeps waking: when the loop has not run it for longer than
the threshold (observe.blocked_loop_ms), the loop is blocked, and the thread logs one warning
with the Python stack the loop thread is executing at that moment (the blocking code: file,
function, line) and the id of the request that was being served, and counts it in
fleet_event_loop_blocked_total; when the loop runs again, a second line gives the episode's whole
length. That is how heavy work that slipped into a fast route shows up.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
import traceback

from services.common import metrics

log = logging.getLogger("fleet.watchdog")

PROBE_INTERVAL = 0.1

# The id of the request whose handler the loop entered last and has not finished (set in
# BaseHandler.prepare, cleared in on_finish): a handler that blocks never yields, so while the loop
# is blocked by handler code this is the request blocking it ("-" when none was being served).
serving_request = {"id": "-"}


class LoopWatchdog:
    def __init__(self, threshold: float):
        self.threshold = threshold
        self.last_tick = time.monotonic()
        self._loop_thread = threading.get_ident()
        self._stop = threading.Event()
        self._probe: asyncio.Task | None = None
        self._episode_request = "-"

    def start(self) -> None:
        self._loop_thread = threading.get_ident()
        self.last_tick = time.monotonic()
        self._probe = asyncio.get_running_loop().create_task(self._run_probe())
        threading.Thread(target=self._watch, name="loop-watchdog", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()
        if self._probe is not None:
            self._probe.cancel()

    async def _run_probe(self) -> None:
        while True:
            expected = time.monotonic() + PROBE_INTERVAL
            await asyncio.sleep(PROBE_INTERVAL)
            now = time.monotonic()
            metrics.LOOP_LAG.observe(max(0.0, now - expected))
            self.last_tick = now

    def _watch(self) -> None:
        reported_tick = None
        while not self._stop.wait(min(self.threshold / 4, 0.05)):
            tick = self.last_tick
            stalled = time.monotonic() - tick - PROBE_INTERVAL
            if stalled > self.threshold and reported_tick != tick:
                reported_tick = tick  # one warning per blocked episode, while it lasts
                metrics.LOOP_BLOCKED.inc()
                self._report(stalled)
            elif reported_tick is not None and tick != reported_tick:
                # The loop ran again: the episode is over. The first warning only knew how long it
                # had lasted so far; this line says how long it lasted in all (at least: the block
                # may have begun up to one probe interval after the last probe ran).
                blocked = tick - reported_tick - PROBE_INTERVAL
                log.warning("event loop was blocked for at least %.0f ms in all (threshold %.0f ms)",
                            1000 * blocked, 1000 * self.threshold,
                            extra={"request_id": self._episode_request,
                                   "fields": {"blocked_ms": round(1000 * blocked), "episode": "ended"}})
                reported_tick = None

    def _report(self, stalled: float) -> None:
        self._episode_request = serving_request["id"]
        frame = sys._current_frames().get(self._loop_thread)
        stack = traceback.extract_stack(frame) if frame is not None else []
        # The innermost frames are the blocking code; the outer ones are asyncio and Tornado.
        where = stack[-1] if stack else None
        log.warning(
            "event loop blocked for %.0f ms (threshold %.0f ms) in %s (%s:%s), serving request %s",
            1000 * stalled, 1000 * self.threshold,
            where.name if where else "?", where.filename if where else "?", where.lineno if where else "?",
            serving_request["id"],
            extra={
                "request_id": serving_request["id"],
                "fields": {
                    "blocked_ms": round(1000 * stalled),
                    "function": where.name if where else None,
                    "file": where.filename if where else None,
                    "line": where.lineno if where else None,
                    "stack": "".join(traceback.format_list(stack[-8:])),
                },
            },
        )
