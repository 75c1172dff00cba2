"""The job resource: GET and DELETE /jobs/<id>, and its live events, GET /jobs/<id>/events (SSE).

    GET /jobs/<id>           200 the status document; Retry-After while the job is not done;
                             404 unknown id, 410 expired (its TTL passed), never a made-up state
    DELETE /jobs/<id>        200 the status document, cancelled (it was queued) or cancelling (its
                             worker is being stopped); idempotent; the record stays until its TTL
    GET /jobs/<id>/result    the succeeded job's result alone (a large one sent by the edge, from
                             its file); 409 while the job has none
    GET /jobs/<id>/events    text/event-stream: each event's `id:` is its sequence number; with
                             Last-Event-ID, exactly the events after it; a `: keep-alive` comment
                             when nothing happens for jobs.keepalive_seconds; the `end` event
                             (the final status document), then the stream closes; a reconnect
                             after the end gets 204, which stops a browser's EventSource

Any slow instance of the host answers for any of its jobs (the store is shared). The id is the
job's only key: 128 random bits, as unguessable as a session cookie, so whoever holds it may
read and cancel the job.

The status document:

    {"id": ..., "task": "report", "state": "running", "seq": 7, "args": {"seconds": 60},
     "progress": {"done": 5, "total": 600, "message": "section 5 of 600"},
     "created": "2026-12-06T16:40:01.123Z", "started": ..., "finished": null, "expires": null,
     "location": "/jobs/<id>", "events": "/jobs/<id>/events",
     "result": ... (succeeded, unless larger than jobs.inline_result_kb), "result_url": "/jobs/<id>/result",
     "result_bytes": ... (succeeded), "error": {"error": <code>, "message": ..., ...} (failed, cancelled)}
"""

from __future__ import annotations

import datetime
import json
import logging
import re

from tornado.iostream import StreamClosedError

from services.common import metrics
from services.common.web import ApiError, BaseHandler
from services.slow.job_feeds import Feed, Feeds
from services.slow.job_store import EXPIRED, SUCCEEDED, Event, Job, StoreUnavailable
from services.slow.long_jobs import LongJobs

log = logging.getLogger("fleet.jobs")

ID = r"([A-Za-z0-9_-]{22})"  # job_store.new_id's shape; anything else is no job's
POLL_AFTER = 1  # Retry-After of a job not done yet: seconds before it is worth asking again
RECONNECT_MS = 1000  # the `retry:` a stream tells a browser: how soon to reconnect after a cut


def status_document(job: Job) -> bytes:
    """The job as JSON; a result stays the bytes the worker encoded, framed in, never decoded."""
    doc = {
        "id": job.id, "task": job.task, "state": job.state, "seq": job.seq, "args": job.args,
        "progress": {"done": job.done, "total": job.total, "message": job.message} if job.done is not None else None,
        "created": _time(job.created), "started": _time(job.started), "finished": _time(job.finished),
        "expires": _time(job.expires) if job.terminal else None,
        "location": f"/jobs/{job.id}", "events": f"/jobs/{job.id}/events",
    }
    if job.error is not None:
        doc["error"] = job.error
    if job.state == SUCCEEDED:
        doc["result_url"] = f"/jobs/{job.id}/result"  # the result alone, whatever its size
        doc["result_bytes"] = job.result_bytes
    body = json.dumps(doc).encode()
    if job.result is None:  # none yet, or kept as a file (larger than jobs.inline_result_kb)
        return body
    return body[:-1] + b', "result": ' + job.result + b"}"


def sse(events: list[Event], final: Job | None) -> list[bytes]:
    """Each event as a stream sends it, its `id:` its sequence number; an end event's data is the
    job's final status document (`final`; its own data if the record has gone meanwhile)."""
    texts = []
    for event in events:
        if event.kind == "end" and final is not None:
            data = status_document(final)
        else:
            data = json.dumps(event.data).encode()
        texts.append(f"id: {event.seq}\nevent: {event.kind}\ndata: ".encode() + data + b"\n\n")
    return texts


