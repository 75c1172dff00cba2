"""The integration tier's fleets (tests/support/fleet.py): real nginx, real supervisord, real
worker processes, each in a temp run dir on free ports.

Shared fleets serve the tests that do not break them for good; a test that kills or restarts parts
of a fleet asks for a private one.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.fleet import Fleet, make_fleet


def _shared(run_dir: Path, slow: int = 1, **overrides: str):
    """A fleet up for the whole session (or module), stopped at its end."""
    f = make_fleet(run_dir, slow=slow, **overrides)
    f.command("up")
    yield f
    f.command("stop")


def _private(tmp_path: Path, name: str, **backend: str):
    """A factory of fleets of the test's own (settings overridden per call), each stopped afterwards."""
    fleets: list[Fleet] = []

    def start(**overrides: str) -> Fleet:
        f = make_fleet(tmp_path / f"{name}{len(fleets)}", **backend, **overrides)
        fleets.append(f)
        f.command("up")
        return f

    yield start
    for f in fleets:
        f.command("stop", check=False)


@pytest.fixture(scope="session")
def fleet(tmp_path_factory: pytest.TempPathFactory):
    """One fleet shared by the tests that do not break it for good."""
    yield from _shared(tmp_path_factory.mktemp("fleet"))


@pytest.fixture(scope="module")
def jobs_fleet(tmp_path_factory: pytest.TempPathFactory):
    """A fleet of test_jobs.py's own: two slow instances sharing the host's job store, a keep-alive
    comment every second, at most 3 active jobs and 3 open event streams per client."""
    yield from _shared(tmp_path_factory.mktemp("jobs"), slow=2, FLEET_JOBS_KEEPALIVE_SECONDS="1",
                       FLEET_JOBS_MAX_ACTIVE_PER_CLIENT="3", FLEET_JOBS_MAX_STREAMS_PER_CLIENT="3")


@pytest.fixture
def private_fleet(tmp_path: Path):
    """A fleet of the test's own, for tests that kill or restart parts of it; stopped afterwards."""
    yield from _private(tmp_path, "fleet")


@pytest.fixture(scope="session")
def dask_fleet(tmp_path_factory: pytest.TempPathFactory):
    """One fleet on a managed Dask cluster, shared by the tests that do not break it for good."""
    yield from _shared(tmp_path_factory.mktemp("dask"), FLEET_SLOW_BACKEND="dask")


@pytest.fixture
def private_dask_fleet(tmp_path: Path):
    """A fleet on a managed Dask cluster of the test's own; stopped afterwards."""
    yield from _private(tmp_path, "dask", FLEET_SLOW_BACKEND="dask")


@pytest.fixture(params=["local", "dask"])
def slow_fleet(request: pytest.FixtureRequest) -> Fleet:
    """The shared fleet of each backend in turn: the slow-path contract holds on both."""
    return request.getfixturevalue("fleet" if request.param == "local" else "dask_fleet")
