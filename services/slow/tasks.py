"""The shipped heavy tasks. Each is a plain function plus one registration (see registry.py).

- fib: naive recursive Fibonacci, pure-Python CPU work (the source documents' example).
- pbkdf2: password hashing with a bounded iteration count, the realistic CPU-heavy request.
- sleep: a legacy blocking client held in each worker (per-worker setup), a worker busy waiting.
- digest: iterated SHA-256 of client data, CPU work whose arguments rarely repeat (floods use it).
- primes: how many primes are below n, a deterministic report whose answer the edge caches.
- report: a long job (seconds to minutes by its argument) that reports its progress as it goes.
"""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from typing import Any, Mapping

from services.slow import progress
from services.slow.registry import BadArgument, bounded_float, bounded_int, task


# fib ---------------------------------------------------------------------------------------------

def parse_fib(path: str, params: Mapping[str, str], config: Mapping[str, Any]) -> dict:
    if path == "":
        raise BadArgument("missing n: use /slow/fib/<n>")
    return {"n": bounded_int(path, "n", 0, config["max_n"])}


# coalesce: fib(n) is fib(n) for anyone, and n is nobody's secret: identical requests in flight
# share one job.
@task("fib", parse=parse_fib, echo=("n",), coalesce=True)
def fib(n: int) -> int:
    return n if n < 2 else fib(n - 1) + fib(n - 2)


# pbkdf2 ------------------------------------------------------------------------------------------

def parse_pbkdf2(path: str, params: Mapping[str, Any], config: Mapping[str, Any]) -> dict:
    password, salt = params.get("password"), params.get("salt", "")
    if not isinstance(password, str) or not 1 <= len(password) <= 1024:
        raise BadArgument('"password" must be a string of 1-1024 characters')
    if not isinstance(salt, str) or len(salt) > 1024:
        raise BadArgument('"salt" must be a string of at most 1024 characters')
    try:
        password.encode(), salt.encode()
    except UnicodeEncodeError:  # JSON allows lone surrogates ("\ud800"); UTF-8 does not
        raise BadArgument('"password" and "salt" must be valid Unicode text') from None
    rounds = bounded_int(params.get("rounds", 100_000), "rounds", 1000, config["max_rounds"])
    return {"password": password, "salt": salt, "rounds": rounds}


# Not coalesced (the default): a job shared with another client's identical request answers sooner,
# which would tell a client that someone is hashing that exact password right now.
@task("pbkdf2", parse=parse_pbkdf2, methods=("POST",), echo=("rounds",))
def pbkdf2(password: str, salt: str, rounds: int) -> str:
    """PBKDF2-HMAC-SHA256 of a password, hex; POST a JSON body so secrets stay out of URLs and logs."""
    return hashlib.pbkdf2_hmac("sha256", password.encode(), salt.encode(), rounds).hex()


# digest: CPU work on the client's own data ---------------------------------------------------------

def parse_digest(path: str, params: Mapping[str, str], config: Mapping[str, Any]) -> dict:
    if path == "":
        raise BadArgument("missing rounds: use /slow/digest/<rounds>?data=<text>")
    data = params.get("data", "")
    if not isinstance(data, str) or len(data) > 1024:
        raise BadArgument('"data" must be text of at most 1024 characters')
    return {"rounds": bounded_int(path, "rounds", 1, config["max_rounds"]), "data": data}


# Not coalesced (the default): the data is the client's own, and its arguments rarely repeat, so
# sharing would buy nothing and could tell one client of another's data by its timing.
@task("digest", parse=parse_digest, echo=("rounds",))
def digest(rounds: int, data: str) -> str:
    """SHA-256 applied `rounds` times to the data, hex: about 0.3 s per million rounds here."""
    value = data.encode("utf-8", "surrogatepass")
    for _ in range(rounds):
        value = hashlib.sha256(value).digest()
    return value.hex()


# primes: a deterministic report, cached at the edge -------------------------------------------------

def parse_primes(path: str, params: Mapping[str, str], config: Mapping[str, Any]) -> dict:
    if path == "":
        raise BadArgument("missing n: use /slow/primes/<n>")
    return {"n": bounded_int(path, "n", 0, config["max_n"])}


# The same n always gives the same answer: the edge serves it for a minute without computing it
# again (/slow/primes/1000 and /slow/primes/01000 are one entry: the second is redirected), and
# identical requests in flight on an instance share one job (n is nobody's secret).
@task("primes", parse=parse_primes, echo=("n",), cache_ttl=60, url=lambda kwargs: str(kwargs["n"]), coalesce=True)
def primes(n: int) -> int:
    """How many primes are below n (a sieve of Eratosthenes)."""
    if n < 3:
        return 0
    sieve = bytearray([1]) * n
    sieve[0] = sieve[1] = 0
    for i in range(2, int(n ** 0.5) + 1):
        if sieve[i]:
            sieve[i * i::i] = bytes(len(range(i * i, n, i)))
    return sum(sieve)


# sleep: a blocking client kept per worker ---------------------------------------------------------

class LegacyClient:
    """Stands for a blocking client library (a SOAP client, a driver without async support).

    Created once per worker by the task's setup; every job on that worker reuses it, which the
    response shows through `client_id` and `calls`.
    """

    def __init__(self) -> None:
        self.client_id = uuid.uuid4().hex[:12]
        self.calls = 0

    def call(self, seconds: float) -> dict:
        self.calls += 1
        time.sleep(seconds)  # the blocking call: it holds this worker, never an event loop
        return {"client_id": self.client_id, "calls": self.calls, "worker_pid": os.getpid()}


def connect_legacy_client() -> LegacyClient:
    return LegacyClient()


def parse_sleep(path: str, params: Mapping[str, str], config: Mapping[str, Any]) -> dict:
    if path == "":
        raise BadArgument("missing seconds: use /slow/sleep/<seconds>")
    return {"seconds": bounded_float(path, "seconds", 0, config["max_seconds"])}


# Not coalesced (the default): each request is its own call to the outside service (a call may have effects).
@task("sleep", parse=parse_sleep, setup=connect_legacy_client, echo=("seconds",))
def blocking_call(client: LegacyClient, seconds: float) -> dict:
    return client.call(seconds)


# report: a long job that says how far it has got -------------------------------------------------

def parse_report(path: str, params: Mapping[str, str], config: Mapping[str, Any]) -> dict:
    if path == "":
        raise BadArgument("missing seconds: use /slow/report/<seconds>")
    return {"seconds": bounded_float(path, "seconds", 0.1, config["max_seconds"])}


SECTIONS_PER_SECOND = 10  # one progress report per section: as often as progress.py lets through


# long: always a job (202, /jobs/<id>), never held by a request. Its own timeout (an hour) is past
# any argument it accepts (tasks.report.max_seconds); the fleet caps it at jobs.max_run_time.
# retries: a report cut short by a lost instance is simply made again (its argument is no secret).
@task("report", parse=parse_report, echo=("seconds",), long=True, timeout=3600, retries=1)
def report(seconds: float) -> dict:
    """CPU work for `seconds`, in sections of a tenth of a second, reporting each: a report, an
    export, a model run (SHA-256 rounds stand for the work)."""
    sections = max(1, round(seconds * SECTIONS_PER_SECOND))
    value = b"report"
    for section in range(1, sections + 1):
        end = time.perf_counter() + seconds / sections
        while time.perf_counter() < end:
            for _ in range(1000):
                value = hashlib.sha256(value).digest()
        progress.report(section, sections, f"section {section} of {sections}")
    return {"sections": sections, "digest": value.hex()}
