"""The watchers of locustfile.py's long jobs (--long-job-streams): event streams held open on the
jobs in flight, in a process of their own, niced, so that parsing their thousands of events a
second never takes the CPU of the Locust process that times the fast users (a remote browser
costs the server's machine none either).

    python -m stream_watchers URL SOURCE[,SOURCE...]     (locustfile.py's Watchers starts it)

One stream per SOURCE (a local address to connect from, "-" for none): it follows a job in flight
(any of them, at random) to its end event, then the next one; a stream cut before its end resumes
with Last-Event-ID; a refusal with Retry-After is waited out as told. The jobs come on stdin, one
line each: "+<id>" (submitted) or "-<id>" (ended); the end of stdin (Locust stopped, or died) ends
this process. Every REPORT_PERIOD it prints one JSON line: {"open": streams open (answered 200, not
ended), "requests": [[name, start_time, response_time_ms, kind, error or null], ...]}, which Locust
reports as its own requests (locustfile.follow's names and kinds: the same rows, the same rules).
The events are parsed only as far as their ids (a gap or a repeat is an error) and the end event.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import sys
import time
from urllib.parse import urlsplit

from bench.streams import EventStream

NAME = "/jobs/[id]/events (watcher)"
NICE = 10  # below Locust's fast users (nice 0), as a remote client's CPU is none of the server's machine
REPORT_PERIOD = 0.25  # seconds between reports to Locust (its streams-open samples are every 0.5 s)
STREAM_TIMEOUT = 60.0  # seconds of silence after which a stream is dead (the fleet sends a keep-alive every 15 s)


class Watch(EventStream):
    """One request of a watcher: its answer, then its events' ids until the end event."""

    def __init__(self, owner: "Watchers", request: bytes, last: int):
        super().__init__(request)
        self.owner, self.last = owner, last
        self.started, self.clock = time.time(), time.perf_counter()
        self.heard = time.monotonic()
        self.end = False  # the end event came

    def answered(self) -> None:
        status, retry = self.status, self.header(b"retry-after")
        if status in (200, 204):
            self.owner.report(NAME, self, "stream")
            self.owner.open += status == 200
        elif status in (429, 503) and retry is not None:
            self.owner.report(f"{NAME} (refused {status})", self, "refused")
        else:
            self.owner.report(NAME, self, str(status), f"{status} {self.head[:200]!r}")

    def header(self, name: bytes) -> bytes | None:
        for line in self.head.split(b"\r\n")[1:]:
            key, _, value = line.partition(b":")
            if key.strip().lower() == name:
                return value.strip()
        return None

    def event(self, block: bytes, arrived: float) -> None:
        self.heard = arrived
        if not block.startswith(b"id:"):
            return  # retry:, a keep-alive comment
        seq = int(block[3:block.index(b"\n")] if b"\n" in block else block[3:])
        if seq != self.last + 1:
            self.owner.report(f"{NAME} (gap)", self, "gap", f"event {seq} after {self.last}: the stream skipped or "
                                                            "repeated events")
        self.last = seq
        if b"\nevent: end\n" in block:
            self.end = True
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.status == 200:
            self.owner.open -= 1
            if not self.end:
                self.owner.report(f"{NAME} (cut)", self, "cut", f"the stream ended without its end event: {exc}")
        elif self.status is None:
            self.owner.report(NAME, self, "connection error", f"no answer: {exc}")
        super().connection_lost(exc)


class Watchers:
    """This process's streams, the jobs they follow and what goes back to Locust."""

    def __init__(self, url: str, sources: list[str | None]):
        parts = urlsplit(url)
        self.host, self.port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
        self.tls = parts.scheme == "https" or None
        self.sources = sources
        self.jobs: set[str] = set()
        self.posted = asyncio.Event()  # set while a job is on the board
        self.open = 0
        self.requests: list[list] = []
        self.streams: set[Watch] = set()

    def report(self, name: str, stream: Watch, kind: str, error: str | None = None) -> None:
        self.requests.append([name, stream.started, (time.perf_counter() - stream.clock) * 1000, kind, error])

    def board(self, line: str) -> None:
        sign, job = line[:1], line[1:].strip()
        if sign == "+":
            self.jobs.add(job)
            self.posted.set()
        elif sign == "-":
            self.discard(job)

    def discard(self, job: str) -> None:
        self.jobs.discard(job)
        if not self.jobs:
            self.posted.clear()

    async def watch(self, source: str | None) -> None:
        """One watcher: a job in flight to its end, then the next; resumed after a cut."""
        loop = asyncio.get_running_loop()
        job, last = None, 0
        while True:
            if job not in self.jobs:
                await self.posted.wait()
                job, last = random.choice(tuple(self.jobs)), 0
            resume = f"Last-Event-ID: {last}\r\n" if last else ""
            request = (f"GET /jobs/{job}/events HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                       f"Accept: text/event-stream\r\n{resume}User-Agent: fleet-watcher\r\n\r\n").encode()
            stream = Watch(self, request, last)
            try:
                await loop.create_connection(lambda: stream, self.host, self.port, ssl=self.tls,
                                             local_addr=(source, 0) if source else None)
            except OSError as exc:
                self.report(NAME, stream, "connection error", str(exc))
                await asyncio.sleep(1.0)  # never a tight loop
                continue
            self.streams.add(stream)
            try:
                await stream.closed
            finally:
                self.streams.discard(stream)
            last = stream.last
            retry = stream.header(b"retry-after") if stream.status in (429, 503) else None
            if stream.end or stream.status in (204, 404, 410):
                self.discard(job)  # ended: nobody follows it any more
                job = None
            elif retry is not None:
                await asyncio.sleep(float(retry) if retry.isdigit() else 1.0)
            elif stream.status != 200:
                await asyncio.sleep(1.0)  # an error: never a tight loop

    async def sweep(self) -> None:
        """Hang up on streams silent for STREAM_TIMEOUT (dead: a cut, reported as such)."""
        while True:
            await asyncio.sleep(5)
            for stream in list(self.streams):
                if time.monotonic() - stream.heard > STREAM_TIMEOUT:
                    stream.transport.abort()

    async def tell_locust(self) -> None:
        while True:
            await asyncio.sleep(REPORT_PERIOD)
            requests, self.requests = self.requests, []
            sys.stdout.write(json.dumps({"open": self.open, "requests": requests}) + "\n")
            sys.stdout.flush()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        stdin = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
        tasks = [asyncio.create_task(self.watch(source)) for source in self.sources]
        tasks += [asyncio.create_task(self.sweep()), asyncio.create_task(self.tell_locust())]
        while line := await stdin.readline():  # until Locust closes it, or dies
            self.board(line.decode())
        for task in tasks:
            task.cancel()
        for stream in list(self.streams):
            stream.transport.abort()


def main(url: str, sources: str) -> None:
    os.nice(NICE)
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    asyncio.run(Watchers(url, [None if s == "-" else s for s in sources.split(",")]).run())


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m stream_watchers URL SOURCE[,SOURCE...]  (a source '-': no local address)")
    main(sys.argv[1], sys.argv[2])
