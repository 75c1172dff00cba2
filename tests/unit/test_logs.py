"""Bounded logs: the failed-request line limit of the instances, and the rotation of nginx's logs."""

from __future__ import annotations

import json
import logging

from deploy import log_rotation
from services.common.logs import FailedRequestLines


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def record(message: str = "GET /slow/fib/abc %d", *args) -> logging.LogRecord:
    return logging.LogRecord("fleet.access", logging.WARNING, __file__, 1, message, args or (400,), None)


def test_failed_request_lines_pass_up_to_the_burst_then_the_rate_and_the_next_says_how_many_were_left_out():
    clock = Clock()
    lines = FailedRequestLines(rate=5, clock=clock)
    passed = sum(lines.filter(record()) for _ in range(200))  # a flood in one instant
    assert passed == 50  # the burst: 10 x rate
    clock.now += 1.0
    passed = [r for r in (record() for _ in range(20)) if lines.filter(r)]
    assert len(passed) == 5  # then the rate
    first = passed[0]
    assert first.fields["suppressed"] == 150
    assert first.getMessage() == "GET /slow/fib/abc 400 (150 similar lines left out before this one)"
    assert "suppressed" not in getattr(passed[1], "fields", {})


def test_a_quiet_instance_logs_every_failed_request():
    clock = Clock()
    lines = FailedRequestLines(rate=5, clock=clock)
    for _ in range(100):
        clock.now += 0.25  # 4 a second, under the rate
        assert lines.filter(record())
    assert lines.suppressed == 0


def write(path, size: int) -> None:
    path.write_bytes(b"x" * size)


def test_a_log_over_its_size_is_shifted_along_and_the_oldest_dropped(tmp_path):
    log = tmp_path / "nginx-access.log"
    for generation in range(4):
        write(log, 2000 + generation)
        assert log_rotation.rotate_if_over(log, max_bytes=1000, backups=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nginx-access.log", "nginx-access.log.1", "nginx-access.log.2"]
    assert (tmp_path / "nginx-access.log.1").stat().st_size == 2003  # the newest
    assert (tmp_path / "nginx-access.log.2").stat().st_size == 2002
    assert log.stat().st_size == 0  # emptied in place: nginx's O_APPEND descriptor writes on at its start


def test_a_writer_that_appends_keeps_writing_into_the_emptied_file(tmp_path):
    log = tmp_path / "nginx-error.log"
    with open(log, "ab", buffering=0) as nginx:  # as nginx holds it
        nginx.write(b"x" * 2000)
        assert log_rotation.rotate_if_over(log, max_bytes=1000, backups=1)
        nginx.write(b"after\n")
    assert log.read_bytes() == b"after\n"  # at the start: no hole where the old lines were
    assert (tmp_path / "nginx-error.log.1").read_bytes() == b"x" * 2000


def test_a_log_at_or_under_its_size_is_left_alone(tmp_path):
    log = tmp_path / "nginx-access.log"
    write(log, 999)
    assert not log_rotation.rotate_if_over(log, max_bytes=1000, backups=2)  # under the size: left alone
    assert not log_rotation.rotate_if_over(tmp_path / "missing.log", max_bytes=1000, backups=2)


def test_rotation_reads_its_bounds_from_the_snapshot_at_each_check(tmp_path):
    snapshot = tmp_path / "settings.json"
    logs = tmp_path / "logs"
    logs.mkdir()
    write(logs / "nginx-access.log", 3 << 20)
    write(logs / "nginx-error.log", 10)
    snapshot.write_text(json.dumps({"values": {"observe.log_max_mb": 5, "observe.log_backups": 1}}))
    assert log_rotation.rotate(logs, snapshot) == []
    snapshot.write_text(json.dumps({"values": {"observe.log_max_mb": 2, "observe.log_backups": 1}}))
    assert log_rotation.rotate(logs, snapshot) == ["nginx-access.log"]
    snapshot.write_text("{")  # being replaced: no rotation this time, no error
    assert log_rotation.rotate(logs, snapshot) == []
