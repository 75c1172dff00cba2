"""A job's event stream (Server-Sent Events) read through the edge as a browser's EventSource
reads it: event by event as they arrive, with the comments between them, and dropped at will.

    with EventStream(fleet.edge_port, f"/jobs/{job_id}/events", last_event_id="3") as stream:
        assert stream.status == 200
        event = stream.next()          # Event(id=4, kind="progress", data={...}), or a comment
"""

from __future__ import annotations

import http.client
import json
from dataclasses import dataclass


@dataclass
class Event:
    id: int | None
    kind: str  # the `event:` field; "comment" for a ": ..." line
    data: str

    def json(self) -> dict:
        return json.loads(self.data)


class EventStream:
    def __init__(self, port: int, path: str, last_event_id: str | None = None, timeout: float = 20):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        headers = {"Accept": "text/event-stream"}
        if last_event_id is not None:
            headers["Last-Event-ID"] = last_event_id
        self.conn.request("GET", path, headers=headers)
        self.response = self.conn.getresponse()
        self.status = self.response.status
        self.headers = {k.lower(): v for k, v in self.response.getheaders()}

    def next(self) -> Event | None:
        """The next event or comment as it arrives; None when the stream has ended."""
        fields: dict[str, str] = {}
        while True:
            line = self.response.readline()
            if not line:
                return None
            text = line.decode().rstrip("\n")
            if text.startswith(":"):
                return Event(None, "comment", text[1:].strip())
            if text == "":
                if "data" in fields or "event" in fields:
                    return Event(int(fields["id"]) if "id" in fields else None, fields.get("event", "message"),
                                 fields.get("data", ""))
                continue  # the end of a field-less block (retry:)
            name, _, value = text.partition(":")
            fields[name] = value[1:] if value.startswith(" ") else value

    def events(self):
        """Every event (not the comments) until the stream ends."""
        while (event := self.next()) is not None:
            if event.kind != "comment":
                yield event

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> "EventStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
