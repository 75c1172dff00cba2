"""A request's calls, structured: each required or optional, none outliving the request.

    ctx = Context(Deadline.start(300, request.headers.get(HEADER)), request_id)
    try:
        fan = FanOut(ctx)
        fan.required("user", users.get("/users/42", ctx))
        fan.optional("posts", posts.get("/posts/42", ctx))
        parts = await fan.gather()      # waits until all are in, or the deadline
    finally:
        await ctx.close()               # cancels and awaits whatever is left (a client that left)

`gather` returns the parts that came in and, in `parts.missing`, why each optional one did not
(its outcome: timeout, error, refused, ...). A required part that fails ends the request at once:
its siblings are cancelled, and the route answers the contract's JSON error (RequiredFailed.api_error:
504 for a deadline, 503 for an upstream cut off by its breaker, 502 for an error). At the deadline
whatever is still out is cancelled: the answer goes out then, complete or partial, never later.
`asyncio.gather` would leave the others running after a failure, and a TaskGroup cancels every
sibling on any failure, optional ones too: hence this small scope.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, Awaitable

from services.common.web import ApiError
from services.fanout.client import CallFailed, SubCall
from services.fanout.deadline import Deadline


class Context:
    """What one request's calls share: its deadline, its id, the record of each call, its tasks."""

    def __init__(self, deadline: Deadline, request_id: str) -> None:
        self.deadline = deadline
        self.request_id = request_id
        self.calls: list[SubCall] = []
        self.tasks: set[asyncio.Task] = set()

    def spawn(self, work: Awaitable) -> asyncio.Task:
        """A task of this request: cancelled by close() if still running."""
        task = asyncio.ensure_future(work)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    def cancel(self) -> None:
        for task in list(self.tasks):
            task.cancel()

    async def close(self) -> None:
        """Cancel what is left and wait until it has ended: nothing of the request outlives it."""
        while self.tasks:
            left = list(self.tasks)
            for task in left:
                task.cancel()
            await asyncio.gather(*left, return_exceptions=True)


class RequiredFailed(Exception):
    """A required part failed: the request's answer is an error."""

    def __init__(self, part: str, failure: CallFailed | None) -> None:
        super().__init__(part)
        self.part, self.failure = part, failure

    def api_error(self) -> ApiError:
        if self.failure is None:
            return ApiError(504, "deadline_exceeded", f"{self.part}: no answer before the deadline", part=self.part)
        outcome, upstream = self.failure.outcome, self.failure.upstream
        if outcome in ("timeout", "skipped", "cancelled"):
            return ApiError(504, "deadline_exceeded", f"{self.part}: no answer from {upstream} before the deadline",
                            upstream=upstream)
        if outcome == "refused":
            return ApiError(503, "upstream_unavailable", f"{self.part}: {upstream} is failing and was not called "
                            "(its circuit breaker is open); retry later", headers={"Retry-After": "1"}, upstream=upstream)
        return ApiError(502, "bad_gateway", f"{self.part}: {upstream} failed ({self.failure.message})", upstream=upstream)


@dataclass
class Parts:
    values: dict[str, Any] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)  # optional part -> the outcome it had

    @property
    def partial(self) -> bool:
        return bool(self.missing)


class FanOut:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.parts: dict[asyncio.Task, tuple[str, bool]] = {}

    def required(self, name: str, work: Awaitable) -> None:
        self.parts[self.ctx.spawn(work)] = (name, True)

    def optional(self, name: str, work: Awaitable) -> None:
        self.parts[self.ctx.spawn(work)] = (name, False)

    async def gather(self) -> Parts:
        parts = Parts()
        pending = set(self.parts)
        try:
            while pending:
                left = self.ctx.deadline.remaining()
                if left <= 0:
                    break
                done, pending = await asyncio.wait(pending, timeout=left, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    name, required = self.parts[task]
                    error = None if task.cancelled() else task.exception()
                    if task.cancelled() or error is not None:
                        failure = error if isinstance(error, CallFailed) else None
                        if required:
                            raise RequiredFailed(name, failure)
                        parts.missing[name] = failure.outcome if failure else "cancelled"
                        if error is not None and failure is None:
                            raise error  # a bug in the route's own code: its 500, logged with the traceback
                    else:
                        parts.values[name] = task.result()
            for task in pending:  # the deadline: whatever is still out
                name, required = self.parts[task]
                if required:
                    raise RequiredFailed(name, None)
                parts.missing[name] = "timeout"
            return parts
        finally:
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
