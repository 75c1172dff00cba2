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
import contextlib
import ctypes
import json
import signal
import sys
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
    latency_ms: list[float] = field(default_factory=list)  # due time -> response, successes only (200)
    service_ms: list[float] = field(default_factory=list)  # actual send -> response, successes only
    due: list[float] = field(default_factory=list)  # each success's due time (monotonic), as latency_ms
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
                    drain_timeout: float, max_connections: int = 256, headers: str = "",
                    sources: list[str] | None = None, ok_status: int = 200) -> dict[str, Samples]:
    """Send `count` GETs at `rate` per second in total, cycling through `paths`; wait up to
    `drain_timeout` s after the last send for the answers. Returns the samples per path.

    `headers` ("Name: value\r\n" lines) go with every request; with `sources` (loopback addresses),
    the requests take turns from each, as that many clients would; an answer is a success (its
    latency counted) if its status is `ok_status`."""
    loop = asyncio.get_running_loop()
    pools = [ConnectionPool(host, port, limit=max(1, max_connections // len(sources or [None])), source=source)
             for source in sources or [None]]
    for pool in pools:
        await pool.prewarm(min(8, pool.limit))
    results = {p: Samples(p) for p in paths}
    tasks: dict[asyncio.Task, tuple[str, float]] = {}
    t0 = time.monotonic() + 0.05
    for s in results.values():
        s.first_due = t0

    async def one(path: str, due: float, pool: ConnectionPool) -> None:
        s = results[path]
        try:
            conn = await pool.acquire()
        except HttpError:
            s.errors += 1
            return
        sent = time.monotonic()
        try:
            status, _ = await conn.request("GET", path, headers)
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
        if status == ok_status:
            s.due.append(due)
            s.latency_ms.append(1000 * (done - due))
            s.service_ms.append(1000 * (done - sent))
        s.last_done = max(s.last_done, done)

    def launch(i: int, due: float) -> None:
        path = paths[i % len(paths)]
        results[path].sent += 1
        tasks[loop.create_task(one(path, due, pools[i % len(pools)]))] = (path, due)

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
            loop.call_soon_threadsafe(launch, i, due)

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
        for pool in pools:
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
    """`clients` closed-loop clients each repeating GET `path` back to back, in a process of their
    own (`python -m bench.load --flood ...`), so that the flood's clients never delay the probe's
    schedule: in the probe's own event loop they made its sends late by 2.4-4.5 ms at p99 in every
    flooded cell (bench/results of 2026-12-02), against 0.6 ms where nothing else ran there.

    The same interface as the clients themselves (FloodClients): `async with`, then `completed()`
    and `errors` once it is over. Both processes read the same system-wide monotonic clock.
    """

    def __init__(self, host: str, port: int, path: str, clients: int):
        self.host, self.port, self.path, self.clients = host, port, path, clients
        self.done: list[tuple[float, int]] = []
        self.errors = 0
        self._proc: asyncio.subprocess.Process | None = None

    async def __aenter__(self) -> "HeavyFlood":
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.load", "--flood", self.host, str(self.port), self.path, str(self.clients),
            stdout=asyncio.subprocess.PIPE)
        ready = await asyncio.wait_for(self._proc.stdout.readline(), 30)
        if ready.strip() != b"ready":
            raise RuntimeError(f"the flood process did not start: {ready!r}")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def stop(self, timeout: float = 10) -> None:
        """Let every client finish the job it is waiting for, then collect what they saw."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        proc.send_signal(signal.SIGTERM)
        data = await last_words(proc, timeout + 5)
        self.done = [(t, status) for t, status in data.get("done", [])]
        self.errors = data.get("errors", 0)

    def completed(self, start: float, end: float) -> Counter:
        """Statuses of the responses received in [start, end)."""
        return statuses_between(self.done, start, end)


async def last_words(proc: asyncio.subprocess.Process, timeout: float) -> dict:
    """What a load process told to stop (SIGTERM) prints as it goes: one JSON object on stdout."""
    try:
        out = await asyncio.wait_for(proc.stdout.read(), timeout)
        return json.loads(out.strip() or b"{}")
    finally:
        # Killed only if it does not exit by itself: Popen.kill() first polls, and a poll that
        # reaps an exiting process steals it from asyncio's child watcher ("Unknown child
        # process pid ..., will report returncode 255", seen in every bench log).
        try:
            await asyncio.wait_for(proc.wait(), 5)
        except asyncio.TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()


def statuses_between(done: list[tuple[float, int]], start: float, end: float) -> Counter:
    """Statuses of the (monotonic time, status) answers received in [start, end)."""
    return Counter(status for t, status in done if start <= t < end)


def flood_process(host: str, port: int, path: str, clients: int) -> None:
    """The flood process: clients until SIGTERM, then their answers as JSON on stdout."""
    async def main() -> None:
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        async with FloodClients(host, port, path, clients) as flood:
            print("ready", flush=True)
            await stop.wait()
        print(json.dumps({"done": flood.done, "errors": flood.errors}), flush=True)

    asyncio.run(main())


class FloodClients:
    """`clients` closed-loop clients each repeating GET `path` back to back (in this process).

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

    async def __aenter__(self) -> "FloodClients":
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
        return statuses_between(self.done, start, end)


if __name__ == "__main__":
    # python -m bench.load --flood HOST PORT PATH CLIENTS (HeavyFlood starts it)
    if len(sys.argv) == 6 and sys.argv[1] == "--flood":
        flood_process(sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5]))
    else:
        sys.exit("usage: python -m bench.load --flood HOST PORT PATH CLIENTS")