def send_status(handler: BaseHandler, job: Job, status: int = 200) -> None:
    """Answer with the job's status document (the 202 of a submission, GET and DELETE /jobs/<id>)."""
    handler.set_status(status)
    if not job.terminal:
        handler.set_header("Retry-After", str(POLL_AFTER))
    handler.set_header("Content-Type", "application/json")
    handler.set_header("Cache-Control", "no-store")  # a running job's state is never to be cached
    handler.finish(status_document(job))


def preferences(header: str) -> dict[str, str]:
    """The preferences of a Prefer header (RFC 7240): {"respond-async": "", "wait": "10"}. Names
    in lower case; parameters after ";" are ignored, as is anything malformed (a preference is
    never an error)."""
    found: dict[str, str] = {}
    for item in header.split(","):
        name, _, value = item.split(";")[0].strip().partition("=")
        if name:
            found.setdefault(name.strip().lower(), value.strip().strip('"'))
    return found


IDEMPOTENCY_KEY = re.compile(r'^"?([\x20\x21\x23-\x7e]{1,255})"?$')  # printable, no quote inside


def idempotency_key(header: str | None) -> str | None:
    """The Idempotency-Key header's key (a Structured Field string: quoted, or bare), None if
    absent; 400 if it is not 1-255 printable characters."""
    if header is None:
        return None
    match = IDEMPOTENCY_KEY.match(header.strip())
    if match is None:
        raise ApiError(400, "bad_request", "Idempotency-Key must be 1-255 printable characters, such as a UUID")
    return match.group(1)


def wait_seconds(prefer: dict[str, str]) -> int | None:
    """Prefer's wait=N, in whole seconds, or None (absent or not a number)."""
    value = prefer.get("wait", "")
    return int(value) if value.isascii() and value.isdigit() and len(value) <= 9 else None


def _time(t: float | None) -> str | None:
    if t is None:
        return None
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


class StoreFaults:
    """A handler whose job store does not answer (StoreUnavailable, raised by any store call: a
    server store down, cut off or full) answers `503 store_unavailable` JSON with Retry-After, at
    once: every call has the store's short timeout (jobs.store_timeout). One line in the log, no
    traceback: it is the store's fault, not a bug. (A stream already under way just ends; the
    browser reconnects with Last-Event-ID.)"""

    def log_exception(self, typ, value, tb) -> None:
        if isinstance(value, StoreUnavailable):
            log.warning("%s %s: %s", self.request.method, self.request.path, value)
            return
        super().log_exception(typ, value, tb)

    def write_error(self, status_code: int, **kwargs) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, StoreUnavailable):
            self.set_status(503)
            error = ApiError(503, "store_unavailable", "the job store does not answer; retry shortly (jobs are "
                             "kept there: nothing acknowledged is lost)", headers={"Retry-After": str(POLL_AFTER)})
            kwargs["exc_info"] = (ApiError, error, None)
            status_code = 503
        super().write_error(status_code, **kwargs)


class JobBase(StoreFaults, BaseHandler):
    long_jobs: LongJobs | None

    async def job(self, job_id: str) -> Job:
        """The job's record: 404 if there is none, 410 if it expired."""
        job = await self.long_jobs.store.get(job_id) if self.long_jobs is not None else None
        if job is None:
            raise ApiError(404, "not_found", "no such job (an unknown id, or one whose record has gone)")
        if job.state == EXPIRED:
            raise ApiError(410, "expired", "this job ended and its record expired (jobs.result_ttl)")
        return job

    def write_status(self, job: Job) -> None:
        send_status(self, job)


class JobHandler(JobBase):
    route_pattern = "/jobs/{id}"

    async def get(self, job_id: str) -> None:
        self.write_status(await self.job(job_id))

    async def delete(self, job_id: str) -> None:
        await self.job(job_id)  # 404, 410
        job = await self.long_jobs.cancel(job_id)
        if job is None:  # its tombstone went meanwhile
            raise ApiError(404, "not_found", "no such job")
        if job.state == EXPIRED:
            raise ApiError(410, "expired", "this job ended and its record expired (jobs.result_ttl)")
        self.write_status(job)


