"""The chaos load's client and its tally: what counts as lost, and the one race counted apart."""

from __future__ import annotations

import socket
import struct
import threading

from drills.loadgen import Outcome, Route, Tally, _KeptAliveClient

POST = Route("fast POST /echo", "fast", "POST", "/echo", rate=1, clients=1, body=b"{}")
GET = Route("fast GET /fast", "fast", "GET", "/fast", rate=1, clients=1)
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\nok"


def read_request(conn: socket.socket) -> bytes:
    """One whole request: its head, then the Content-Length bytes of its body."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = sum(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")[1:]
                 if line.lower().startswith(b"content-length:"))
    while len(body) < length:
        chunk = conn.recv(65536)
        if not chunk:
            break
        body += chunk
    return data


class ClosesOnSecondRequest:
    """A kept-alive server that answers the first request, then resets the connection once the
    second one has arrived, unanswered: what an nginx worker does when it closes an idle connection
    in the instant a request is on its way. A new connection is answered normally."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.connections = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            first = self.connections == 1
            read_request(conn)  # all of it: a request left half read would look like the next one
            conn.sendall(OK)
            if first:
                # The whole second request, so the client has written all of it (http.client sends
                # a POST's head and body apart: a reset between them is a request never written,
                # which the client rightly sends again); then a reset (linger 0), no answer.
                read_request(conn)
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            else:
                conn.recv(65536)
            conn.close()

    def close(self) -> None:
        self.listener.close()


def second_request_after_a_reset(request) -> tuple[Outcome, int]:
    """`request` sent twice on one kept-alive connection, the second reset by the server: the second's
    outcome, and how many connections the server accepted."""
    server = ClosesOnSecondRequest()
    client = _KeptAliveClient("127.0.0.1", server.port, timeout=5)
    try:
        assert client.send(request).ok
        return client.send(request), server.connections
    finally:
        client.close()
        server.close()


def test_a_post_reset_on_a_reused_connection_is_marked_as_the_idle_race_and_not_resent():
    outcome, connections = second_request_after_a_reset(POST)
    assert outcome.status is None and outcome.idle_race and not outcome.retried
    assert connections == 1  # a written POST is never sent again


def test_a_get_reset_on_a_reused_connection_is_sent_again_on_a_new_one():
    outcome, connections = second_request_after_a_reset(GET)
    assert outcome.ok and outcome.retried and not outcome.idle_race
    assert connections == 2


def _race(started: float) -> Outcome:
    return Outcome(POST, started, None, "ConnectionResetError", idle_race=True)


def test_an_idle_race_counts_apart_only_within_a_reloads_window():
    reloads = [(10.0, 10.4)]
    inside, late, before = _race(10.2), _race(11.6), _race(9.9)
    t = Tally.of([inside, late, before], reloads=reloads)
    assert (t.reload_races, t.lost) == (1, 2)
    assert Tally.of([inside]).lost == 1  # with no reload, the same outcome is lost


def test_other_failures_in_a_reloads_window_still_count_as_lost_or_failed():
    reloads = [(10.0, 10.4)]
    timeout = Outcome(POST, 10.1, None, "TimeoutError")  # no race: the request was not answered
    error = Outcome(GET, 10.1, 502, "bad_gateway", json_error=True)
    t = Tally.of([timeout, error], reloads=reloads)
    assert (t.lost, t.failed, t.reload_races) == (1, 1, 0)


PROFILE = Route("fast GET /profile", "fast", "GET", "/profile/7", rate=1, clients=1, partial_is_error=True)


def test_a_partial_fan_out_answer_is_an_error_named_by_what_it_missed():
    from drills.loadgen import _outcome

    whole = _outcome(PROFILE, 0.0, 200, b'{"user": {}, "partial": false, "missing": {}}', retried=False)
    partial = _outcome(PROFILE, 0.0, 200, b'{"user": {}, "partial": true, "missing": {"recs": "timeout"}}',
                       retried=False)
    assert whole.ok and not partial.ok
    assert partial.json_error and partial.error == "partial: recs timeout"
    assert Tally.of([whole, partial]).failed == 1  # no fault may reach it: a failure
    assert Tally.of([partial], may_hit=frozenset({"fast"})).hit == 1
    # A route that is not a fan-out one is judged by its status alone.
    assert _outcome(GET, 0.0, 200, b'{"partial": true}', retried=False).ok
