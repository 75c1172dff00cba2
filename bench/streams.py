"""Many open event streams (SSE) through the edge, read in a process of their own, and how late each
progress event of bench/job_tasks.py's `stamped` task reached them.

    async with Streams(edge_port, ["/jobs/<id>/events", ...], addresses, per_address=25) as streams:
        streams.start_window()              # count and time what arrives from now ...
        await asyncio.sleep(30)
        streams.end_window()                # ... to now
    streams.result                          # {"open": 1000, "latency_ms": [...], ...}

Each stream is a client of its own address's share: `per_address` streams from each address
(127.0.0.x), within the edge's cap on the streams one client holds (jobs.max_streams_per_client),
never raising it. The streams take turns over the paths. A progress event's message is "<host
monotonic clock at the report> <pid>": its latency is the clock at its arrival here minus that
(one host, one clock: CLOCK_MONOTONIC is system-wide).

Reading thousands of events a second costs a Python process CPU, which the machine's two cores
share with the fleet: the readers are asyncio protocols on uvloop that parse nothing but the
events (no HTTP library), in a process of their own so that the bench's own probe keeps its schedule.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import time
from collections import Counter

from bench.load import last_words

HEAD_END = b"\r\n\r\n"


class EventStream(asyncio.Protocol):
    """One GET of an event stream over a bare connection: the answer's head, then each event (the
    block before a blank line) as its chunks arrive; parses nothing more. Subclasses say what an
    answer and an event mean (answered, event); a stream whose answer is not a 200 is closed."""

    def __init__(self, request: bytes):
        self.request = request
        self.status: int | None = None
        self.head = b""  # the answer's head (status line and headers)
        self.raw = b""  # the chunked body not decoded yet
        self.text = b""  # decoded body not parsed into events yet
        self.ended = False  # the body's last chunk came
        self.closed = asyncio.get_running_loop().create_future()  # done once the connection is gone

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        arrived = time.monotonic()
        if self.status is None:
            self.head += data
            if HEAD_END not in self.head:
                return
            self.head, _, data = self.head.partition(HEAD_END)
            self.status = int(self.head.split(b" ", 2)[1])
            self.answered()
            if self.status != 200:
                self.transport.close()
                return
        self.raw += data
        self._dechunk()
        while (cut := self.text.find(b"\n\n")) >= 0 and not self.transport.is_closing():
            block, self.text = self.text[:cut], self.text[cut + 2:]
            self.event(block, arrived)

    def answered(self) -> None:
        """The head has come (self.status, self.head)."""

    def event(self, block: bytes, arrived: float) -> None:
        """An event's block came at `arrived` (time.monotonic())."""

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)

    def _dechunk(self) -> None:
        """Move whole chunks of the chunked body from raw to text."""
        while True:
            line_end = self.raw.find(b"\r\n")
            if line_end < 0:
                return
            size = int(self.raw[:line_end].split(b";")[0], 16)
            if size == 0:
                self.ended = True
                return
            if len(self.raw) < line_end + 2 + size + 2:
                return
            self.text += self.raw[line_end + 2:line_end + 2 + size]
            self.raw = self.raw[line_end + 2 + size + 2:]


class StreamReader(EventStream):
    """One of the bench's streams: counts its events, times the progress events in the window."""

    def __init__(self, owner: "Reader", request: bytes):
        super().__init__(request)
        self.owner = owner
        self.events = 0
        self.window_events = 0

    def answered(self) -> None:
        self.owner.statuses[self.status] += 1
        self.owner.settled()

    def event(self, block: bytes, arrived: float) -> None:
        if not block.startswith(b"id:"):
            return  # retry:, a keep-alive comment
        self.events += 1
        if b"\nevent: end\n" in block:
            self.owner.ends += 1
            return
        if self.owner.recording and b"\nevent: progress\n" in block:
            self.window_events += 1
            data = json.loads(block.split(b"\ndata: ", 1)[1])
            stamp = float(data["message"].split()[0])
            self.owner.latency_ms.append(round(1000 * (arrived - stamp), 3))

    def connection_lost(self, exc: Exception | None) -> None:
        if self.status is None:  # cut before its answer
            self.owner.errors += 1
            self.owner.settled()
        super().connection_lost(exc)


