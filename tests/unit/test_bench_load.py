"""The bench's load generator behaves as remote clients would (issue 31): a refused flood client
backs off instead of looping, the probe's samples survive the trip from its own process, and the
profile of a request's CPU is read from py-spy's own format."""

from __future__ import annotations

import asyncio
import time

import pytest

from bench import load, request_cost
from bench.load import FloodClient, Samples


def test_backoff_doubles_from_50_ms_to_a_second_with_jitter():
    for failures, nominal in ((1, 0.05), (2, 0.1), (3, 0.2), (5, 0.8), (6, 1.0), (30, 1.0)):
        waits = [load.backoff(failures) for _ in range(200)]
        assert nominal * 0.75 <= min(waits) and max(waits) <= nominal * 1.25, (failures, min(waits), max(waits))
        assert max(waits) - min(waits) > nominal * 0.1  # jittered: refused clients do not return in step


async def _server(statuses: list[int]) -> tuple[asyncio.AbstractServer, list[float]]:
    """A loopback HTTP server answering each request with the next of `statuses` (the last one
    forever), recording when each request arrived."""
    arrivals: list[float] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while await reader.readuntil(b"\r\n\r\n"):
                arrivals.append(time.monotonic())
                status = statuses[min(len(arrivals), len(statuses)) - 1]
                writer.write(f"HTTP/1.1 {status} X\r\nContent-Length: 2\r\n\r\nok".encode())
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0), arrivals


def test_a_refused_flood_client_backs_off_and_returns_to_full_speed_once_answered():
    async def run() -> tuple[FloodClient, list[float]]:
        server, arrivals = await _server([429, 503, 429, 200])
        port = server.sockets[0].getsockname()[1]
        client = FloodClient("127.0.0.1", port, "/slow/fib/27", "127.0.0.2")
        task = asyncio.create_task(client.run())
        await asyncio.sleep(0.6)
        client.stopping = True
        await asyncio.wait_for(task, 5)
        server.close()
        return client, arrivals

    client, arrivals = asyncio.run(run())
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    # Three refusals: waits of about 50, 100 and 200 ms (+-25 %) before the next try ...
    assert 0.03 <= gaps[0] <= 0.08 and 0.07 <= gaps[1] <= 0.15 and 0.14 <= gaps[2] <= 0.28, gaps[:3]
    # ... then, answered 200, back to back again: a closed loop, not a tight loop while refused.
    assert len(arrivals) > 20 and max(gaps[4:]) < 0.03, (len(arrivals), gaps[3:8])
    assert client.refused == 3 and client.errors == 0
    assert [status for _, status in client.done[:4]] == [429, 503, 429, 200]


def test_a_flood_client_whose_server_is_gone_backs_off_instead_of_spinning():
    async def run() -> FloodClient:
        server, _ = await _server([200])
        port = server.sockets[0].getsockname()[1]
        server.close()
        await server.wait_closed()
        client = FloodClient("127.0.0.1", port, "/", "127.0.0.3")
        task = asyncio.create_task(client.run())
        await asyncio.sleep(0.5)
        client.stopping = True
        await asyncio.wait_for(task, 5)
        return client

    client = asyncio.run(run())
    # 50 + 100 + 200 ms of waits fit in half a second: four or five attempts, not thousands.
    assert 3 <= client.errors <= 6, client.errors


def test_the_probe_samples_survive_the_trip_from_the_probe_process():
    s = Samples("/fast", sent=3, latency_ms=[1.0, 2.0], service_ms=[0.5, 1.5], due=[10.0, 10.1],
                lateness_ms=[0.1, 0.2, 0.3], errors=1, first_due=10.0, last_done=10.5)
    s.statuses.update({200: 2, 503: 1})
    back = Samples.from_dict(__import__("json").loads(__import__("json").dumps(s.to_dict())))
    assert back == s and back.statuses[503] == 1 and back.achieved_rate() == pytest.approx(4.0)


def test_the_probe_runs_in_a_process_of_its_own_and_reports_each_answer():
    async def run() -> dict[str, Samples]:
        server, arrivals = await _server([200])
        port = server.sockets[0].getsockname()[1]
        try:
            return await load.probe("127.0.0.1", port, ["/a", "/b"], 200, 40, 5)
        finally:
            server.close()

    results = asyncio.run(run())
    assert set(results) == {"/a", "/b"}
    for s in results.values():
        assert s.sent == s.ok == 20 and s.statuses[200] == 20 and len(s.lateness_ms) == 20


def test_a_cell_is_judged_only_if_its_probe_kept_the_schedule():
    assert load.kept_schedule(0.4) and load.kept_schedule(load.LATE_BOUND_MS)
    assert not load.kept_schedule(load.LATE_BOUND_MS + 0.01)
    assert not load.kept_schedule(None) and not load.kept_schedule(float("nan"))


def test_a_functions_share_of_the_samples_counts_each_stack_once():
    raw = "\n".join([
        "<module> (services/fast/__main__.py:10);run (tornado/web.py:5);get (services/fast/app.py:24) 6",
        "<module> (services/fast/__main__.py:10);run (tornado/web.py:5);run (tornado/web.py:9) 3",  # recursion
        "<module> (services/fast/__main__.py:10);observe (services/common/metrics.py:40) 1",
    ])
    shares = request_cost.shares(raw)
    assert shares["<module> (services/fast/__main__.py)"] == pytest.approx(1.0)
    assert shares["run (tornado/web.py)"] == pytest.approx(0.9)  # once per stack, however deep
    assert shares["get (services/fast/app.py)"] == pytest.approx(0.6)
    assert shares["observe (services/common/metrics.py)"] == pytest.approx(0.1)


def test_the_flood_is_clients_each_in_a_process_of_its_own_from_its_own_address_at_the_lowest_priority():
    peers: set[str] = set()

    async def run() -> tuple[load.HeavyFlood, list[int], list[int]]:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            peers.add(writer.get_extra_info("peername")[0])
            try:
                while await reader.readuntil(b"\r\n\r\n"):
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                    await writer.drain()
            except (asyncio.IncompleteReadError, ConnectionError):
                writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with load.HeavyFlood("127.0.0.1", port, "/slow/fib/27", 3) as flood:
            pids = [proc.pid for proc in flood._procs]
            nices = [__import__("os").getpriority(__import__("os").PRIO_PROCESS, pid) for pid in pids]
            await asyncio.sleep(0.5)
        server.close()
        return flood, pids, nices

    flood, pids, nices = asyncio.run(run())
    assert len(set(pids)) == 3 and nices == [load.FLOOD_NICE] * 3
    assert peers == {"127.0.0.2", "127.0.0.3", "127.0.0.4"}
    assert len(flood.done) > 30 and {status for _, status in flood.done} == {200} and flood.errors == 0
    assert flood.done == sorted(flood.done)  # the clients' answers merged on the one clock
