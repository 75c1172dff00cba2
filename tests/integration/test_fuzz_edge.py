"""Generated hostile requests through the edge (Hypothesis), as raw bytes on a socket.

The hand-written corpus (test_hostile_input.py) holds the cases someone thought of; here Hypothesis
builds the rest: request lines with odd methods and versions, paths and query strings with
percent-encoded and raw bytes (invalid UTF-8 included), numbers at and past every task's bounds,
duplicate and conflicting headers, Content-Length / Transfer-Encoding mixes, and JSON bodies that
are huge, deeply nested, or not JSON at all. The property, for every one:

- an answer or a clean close within a few seconds, never a hang;
- never a 5xx: the request itself cannot break the fleet (the fleet is private and one request
  runs at a time, so nothing is ever shed for load);
- every error with a body is the contract's JSON, and nothing sent carries a traceback or a
  version string;
- afterwards the fleet is healthy and no instance logged a traceback.

200 requests here; 5,000 with HYPOTHESIS_PROFILE=fuzz (`make fuzz`).
"""

from __future__ import annotations

import json
import os
import re
from urllib.parse import quote_from_bytes

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from tests.support.fleet import Fleet, make_fleet
from tests.support.raw_http import CLOSE, complete, exchange

pytestmark = pytest.mark.integration

EXAMPLES = {"default": 200, "fuzz": 5000}[os.environ.get("HYPOTHESIS_PROFILE", "default")]

# Every task bounded to quick jobs, and only the shipped tasks (the test tasks fail on purpose).
FUZZ_SETTINGS = {
    "FLEET_SLOW_TASK_MODULES": "services.slow.tasks",
    "FLEET_OBSERVE_TEST_ROUTES": "false",
    "FLEET_TASKS_FIB_MAX_N": "22",
    "FLEET_TASKS_DIGEST_MAX_ROUNDS": "20000",
    "FLEET_TASKS_PBKDF2_MAX_ROUNDS": "2000",
    "FLEET_TASKS_SLEEP_MAX_SECONDS": "0.05",
    "FLEET_TASKS_PRIMES_MAX_N": "100000",
}


@pytest.fixture(scope="module")
def fuzz_fleet(tmp_path_factory: pytest.TempPathFactory):
    f = make_fleet(tmp_path_factory.mktemp("fuzz"), **FUZZ_SETTINGS)
    f.command("up")
    yield f
    f.command("stop", check=False)


# --- the request's parts ---------------------------------------------------------------------------

no_line_breaks = st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
numbers = st.one_of(
    st.integers(min_value=-10**25, max_value=10**25).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["0", "1", "22", "23", "1000", "2000", "2001", "20000", "20001", "100000", "100001",
                     "0.05", "0.051", "9" * 13, "0" * 13, "1e3", "nan", "inf", "-0", "%2B5", "%D9%A3", " 1"]),
).map(str.encode)
arguments = st.one_of(numbers, no_line_breaks.map(quote_from_bytes).map(str.encode), no_line_breaks)
routes = st.sampled_from([b"/fast", b"/echo", b"/healthz", b"/metrics", b"/slow/fib/", b"/slow/digest/",
                          b"/slow/pbkdf2", b"/slow/primes/", b"/slow/sleep/", b"/slow/", b"/slow/nope/",
                          b"/", b"/..", b"/_edge_error/"])
query = st.lists(st.tuples(st.sampled_from([b"data", b"password", b"rounds", b"n", b""]) | no_line_breaks,
                           arguments), max_size=3).map(lambda kv: b"&".join(k + b"=" + v for k, v in kv))
targets = st.builds(lambda route, arg, q: route + arg + (b"?" + q if q else b""), routes, arguments | st.just(b""),
                    query)
methods = st.sampled_from([b"GET", b"GET", b"POST", b"POST", b"HEAD", b"PUT", b"DELETE", b"OPTIONS", b"get",
                           b"G@T", b"CONNECT"]) | st.from_regex(rb"\A[A-Z]{1,10}\Z")
versions = st.sampled_from([b" HTTP/1.1", b" HTTP/1.1", b" HTTP/1.0", b" HTTP/2.0", b" HTTP/1.1x", b""])

