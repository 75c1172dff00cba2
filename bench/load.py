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
import math
import os
import random
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

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

    def to_dict(self) -> dict:
        return {**{k: v for k, v in vars(self).items() if k != "statuses"}, "statuses": dict(self.statuses)}

    @classmethod
    def from_dict(cls, d: dict) -> "Samples":
        return cls(**{**d, "statuses": Counter({int(k): v for k, v in d["statuses"].items()})})

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


LATE_BOUND_MS = 1.0
"""A cell whose probe sent late by more than this at p99 is not judged: it measured the load
generator as much as the subject (the idle fleet's p99 is about 2 ms; a probe 1 ms late at p99
is half of that). Its figures are kept and shown, with the lateness, never scored."""

FLOOD_NICE = 19
"""The flood's clients run at the lowest priority: a remote client costs the server's cores
nothing, and on this machine every cycle a flood client spends waking up, parsing and sending is
taken from the probe or from the subject. (The probe runs as a real-time task: probe_process.)"""


def kept_schedule(lateness_p99: float | None) -> bool:
    """Whether a cell's figures measure the subject: its probe kept the schedule (LATE_BOUND_MS)."""
    return lateness_p99 is not None and not math.isnan(lateness_p99) and lateness_p99 <= LATE_BOUND_MS


async def probe(host: str, port: int, paths: list[str], rate: float, count: int, drain_timeout: float,
                max_connections: int = 256, headers: str = "", sources: list[str] | None = None,
                ok_status: int = 200) -> dict[str, Samples]:
    """open_loop in a process of its own (`python -m bench.load --probe ARGS`, on uvloop), as a
    remote client would be: the bench's own event loop, the flood's clients and the probe no
    longer share one interpreter, and the probe's schedule is kept by a process that does nothing
    else. The same arguments and result as open_loop."""
    # The samples come back in a file, not on a pipe: a megabyte of JSON written to a pipe whose
    # reader is slower than a real-time writer came back cut at 64 KiB or 512 KiB.
    fd, out = tempfile.mkstemp(prefix="fleet-probe-", suffix=".json")
    os.close(fd)
    try:
        args = json.dumps({"host": host, "port": port, "paths": paths, "rate": rate, "count": count,
                           "drain_timeout": drain_timeout, "max_connections": max_connections, "headers": headers,
                           "sources": sources, "ok_status": ok_status})
        proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "bench.load", "--probe", args, out)
        await proc.wait()
        data = Path(out).read_text()
        if proc.returncode != 0 or not data.strip():
            raise RuntimeError(f"the probe process failed (exit {proc.returncode}): {data[-500:]!r}")
        return {path: Samples.from_dict(d) for path, d in json.loads(data).items()}
    finally:
        os.unlink(out)


PROBE_RT_PRIORITY = 1  # SCHED_FIFO's lowest: above every normal task, below the kernel's own threads
PROBE_WARMUP = 20  # requests a probe process sends, unrecorded, before its schedule


def probe_process(args: dict, out: str) -> None:
    """The probe process: one open loop, its samples as JSON in the file `out`.

    A remote client never waits for the server's CPU to send or to read an answer; on one machine
    it does, whenever the task that has the CPU runs out its slice first (1.4 ms here, and this
    kernel preempts no kernel code: CONFIG_PREEMPT_NONE). Measured under the fleet's flood: the
    probe at the default priority sent late by 1.6-2.2 ms at p99, and 0.8-2.1 with the fast path's
    short slice, against 0.3 beside the floor's spinning burners. So it runs as a real-time task
    (SCHED_FIFO 1, inherited by its sender thread), which takes a CPU the moment it wakes: its own
    few percent of a core are then the only load it puts before the subject. Where the bench may not
    (no root), it asks for the fast path's short slice (services/common/cpu_slice.py) instead."""
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(PROBE_RT_PRIORITY))
    except (PermissionError, OSError):
        from services.common import cpu_slice
        from services.common.settings import load as load_settings
        cpu_slice.request(load_settings(env={}).fast.sched_slice_us)
    try:
        import uvloop  # as the fleet's instances: less of the client's own CPU in every latency
        uvloop.install()
    except ImportError:
        pass
    # A new process's first sends pay for first calls (imports, the sender thread, allocations):
    # a short schedule of the same requests first, not recorded, so that the cell measures the
    # subject and not the probe's own start.
    asyncio.run(open_loop(**{**args, "count": PROBE_WARMUP, "rate": max(args["rate"], 200)}))
    results = asyncio.run(open_loop(**args))
    Path(out).write_text(json.dumps({path: s.to_dict() for path, s in results.items()}))


