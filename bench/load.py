"""Load for the measurements: open-loop fast traffic on a fixed schedule, and heavy flood clients.

Open loop (no coordinated omission): request i is due at t0 + i / rate whatever happened to the
earlier ones, and its latency is counted from that due time, not from when the client managed to
send it. A server that stalls for 100 ms is charged 100 ms on every request due in that window,
as real users arriving at that rate would see, instead of the client politely waiting (which is
how closed-loop tools such as Locust hide stalls).

Timing: the schedule is kept by a sender thread sleeping with time.sleep (sub-millisecond; the
event loop's own timers round up to whole milliseconds, which would add up to 1 ms of client
slack to every sample), which hands each due request to the event loop. How late each send
really was is recorded (`lateness`, typically 0.1-0.2 ms: the client's own cost, which is part of
every latency from the due time), and so is each request's service time from its actual send, so
client-side delay is visible rather than silently folded in.
"""

from __future__ import annotations

import asyncio
import ctypes
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

from bench.httpclient import ConnectionPool, HttpConnection, HttpError


@dataclass
class Samples:
    """The outcome of one path's requests in an open-loop run."""

    path: str
    sent: int = 0
    latency_ms: list[float] = field(default_factory=list)  # due time -> response, 200s only
    service_ms: list[float] = field(default_factory=list)  # actual send -> response, 200s only
    lateness_ms: list[float] = field(default_factory=list)  # actual send - due time
    statuses: Counter = field(default_factory=Counter)
    errors: int = 0  # connection errors, malformed responses
    timeouts: int = 0  # no response before the run's drain deadline
    censored_ms: list[float] = field(default_factory=list)  # those: due time -> deadline (a lower bound)
    first_due: float = 0.0
    last_done: float = 0.0

    @property
    def ok(self) -> int:
        return len(self.latency_ms)

    @property
    def failed(self) -> int:
        return self.sent - self.ok

    def achieved_rate(self) -> float:
        """Successful responses per second, from the first due time to the last response."""
        span = self.last_done - self.first_due
        return self.ok / span if span > 0 else 0.0


async def open_loop(host: str, port: int, paths: list[str], rate: float, count: int,
                    drain_timeout: float, max_connections: int = 256) -> dict[str, Samples]:
    """Send `count` GETs at `rate` per second in total, cycling through `paths`; wait up to
    `drain_timeout` s after the last send for the answers. Returns the samples per path."""
    loop = asyncio.get_running_loop()
    pool = ConnectionPool(host, port, limit=max_connections)
    await pool.prewarm(min(8, max_connections))
    results = {p: Samples(p) for p in paths}
    tasks: dict[asyncio.Task, tuple[str, float]] = {}
    t0 = time.monotonic() + 0.05
    for s in results.values():
        s.first_due = t0

    async def one(path: str, due: float) -> None:
        s = results[path]
        try:
            conn = await pool.acquire()
        except HttpError:
            s.errors += 1
            return
        sent = time.monotonic()
        try:
            status, _ = await conn.get(path)
        except HttpError:
            s.errors += 1
            pool.release(conn)
            return
        except asyncio.CancelledError:  # past the drain deadline
            conn.close()
            raise
        done = time.monotonic()
        pool.release(conn)
        s.statuses[status] += 1
        s.lateness_ms.append(1000 * (sent - due))
        if status == 200:
            s.latency_ms.append(1000 * (done - due))
            s.service_ms.append(1000 * (done - sent))
        s.last_done = max(s.last_done, done)

    def launch(path: str, due: float) -> None:
        results[path].sent += 1
        tasks[loop.create_task(one(path, due))] = (path, due)

    stop = threading.Event()

    def sender() -> None:
        _tight_timers()
        for i in range(count):
            due = t0 + i / rate
            while True:  # time.sleep may wake a little early; never send before the due time
                delay = due - time.monotonic()
                if delay <= 0:
                    break
                time.sleep(delay)
            if stop.is_set():
                return
            loop.call_soon_threadsafe(launch, paths[i % len(paths)], due)

    sending = loop.run_in_executor(None, sender)
    try:
        await sending
        await asyncio.sleep(0)  # let the last launch callbacks run
        pending = {t for t in tasks if not t.done()}
        if pending:
            await asyncio.wait(pending, timeout=drain_timeout)
    finally:
        stop.set()
        now = time.monotonic()
        for task, (path, due) in tasks.items():
            if not task.done():
                task.cancel()
                results[path].timeouts += 1
                results[path].censored_ms.append(1000 * (now - due))
        await asyncio.gather(*tasks, return_exceptions=True)
        pool.close()
    return results


PR_SET_TIMERSLACK = 29


def _tight_timers() -> None:
    """Ask for 1 ns of timer slack in this thread (Linux default 50 us): time.sleep then wakes
    about 50 us closer to the due time (measured here: overshoot p50 100 us -> 50 us)."""
    try:
        ctypes.CDLL(None).prctl(PR_SET_TIMERSLACK, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass


class HeavyFlood:
    """`clients` closed-loop clients each repeating GET `path` back to back.

    Each client connects from its own loopback address (127.0.0.2, .3, ...): a flood is many users,
    and nginx's per-client rate limit (edge.slow_rate_per_second) would otherwise answer one
    address's flood with 429s instead of letting it keep the workers busy.
    """

    def __init__(self, host: str, port: int, path: str, clients: int):
        self.host, self.port, self.path, self.clients = host, port, path, clients
        self.done: list[tuple[float, int]] = []  # (time of the response, status)
        self.errors = 0
        self._stopping = False
        self._tasks: list[asyncio.Task] = []
        self._conns: list[HttpConnection] = []

    async def __aenter__(self) -> "HeavyFlood":
        self._tasks = [asyncio.create_task(self._client(f"127.0.0.{2 + k}")) for k in range(self.clients)]
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _client(self, source: str) -> None:
        conn: HttpConnection | None = None
        while not self._stopping:
            try:
                if conn is None or conn.closed:
                    conn = await HttpConnection.open(self.host, self.port, source)
                    self._conns.append(conn)
                status, _ = await conn.get(self.path)
                self.done.append((time.monotonic(), status))
            except HttpError:
                self.errors += 1
                conn = None
                await asyncio.sleep(0.05)

    async def stop(self, timeout: float = 10) -> None:
        """Let every client finish the job it is waiting for (no killed jobs, no worker churn), then
        stop; cancel whatever has not finished after `timeout`."""
        self._stopping = True
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=timeout)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for conn in self._conns:
            conn.close()
        self._tasks = []

    def completed(self, start: float, end: float) -> Counter:
        """Statuses of the responses received in [start, end)."""
        return Counter(status for t, status in self.done if start <= t < end)
