"""A job's event streams on one instance, fed by one reader: its events read once, encoded once,
and the same bytes written to every stream following the job here (job_routes.py's
JobEventsHandler joins a stream to its job's Feed).

    feeds = Feeds(watcher, store, keepalive=15, encode=sse)
    feed = feeds.feed(job_id)                 # the job's, made at its first stream
    done = feed.join(stream, last_seq)        # from now on the feed writes to `stream`

Why: with a coroutine per stream, each event woke every stream, and each waited, read, encoded,
wrote and flushed on its own: 1,000 streams of two jobs reporting ten times a second made the
instance's event loop late by 30 ms at p99 (bench/jobs.py), mostly in the waits' own machinery
(wait_for, shield, a future per stream per event). A Feed is one coroutine per job: it waits for
the job's next change, reads the events after the last one it sent, encodes them, and writes the
bytes to each stream without waiting for the write (the stream's IOStream sends what the socket
takes and keeps the rest), pausing PAUSE every SLICE streams: a job's event reaching hundreds of
streams at once kept the loop, nginx (which relays each write) and the readers busy together, and
the fast instances waited for a core; spread out, the instance's loop lag p99 went from 9-23 ms to
2-4 ms and the fast path's p99 beside 1,000 streams from 11-24 ms to 3-5 ms (bench/jobs.py). Slices
of 10 rather than 50: nginx relays each write, and a fast request that arrives with a slice waits
behind its relays; with 300 streams beside the flood, the isolation check's 10 s phases passed 6
of 6 runs with slices of 10 and 2 of 3 interleaved with them at 50 (5 of 9 before). It costs the
last stream of 500 about 50 ms, well inside the 250 ms an event may take. Events are not held back
to go out together: a feed that waited up to 170 ms to write two at once gave the fast path beside
300 streams a worse p99, not a better one (2.6 ms against 2.0, a probe at 80/s, 6 rounds side by
side): its bursts were rarer but as large.

A stream joins with the sequence number of the last event it has written itself (its replay of
what it missed, job_routes.py): `join` is only valid once that is at least the feed's `position`
(the last event the feed has sent), which the stream checks and joins without awaiting in
between; events a stream already has (it joined with a newer replay) are never sent to it again.
A client that stops reading is cut by nginx's send_timeout, which closes the stream here.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable, Protocol

from services.slow.job_store import EXPIRED, Event, Job

log = logging.getLogger("fleet.jobs")

SLICE = 10  # streams written to at once (a fraction of a millisecond here) ...
PAUSE = 0.001  # ... before a pause, in seconds, in which the loop, nginx and the fast instances run
KEEPALIVE = b": keep-alive\n\n"


class Stream(Protocol):
    """What a feed needs of a stream (JobEventsHandler): where it is, and how to write to it."""

    last: int  # the sequence number of the last event written to it
    settings: dict  # the app's: "draining"

    def send(self, chunk: bytes, end: bool = False) -> None: ...  # write now; `end`: finish the stream too


# The events (and, with an end event, the job's final record) -> the text of each, as a stream sends it.
Encoder = Callable[[list[Event], Job | None], list[bytes]]


class Feed:
    def __init__(self, feeds: "Feeds", job_id: str):
        self.feeds, self.job_id = feeds, job_id
        self.streams: dict[Stream, asyncio.Future] = {}  # each stream, and what its handler awaits: its end
        self.position = -1  # the last event sent to the streams (-1: none yet: the first stream's replay sets it)
        self._task: asyncio.Task | None = None

    def join(self, stream: Stream, last: int) -> asyncio.Future:
        """From now on the feed writes the job's events after `last` to `stream`; the future is done
        when the stream has ended (the job's end, its record gone, a drain) or has left."""
        if self.position < 0:
            self.position = last
        assert last >= self.position, "a stream joins once it has replayed what the feed sent"
        stream.last = last
        done = self.streams[stream] = asyncio.get_running_loop().create_future()
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())
        return done

    def leave(self, stream: Stream) -> None:
        done = self.streams.pop(stream, None)
        if done is not None and not done.done():
            done.set_result(None)
        if not self.streams:
            self._close()

    def _close(self) -> None:
        if self.feeds.feeds.get(self.job_id) is self:
            del self.feeds.feeds[self.job_id]
        if self._task is not None and self._task is not asyncio.current_task():
            self._task.cancel()

    async def _run(self) -> None:
        feeds, watcher = self.feeds, self.feeds.watcher
        try:
            await self._follow(feeds, watcher)
        except Exception:  # a broken store: the streams end, and their clients reconnect (Last-Event-ID)
            log.exception("could not follow job %s for its event streams", self.job_id)
        finally:
            self._end_all()

    async def _follow(self, feeds: "Feeds", watcher) -> None:
        while self.streams:
            # Taken before the read: nothing written meanwhile is missed.
            waiter, since = watcher.waiter(self.job_id), watcher.epoch
            events = await watcher.events(self.job_id, after=self.position, since=since)
            if events:
                end = events[-1].kind == "end"
                final = await feeds.store.get(self.job_id) if end else None
                texts = feeds.encode(events, final)
                sent, self.position = self.position, events[-1].seq
                await self._write(events, texts, sent, end)
                if end:
                    return
            if self._draining():
                return  # the streams end: their browsers reconnect, with Last-Event-ID, to another instance
            if not await watcher.wait(self.job_id, waiter, feeds.keepalive):
                job = await feeds.store.get(self.job_id)
                if job is None or job.state == EXPIRED:
                    return  # its record went while it was followed
                await self._write([], [KEEPALIVE], self.position, False)

    async def _write(self, events: list[Event], texts: list[bytes], sent: int, end: bool) -> None:
        """The same bytes to every stream that had everything up to `sent`; a stream that joined with
        a newer replay gets only the events after its own last one."""
        whole = b"".join(texts)
        newest = events[-1].seq if events else sent
        for k, stream in enumerate(list(self.streams)):
            if stream not in self.streams:
                continue  # it left while the loop ran something else
            if stream.last == sent:
                chunk = whole
            else:
                chunk = b"".join(text for event, text in zip(events, texts) if event.seq > stream.last)
            stream.last = max(stream.last, newest)
            if chunk or end:
                stream.send(chunk, end)
            if end:
                self.leave(stream)
            if k % SLICE == SLICE - 1:
                await asyncio.sleep(PAUSE)

    def _draining(self) -> bool:
        return bool(self.streams) and bool(next(iter(self.streams)).settings.get("draining"))

    def _end_all(self) -> None:
        for stream in list(self.streams):
            stream.send(b"", end=True)
            self.leave(stream)
        self._close()


class Feeds:
    """The feeds of this instance, by job."""

    def __init__(self, watcher, store, keepalive: float, encode: Encoder):
        self.watcher, self.store, self.keepalive, self.encode = watcher, store, keepalive, encode
        self.feeds: dict[str, Feed] = {}

    def feed(self, job_id: str) -> Feed:
        feed = self.feeds.get(job_id)
        if feed is None:
            feed = self.feeds[job_id] = Feed(self, job_id)
        return feed
