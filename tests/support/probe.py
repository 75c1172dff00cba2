"""A request sent again and again in the background while a fault happens, each outcome kept with
the time it was sent: a test asserts none failed, or compares the latency before, during and after.

    with Probe(lambda: fleet.get("/fast", timeout=10).status) as probe:
        before = probe.over_the_next(3)            # 3 s of probes: a baseline
        ...                                        # the fault
    assert probe.statuses and set(probe.statuses) == {200}
"""

from __future__ import annotations

import statistics
import threading
import time
from typing import Callable


class Probe:
    """Calls `send` (which returns a status) every `every` s in a thread of its own, inside `within`
    if given (a network namespace, say); an OSError is kept as its class name."""

    def __init__(self, send: Callable[[], int], every: float = 0.02,
                 within: Callable[[Callable[[], None]], object] | None = None):
        self.send, self.every = send, every
        self.samples: list[tuple[float, int | str, float]] = []  # (sent at, status, seconds)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: (within or (lambda run: run()))(self._run), daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            started = time.monotonic()
            try:
                status = self.send()
            except OSError as exc:
                status = type(exc).__name__
            self.samples.append((started, status, time.monotonic() - started))

    def __enter__(self) -> "Probe":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def statuses(self) -> list[int | str]:
        return [status for _, status, _ in self.samples]

    def window(self, start: float, end: float) -> dict:
        """Count, failures and p50/p99 in ms of the probes sent between start and end."""
        inside = [(status, seconds) for t, status, seconds in self.samples if start <= t < end]
        times = sorted(seconds * 1000 for _, seconds in inside)
        if len(times) < 2:
            return {"n": len(times), "failed": 0, "p50": None, "p99": None}
        return {"n": len(times), "failed": sum(status != 200 for status, _ in inside),
                "p50": round(statistics.median(times), 2),
                "p99": round(statistics.quantiles(times, n=100)[98], 2)}

    def over_the_next(self, seconds: float) -> dict:
        """The window of the probes of the next `seconds`: the test waits that long on purpose, as
        the time its measurement covers."""
        start = time.monotonic()
        time.sleep(seconds)
        return self.window(start, time.monotonic())
