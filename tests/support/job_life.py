"""A long job's whole life through the edge, as test_jobs.py drives it on each store (SQLite, and
Redis in test_job_store_redis.py): 202 and Location, the live event stream, a reconnect with
Last-Event-ID that replays exactly what it missed, the end, 204 after it, the result.

    location = whole_life(fleet, submit)      # submit(path) -> Response, as test_jobs.py's jobs fixture
"""

from __future__ import annotations

from typing import Callable

from tests.support.fleet import Fleet, Response
from tests.support.sse import EventStream


def whole_life(fleet: Fleet, submit: Callable[[str], Response]) -> str:
    """Drive a 3 s report job from its submission to its result; its location."""
    submitted = submit("/slow/report/3")
    assert submitted.status == 202, submitted.body
    body = submitted.json()
    location = submitted.headers["location"]
    assert location == f"/jobs/{body['id']}" and len(body["id"]) == 22
    assert submitted.headers["preference-applied"] == "respond-async"
    assert body["state"] in ("queued", "running") and body["args"] == {"seconds": 3}

    with EventStream(fleet.edge_port, f"{location}/events") as stream:
        assert stream.status == 200 and stream.headers["content-type"] == "text/event-stream"
        seen = []
        for event in stream.events():
            seen.append(event)
            if event.kind == "progress" and len(seen) >= 4:
                break
        # Each event came through the edge while the job still ran: nothing is buffered there.
        assert fleet.get(location).json()["state"] == "running"
    assert [e.id for e in seen] == list(range(1, len(seen) + 1))
    assert seen[0].json() == {"state": "queued"} and seen[1].json() == {"state": "running"}
    assert seen[-1].json()["total"] == 30

    with EventStream(fleet.edge_port, f"{location}/events", last_event_id=str(seen[-1].id)) as stream:
        rest = list(stream.events())
    assert [e.id for e in rest] == list(range(seen[-1].id + 1, seen[-1].id + 1 + len(rest)))
    assert [e.kind for e in rest[:-1]] == ["progress"] * (len(rest) - 1) and rest[-1].kind == "end"
    final = rest[-1].json()
    assert final["state"] == "succeeded" and final["result"]["sections"] == 30
    assert final["progress"] == {"done": 30, "total": 30, "message": "section 30 of 30"}

    after_the_end = fleet.get(f"{location}/events", headers={"Last-Event-ID": str(rest[-1].id)})
    assert after_the_end.status == 204  # a browser's EventSource stops here
    done = fleet.get(location)
    assert done.status == 200 and done.json()["result"]["sections"] == 30 and "retry-after" not in done.headers
    return location
