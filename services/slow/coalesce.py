"""Compute once: identical heavy requests in flight on one slow instance share one job.

    flights = Flights()
    flight, shared = flights.join(job_key("fib", {"n": 30}), lambda: asyncio.ensure_future(run()))
    body = await asyncio.shield(flight.job)    # each waiter: one waiter leaving cancels nobody else
    flight.leave()                             # a waiter that goes away; the last one cancels the job

The key is made from the task's name and its parsed arguments, never from the request: two URLs
that parse to the same arguments share a job, and `1`, `1.0` and `True` stay different (Python's
own hashing makes them equal). Keyword order does not matter. The key is a keyed BLAKE2b digest
(16 bytes, a key drawn per process; for long jobs, whose keys the store holds and the runners
match, the host's secret): bounded, whatever the arguments' size, and no argument (a pbkdf2
password) can be read or guessed from it; keys are never logged.

A shared job counts once in admission (only its first request is admitted), every waiter gets the
same answer or the same error, and the job is cancelled (dropped if waiting, stopped if running,
as for a departed client) only when its last waiter has left. Only tasks that declare
`coalesce=True` share (registry.py says why), and nothing in an answer says that it was shared:
the instance counts it (fleet_slow_coalesced_total) and logs it, for the operator.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any, Callable

_KEY = os.urandom(32)  # per process: keys only need to match within one instance


class Uncoalescable(TypeError):
    """An argument of a type the key cannot describe: the job runs alone."""


def _tagged(value: Any) -> Any:
    """The value with its type spelled out, so that equal-comparing values of different types
    (1, 1.0, True) make different keys; dict keys sorted by json.dumps."""
    if value is None:
        return ["none"]
    if isinstance(value, bool):  # before int: bool is an int
        return ["bool", value]
    if isinstance(value, int):
        return ["int", str(value)]
    if isinstance(value, float):
        return ["float", repr(value)]  # repr: the shortest string that round-trips, 1.0 not 1
    if isinstance(value, str):
        return ["str", value]
    if isinstance(value, bytes):
        return ["bytes", value.hex()]
    if isinstance(value, (list, tuple)):
        return ["list", [_tagged(v) for v in value]]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return ["dict", {k: _tagged(v) for k, v in value.items()}]
    raise Uncoalescable(type(value).__name__)


def canonical(task: str, kwargs: dict[str, Any]) -> bytes | None:
    """The task and its arguments spelled one way only, or None when an argument's type cannot be."""
    try:
        return json.dumps([task, _tagged(kwargs)], sort_keys=True, separators=(",", ":")).encode()
    except (Uncoalescable, RecursionError):
        return None


def job_key(task: str, kwargs: dict[str, Any], secret: bytes | None = None) -> str | None:
    """The job's key, or None when an argument's type cannot be keyed (that job is not shared).
    With a `secret` every process that holds it makes the same key (long jobs' keys in the store,
    matched by the runners: the host's edge token), else the key is this process's own."""
    spelled = canonical(task, kwargs)
    if spelled is None:
        return None
    key = _KEY if secret is None else hashlib.sha256(secret).digest()
    return task + ":" + hashlib.blake2b(spelled, digest_size=16, key=key).hexdigest()


@dataclass(eq=False)
class Flight:
    """One job and the requests waiting for it."""
    job: asyncio.Future
    key: str | None
    started_by: str = ""  # the request id that started the job: a request that joins it logs it
    waiters: int = 0
    stopped: bool = False  # cancelled by a drain's deadline, not by its waiters leaving

    def leave(self) -> None:
        """A waiter went away: the last one takes the job with it."""
        self.waiters -= 1
        if self.waiters <= 0 and not self.job.done():
            self.job.cancel()


class Flights:
    """The jobs in flight on this instance, by key; jobs without a key are in `all` only."""

    def __init__(self) -> None:
        self.by_key: dict[str, Flight] = {}
        self.all: set[Flight] = set()

    def join(self, key: str | None, start: Callable[[], asyncio.Future], request_id: str = "") -> tuple[Flight, bool]:
        """The flight for `key`, started with `start()` (by request `request_id`) if none is in the
        air; True if it was."""
        flight = self.by_key.get(key) if key is not None else None
        # Not a job whose waiters have all left: it was cancelled, and may only be finishing (over
        # the kill budget, pool.py); a new waiter would make its next cancel kill the worker.
        shared = flight is not None and flight.waiters > 0 and not flight.job.done()
        if not shared:
            flight = Flight(start(), key, request_id)
            self.all.add(flight)
            if key is not None:
                self.by_key[key] = flight
            flight.job.add_done_callback(lambda _job, f=flight: self._landed(f))
        flight.waiters += 1
        return flight, shared

    def _landed(self, flight: Flight) -> None:
        self.all.discard(flight)
        if flight.key is not None and self.by_key.get(flight.key) is flight:
            del self.by_key[flight.key]