class HeavyFlood:
    """`clients` closed-loop clients each repeating GET `path` back to back, each in a process of
    its own (`python -m bench.load --client ...`) and from its own loopback address (127.0.0.2,
    .3, ...), at `nice` (FLOOD_NICE under a probe): as many remote users would be. In the probe's
    own event loop they made its sends late by 2.4-4.5 ms at p99 in every flooded cell (bench/results
    of 2026-12-02), against 0.6 ms where nothing else ran there.

    A client answered 429 or 503 (refused: nginx's per-client limit, a full line) or whose
    connection failed backs off (50 ms doubling to 1 s, with jitter) before trying again, as a
    real client does; without that, a refused client is a tight loop that measures itself.

    `async with`, then `completed()`, `errors` and `refused` once it is over. Every process reads
    the same system-wide monotonic clock.
    """

    def __init__(self, host: str, port: int, path: str, clients: int, nice: int = FLOOD_NICE):
        self.host, self.port, self.path, self.clients, self.nice = host, port, path, clients, nice
        self.done: list[tuple[float, int]] = []
        self.errors = 0
        self.refused = 0
        self._procs: list[asyncio.subprocess.Process] = []
        self._dir = tempfile.TemporaryDirectory(prefix="fleet-flood-")

    def _out(self, k: int) -> str:
        return f"{self._dir.name}/client-{k}.json"  # what client k saw, written as it stops

    async def __aenter__(self) -> "HeavyFlood":
        try:
            for k in range(self.clients):
                self._procs.append(await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "bench.load", "--client", self.host, str(self.port), self.path,
                    f"127.0.0.{2 + k}", str(self.nice), self._out(k), stdout=asyncio.subprocess.PIPE))
            for proc in self._procs:
                ready = await asyncio.wait_for(proc.stdout.readline(), 30)
                if ready.strip() != b"ready":
                    raise RuntimeError(f"a flood client did not start: {ready!r}")
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def stop(self, timeout: float = 10) -> None:
        """Let every client finish the job it is waiting for (no killed jobs, no worker churn),
        then collect what they saw."""
        procs, self._procs = self._procs, []
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        await asyncio.gather(*(ended(proc, timeout + 5) for proc in procs))
        for k in range(len(procs)):
            try:
                data = json.loads(Path(self._out(k)).read_text())
            except (OSError, ValueError):  # a client that never started, or was killed
                continue
            self.done += [(t, status) for t, status in data.get("done", [])]
            self.errors += data.get("errors", 0)
            self.refused += data.get("refused", 0)
        self.done.sort()
        self._dir.cleanup()

    def completed(self, start: float, end: float) -> Counter:
        """Statuses of the responses received in [start, end)."""
        return statuses_between(self.done, start, end)


async def last_words(proc: asyncio.subprocess.Process, timeout: float) -> dict:
    """What a load process told to stop (SIGTERM) prints as it goes: one JSON object on stdout
    (bench/streams.py's readers; a few kilobytes)."""
    try:
        out = await asyncio.wait_for(proc.stdout.read(), timeout)
        return json.loads(out.strip() or b"{}")
    finally:
        await ended(proc, 5)


async def ended(proc: asyncio.subprocess.Process, timeout: float) -> None:
    """Wait for a load process told to stop (SIGTERM) to exit; kill it if it does not in time.

    Killed only if it does not exit by itself: Popen.kill() first polls, and a poll that reaps an
    exiting process steals it from asyncio's child watcher ("Unknown child process pid ..., will
    report returncode 255", seen in every bench log)."""
    try:
        await asyncio.wait_for(proc.wait(), timeout)
    except asyncio.TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


def statuses_between(done: list[tuple[float, int]], start: float, end: float) -> Counter:
    """Statuses of the (monotonic time, status) answers received in [start, end)."""
    return Counter(status for t, status in done if start <= t < end)


REFUSED = (429, 503)  # nginx's per-client limit, a full line: come back later
BACKOFF_FIRST, BACKOFF_MAX = 0.05, 1.0


class FloodClient:
    """One closed-loop client repeating GET `path` from `source`, backing off when refused."""

    def __init__(self, host: str, port: int, path: str, source: str):
        self.host, self.port, self.path, self.source = host, port, path, source
        self.done: list[tuple[float, int]] = []  # (time of the response, status)
        self.errors = 0
        self.refused = 0
        self.stopping = False

    async def run(self) -> None:
        conn: HttpConnection | None = None
        failures = 0
        while not self.stopping:
            try:
                if conn is None or conn.closed:
                    conn = await HttpConnection.open(self.host, self.port, self.source)
                status, _ = await conn.get(self.path)
                self.done.append((time.monotonic(), status))
                refused = status in REFUSED
                self.refused += refused
            except HttpError:
                self.errors += 1
                conn, refused = None, True
            failures = failures + 1 if refused else 0
            if failures:
                await asyncio.sleep(backoff(failures))
        if conn is not None:
            conn.close()


def backoff(failures: int) -> float:
    """Seconds to wait after `failures` refusals in a row: 50 ms doubling to 1 s, +-25 % jitter."""
    return min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (failures - 1)) * random.uniform(0.75, 1.25)


def client_process(host: str, port: int, path: str, source: str, nice: int, out: str) -> None:
    """A flood client's process: says "ready" on stdout, runs until SIGTERM, lets its request in
    flight finish (at most 10 s), then writes its answers as JSON to the file `out`."""
    os.nice(nice)

    async def main() -> None:
        client = FloodClient(host, port, path, source)
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, lambda: setattr(client, "stopping", True))
        running = asyncio.create_task(client.run())
        print("ready", flush=True)
        while not client.stopping:
            await asyncio.sleep(0.05)
        done, _ = await asyncio.wait([running], timeout=10)
        if not done:
            running.cancel()
        Path(out).write_text(json.dumps({"done": client.done, "errors": client.errors, "refused": client.refused}))

    asyncio.run(main())


if __name__ == "__main__":
    # python -m bench.load --probe ARGS_JSON OUT_FILE                (probe() starts it)
    # python -m bench.load --client HOST PORT PATH SOURCE NICE OUT_FILE   (HeavyFlood starts them)
    if len(sys.argv) == 4 and sys.argv[1] == "--probe":
        probe_process(json.loads(sys.argv[2]), sys.argv[3])
    elif len(sys.argv) == 8 and sys.argv[1] == "--client":
        client_process(sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5], int(sys.argv[6]), sys.argv[7])
    else:
        sys.exit("usage: python -m bench.load --probe ARGS_JSON OUT_FILE | --client HOST PORT PATH SOURCE NICE OUT_FILE")
