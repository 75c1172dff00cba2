"""A request's deadline: how long its answer may take, shortened by its caller, passed on to its calls.

The route's own budget (fanout.<route>_deadline_ms, below the edge's timeout) is the most it gets;
a caller that has less time left says so with `X-Request-Deadline-Ms` (the milliseconds it still
has, as gRPC's grpc-timeout: a duration, never a wall-clock time, so no two hosts' clocks need
to agree). Every outgoing call is given what remains and forwards it the same way.

    >>> d = Deadline.start(300, "120", clock=lambda: 10.0)
    >>> d.remaining_ms(clock=lambda: 10.05)
    70
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

HEADER = "X-Request-Deadline-Ms"
MAX_DIGITS = 9  # 11 days in ms: anything longer is no shortening, and no int() of a huge string


class BadDeadline(ValueError):
    """The caller's X-Request-Deadline-Ms is not a whole number of milliseconds."""


@dataclass(frozen=True)
class Deadline:
    at: float  # the monotonic clock's time by which the answer must be out
    budget_ms: int  # what the request was given: the route's budget, or its caller's if shorter

    @classmethod
    def start(cls, route_budget_ms: int, incoming: str | None, clock: Callable[[], float] = time.monotonic) -> "Deadline":
        budget = route_budget_ms
        if incoming is not None:
            text = incoming.strip()
            if not text.isdigit() or not text.isascii():
                raise BadDeadline(f"{HEADER} must be a whole number of milliseconds, such as 250")
            if len(text) <= MAX_DIGITS:
                budget = min(budget, int(text))
        return cls(clock() + budget / 1000, budget)

    def remaining(self, clock: Callable[[], float] = time.monotonic) -> float:
        """Seconds left, never below 0."""
        return max(0.0, self.at - clock())

    def remaining_ms(self, clock: Callable[[], float] = time.monotonic) -> int:
        return int(self.remaining(clock) * 1000)

    def header(self) -> dict[str, str]:
        """The header that passes the time left on to a call."""
        return {HEADER: str(self.remaining_ms())}
