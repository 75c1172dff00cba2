"""An app of the fleet in process, served on an unused port and asked through real HTTP, with the
contract's error answer checked on what it says (tornado's AsyncHTTPTestCase underneath).

The fleet's own responses are checked the same way by tests/support/contract.py.
"""

from __future__ import annotations

import json

from tornado.testing import AsyncHTTPTestCase


class ContractTestCase(AsyncHTTPTestCase):
    def request(self, path: str, method: str = "GET", body: bytes | str | None = None, **headers):
        if body is None and method in ("POST", "PUT"):
            body = b""
        return self.fetch(path, method=method, body=body, headers=headers, raise_error=False)

    async def health(self) -> dict:
        """The app's /healthz body, fetched on the test's loop (inside a gen_test)."""
        return json.loads((await self.http_client.fetch(self.get_url("/healthz"), raise_error=False)).body)

    def assert_json_error(self, response, status: int, error: str) -> dict:
        assert response.code == status, (response.code, response.body)
        assert response.headers["Content-Type"].startswith("application/json")
        body = json.loads(response.body)
        assert body["error"] == error
        assert isinstance(body["message"], str) and body["message"]
        assert body["request_id"] == response.headers["X-Request-ID"]
        return body
