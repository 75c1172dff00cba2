"""The contract's error answer, checked on a fleet's response: a JSON body with error, message and
the request's id (the one in X-Request-ID), and the status that says what happened.

The in-process apps' tests check the same through tests/support/app_case.py.
"""

from __future__ import annotations

from tests.support.fleet import Response


def assert_contract_error(response: Response, status: int, error: str | None = None) -> dict:
    """The body of `response`, once it is the contract's JSON error with `status` (and `error`)."""
    assert response.status == status, response.body
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) >= {"error", "message", "request_id"}
    assert body["request_id"] == response.headers["x-request-id"]
    if error:
        assert body["error"] == error
    return body