class Reader:
    """The streams of this process."""

    def __init__(self, port: int, paths: list[str], addresses: list[str], per_address: int):
        self.port, self.paths, self.addresses, self.per_address = port, paths, addresses, per_address
        self.statuses: Counter = Counter()
        self.errors = 0
        self.ends = 0
        self.recording = False
        self.window = [0.0, 0.0]
        self.latency_ms: list[float] = []
        self.streams: list[StreamReader] = []
        self.closed_in_window = 0
        self.all_settled = asyncio.get_running_loop().create_future()

    def settled(self) -> None:
        """A stream got its answer's head, or failed: once every one has, the streams are ready."""
        if sum(self.statuses.values()) + self.errors >= len(self.addresses) * self.per_address:
            if not self.all_settled.done():
                self.all_settled.set_result(None)

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        k = 0
        for address in self.addresses:
            for _ in range(self.per_address):
                path = self.paths[k % len(self.paths)]
                k += 1
                request = (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\nAccept: text/event-stream\r\n"
                           "User-Agent: fleet-bench\r\n\r\n").encode()
                stream = StreamReader(self, request)
                try:
                    await loop.create_connection(lambda s=stream: s, "127.0.0.1", self.port, local_addr=(address, 0))
                except OSError:
                    self.errors += 1
                    self.settled()
                    continue
                self.streams.append(stream)
        await asyncio.wait_for(self.all_settled, 60)

    def start_window(self) -> None:
        self.window[0] = time.monotonic()
        for s in self.streams:
            s.window_events = 0
        self.recording = True

    def end_window(self) -> None:
        self.window[1] = time.monotonic()
        self.recording = False
        self.closed_in_window = sum(1 for s in self.streams if s.status == 200 and s.closed.done())

    def result(self) -> dict:
        seconds = max(1e-9, self.window[1] - self.window[0])
        open_streams = [s for s in self.streams if s.status == 200]
        rates = sorted(s.window_events / seconds for s in open_streams)
        return {"open": len(open_streams), "statuses": {str(k): v for k, v in self.statuses.items()},
                "errors": self.errors, "ends": self.ends, "closed_early": self.closed_in_window,
                "window_s": seconds, "latency_ms": self.latency_ms,
                "events_per_stream_s": rates}


def reader_process(port: int, paths: list[str], addresses: list[str], per_address: int) -> None:
    """`python -m bench.streams ...`: open the streams, say "ready", count and time the events
    between SIGUSR1 and SIGUSR2, and at SIGTERM print what was seen (JSON) and leave."""
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        reader = Reader(port, paths, addresses, per_address)
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGUSR1, reader.start_window)
        loop.add_signal_handler(signal.SIGUSR2, reader.end_window)
        await reader.open()
        print("ready", flush=True)
        await stop.wait()
        for s in reader.streams:
            s.transport.close()
        print(json.dumps(reader.result()), flush=True)

    asyncio.run(main())


class Streams:
    """The streams of `processes` reader processes (one address list each); their results merged."""

    def __init__(self, port: int, paths: list[str], addresses: list[str], per_address: int, processes: int = 1):
        self.port, self.paths, self.per_address = port, paths, per_address
        self.groups = [addresses[i::processes] for i in range(processes) if addresses[i::processes]]
        self._procs: list[asyncio.subprocess.Process] = []
        self.result: dict = {}

    async def __aenter__(self) -> "Streams":
        for k, group in enumerate(self.groups):
            # Each process takes the paths from its own turn, so that streams spread over the jobs evenly.
            paths = self.paths[k % len(self.paths):] + self.paths[:k % len(self.paths)]
            self._procs.append(await asyncio.create_subprocess_exec(
                sys.executable, "-m", "bench.streams", str(self.port), ",".join(paths), ",".join(group),
                str(self.per_address), stdout=asyncio.subprocess.PIPE))
        for proc in self._procs:
            ready = await asyncio.wait_for(proc.stdout.readline(), 90)
            if ready.strip() != b"ready":
                raise RuntimeError(f"a stream reader did not start: {ready!r}")
        return self

    def _signal(self, signum: int) -> None:
        for proc in self._procs:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signum)

    def start_window(self) -> None:
        self._signal(signal.SIGUSR1)

    def end_window(self) -> None:
        self._signal(signal.SIGUSR2)

    async def __aexit__(self, *exc: object) -> None:
        self._signal(signal.SIGTERM)
        self.result = merge([await last_words(proc, 30) for proc in self._procs])


def merge(parts: list[dict]) -> dict:
    statuses: Counter = Counter()
    for p in parts:
        statuses.update(p.get("statuses", {}))
    return {"open": sum(p.get("open", 0) for p in parts), "statuses": dict(statuses),
            "errors": sum(p.get("errors", 0) for p in parts), "ends": sum(p.get("ends", 0) for p in parts),
            "closed_early": sum(p.get("closed_early", 0) for p in parts),
            "window_s": max((p.get("window_s", 0) for p in parts), default=0),
            "latency_ms": [x for p in parts for x in p.get("latency_ms", [])],
            "events_per_stream_s": sorted(x for p in parts for x in p.get("events_per_stream_s", []))}


if __name__ == "__main__":
    # python -m bench.streams PORT PATHS ADDRESSES PER_ADDRESS (Streams starts it)
    if len(sys.argv) != 5:
        sys.exit("usage: python -m bench.streams PORT PATH[,PATH...] ADDRESS[,ADDRESS...] PER_ADDRESS")
    reader_process(int(sys.argv[1]), sys.argv[2].split(","), sys.argv[3].split(","), int(sys.argv[4]))