class JobResultHandler(JobBase):
    """GET /jobs/<id>/result: the succeeded job's result alone. A large one (kept as a file) is sent
    by the edge itself: this answers X-Accel-Redirect to its internal location (nginx.conf.j2)."""

    route_pattern = "/jobs/{id}/result"

    async def get(self, job_id: str) -> None:
        job = await self.job(job_id)
        if job.state != SUCCEEDED:
            active = not job.terminal
            raise ApiError(409, "no_result", f"the job is {job.state}: it has no result" + (" yet" if active else ""),
                           headers={"Retry-After": str(POLL_AFTER)} if active else None)
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-store")
        store = self.long_jobs.store
        if job.result_file and hasattr(store.sync, "result_path"):  # a file beside the store, on the edge's host
            self.set_header("X-Accel-Redirect", f"/_job_results/{job.id}.json")
            self.finish()
            return
        # A server store keeps a large result too (no file the edge could reach on another host):
        # read whole, at most slow.max_result_mb.
        result = job.result if not job.result_file else await store.result(job.id)
        if result is None:  # expired between the two reads
            raise ApiError(410, "expired", "this job ended and its record expired (jobs.result_ttl)")
        self.finish(result)


class JobEventsHandler(JobBase):
    """A job's event stream: its replay (the events after Last-Event-ID) written here, then its
    job's Feed on this instance (job_feeds.py) writes the rest, the same bytes to every stream."""

    route_pattern = "/jobs/{id}/events"
    feeds: Feeds
    last = 0  # the sequence number of the last event written to this stream
    _gone = False
    _open = False  # counted in fleet_jobs_streams_open
    _feed: Feed | None = None

    async def get(self, job_id: str) -> None:
        job = await self.job(job_id)
        last = self._last_event_id()
        if job.terminal and last >= job.seq:
            self.set_status(204)  # the end was seen: a browser's EventSource stops reconnecting
            self.finish()
            return
        self.set_header("Content-Type", "text/event-stream")
        self.set_header("Cache-Control", "no-store")
        self.set_header("X-Accel-Buffering", "no")  # nginx passes each event on as it comes
        # An open stream is no request in flight: a drain does not wait for it. The stream ends
        # at the drain's start instead; the browser reconnects, with Last-Event-ID, elsewhere.
        self._leave_in_flight()
        metrics.JOBS_STREAMS.inc()
        self._open = True
        watcher = self.long_jobs.watcher
        try:
            self.write(f"retry: {RECONNECT_MS}\n\n")
            while not self._gone:
                events = await watcher.events(job_id, after=last, since=watcher.epoch)
                if events:
                    end = events[-1].kind == "end"
                    final = await self.long_jobs.store.get(job_id) if end else None
                    self.write(b"".join(sse(events, final)))
                    last = events[-1].seq
                    if end:
                        self.finish()
                        return
                # Joined without awaiting after this check: the feed sends nothing in between.
                feed = self.feeds.feed(job_id)
                if last >= feed.position and not self._gone:
                    self.flush()
                    self._feed = feed
                    await feed.join(self, last)
                    break
            if not self._finished:
                self.finish()
        except StreamClosedError:
            pass  # the client left; the job goes on

    def send(self, chunk: bytes, end: bool = False) -> None:
        """The feed's write: on its way at once, never awaited (the socket takes it, or its
        IOStream keeps it until it can)."""
        if self._finished or self._gone:
            return
        try:
            self.write(chunk)
            if end:
                self.finish()
            else:
                self.flush()
        except StreamClosedError:
            pass

    def on_finish(self) -> None:
        super().on_finish()
        self._close_stream()

    def _close_stream(self) -> None:
        if self._open:
            self._open = False
            metrics.JOBS_STREAMS.dec()
        if self._feed is not None:
            self._feed.leave(self)

    def _last_event_id(self) -> int:
        text = self.request.headers.get("Last-Event-ID", "").strip()
        if text == "":
            return 0
        if not (text.isascii() and text.isdigit() and len(text) <= 18):
            raise ApiError(400, "bad_request", "Last-Event-ID must be the id of an event of this job's stream")
        return int(text)

    def on_connection_close(self) -> None:
        super().on_connection_close()
        self._gone = True
        self._close_stream()