json_text = st.text(st.characters(codec=None, max_codepoint=0x10FFFF), max_size=30)
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(min_value=-10**30, max_value=10**30),
              st.floats(allow_nan=False), json_text, numbers.map(bytes.decode)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(json_text | st.sampled_from(
        ["password", "salt", "rounds", "data"]), inner, max_size=4)), max_leaves=10)
bodies = st.one_of(
    st.just(b""),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.dictionaries(st.sampled_from(["password", "salt", "rounds"]), json_values, max_size=3).map(
        lambda v: json.dumps(v).encode()),
    st.integers(min_value=1, max_value=20000).map(lambda depth: b"[" * depth + b"]" * depth),
    st.binary(max_size=200),
)
extra_headers = st.lists(st.one_of(
    st.sampled_from([b"Content-Type: application/json", b"Content-Type: text/plain", b"Content-Type: ",
                     b"Transfer-Encoding: chunked", b"Transfer-Encoding: gzip", b"Transfer-Encoding: chunked, chunked",
                     b"Transfer-Encoding: identity", b"Content-Length: 0", b"Content-Length: -1",
                     b"Content-Length: 99999999999999999999", b"Content-Length: 1, 2", b"Expect: 100-continue",
                     b"Host: other", b"X-Forwarded-For: 10.0.0.1", b"X-Real-IP: ::1", b"Range: bytes=0-1",
                     b"If-None-Match: *", b"Connection: keep-alive", b"Upgrade: websocket"]),
    st.builds(lambda n, v: b"X-Request-ID: " + n + v, st.just(b""), no_line_breaks),
    st.builds(lambda n, v: n + b": " + v, st.from_regex(rb"\A[A-Za-z-]{1,20}\Z"), no_line_breaks),
), max_size=4)


@st.composite
def requests(draw) -> bytes:
    line = draw(methods) + b" " + draw(targets) + draw(versions)
    body = draw(bodies)
    headers = [b"Host: fleet", b"Connection: close"] + draw(extra_headers)
    if body and draw(st.booleans()):  # a body usually says how long it is, sometimes wrongly
        headers.append(b"Content-Length: %d" % (len(body) + draw(st.sampled_from([0, 0, 0, -1, 1, 1000]))))
    return line + b"\r\n" + b"".join(h + b"\r\n" for h in headers) + b"\r\n" + body


# --- the property -----------------------------------------------------------------------------------

VERSION_STRING = re.compile(rb"nginx/\d|TornadoServer|Python/\d|Traceback")


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                        HealthCheck.too_slow])
@given(raw=requests())
def test_a_generated_request_gets_a_contract_answer_or_a_clean_close(fuzz_fleet: Fleet, raw: bytes):
    outcome, data = exchange(fuzz_fleet.edge_port, raw, wait=10)
    assert not VERSION_STRING.search(data), data[:500]
    if outcome in (CLOSE, "0.9"):
        return
    assert outcome < 500, f"{outcome} for {raw[:300]!r}:\n{data[:500]!r}"
    if outcome >= 400 and not raw.startswith(b"HEAD "):
        parsed = json.loads(complete(data, head_only=False))  # an error always says what went wrong, in the contract's JSON
        assert isinstance(parsed, dict) and {"error", "message", "request_id"} <= set(parsed), parsed


def test_the_fleet_is_healthy_after_the_fuzzing_and_logged_no_traceback(fuzz_fleet: Fleet):
    assert fuzz_fleet.get("/healthz").status == 200
    for port in fuzz_fleet.fast_ports + fuzz_fleet.slow_ports:
        assert fuzz_fleet.get("/healthz", port=port).json()["status"] == "ok"
    assert fuzz_fleet.get("/slow/fib/20").json()["result"] == 6765
    logs = {p.name: p.read_bytes() for p in (fuzz_fleet.run_dir / "logs").glob("*.log")}
    assert logs, "no logs found"
    for name, text in logs.items():
        assert b"Traceback" not in text, f"{name}:\n{text[-3000:].decode(errors='replace')}"
