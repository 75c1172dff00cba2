"""`make chaos`: break the running fleet in every way we promise to survive, under a steady load.

    python -m drills.chaos            # against the fleet of .run/ (or $FLEET_RUN_DIR)
    python -m drills.chaos --only kill-fast,reload

Each scenario starts a steady mixed load through the edge (drills/loadgen.py), produces one fault
(drills/faults.py) for real, waits until the fleet is whole again, and counts every request's outcome. The promise:
no fast request fails, and the only slow requests that fail are those the fault itself hit, each
answered with the contract's JSON error. Exit code 1 if a scenario breaks it.

Columns: sent (requests during the scenario), failed (errors the fault could not explain: must be
0), hit by the fault (requests in flight on the killed process, answered with JSON errors), lost
(no answer, or an answer without the contract's JSON: must be 0), reload races (POSTs a client
sent on a kept-alive connection in the instant an nginx reload closed it: nginx 1.22 closes idle
client connections when it reloads; counted apart, never hidden, and only within a reload's
window; elsewhere such an outcome is lost), recovered in (from the fault until every process
runs, every instance answers /healthz and every pool is full).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field

from deploy import fleet, store
from drills import faults, job_faults
from drills.faults import SETTLE, Fault
from drills.loadgen import SteadyLoad, Tally
from services.common.settings import Settings, SettingsError, load


@dataclass
class Result:
    scenario: str
    tally: Tally
    recovered_in: float
    note: str = ""
    reloads: list[tuple[float, float]] = field(default_factory=list)  # nginx reloads the fault made

    @property
    def passed(self) -> bool:
        return self.tally.failed == 0 and self.tally.lost == 0


# A killed process takes the requests it was serving with it: its jobs, and a POST in flight on a
# fast instance (nginx resends GETs, never a POST).
SCENARIOS = (
    Fault("drain-fast", faults.drain_fast, frozenset()),
    Fault("kill-fast", faults.kill_fast, frozenset({"fast POST"})),
    Fault("kill-upstream", faults.kill_upstream, frozenset()),  # the fan-out route's answers stay whole
    Fault("kill-slow-worker", faults.kill_slow_worker, frozenset({"slow"})),
    Fault("kill-slow", faults.kill_slow_instance, frozenset({"slow"})),
    Fault("kill-nginx", faults.kill_nginx_master, frozenset()),
    Fault("departed-clients", faults.departed_clients, frozenset()),
    Fault("reload", faults.rolling_reload, frozenset()),
    Fault("reload-full-line", faults.reload_with_a_full_line, frozenset()),
    Fault("settings-change", faults.settings_change, frozenset()),
    Fault("abort-storm", faults.abort_storm, frozenset()),
    Fault("monopolist", faults.monopolist, frozenset()),
    Fault("unknown-methods", faults.unknown_methods, frozenset()),
    Fault("hostile-fast-client", faults.hostile_fast_client, frozenset()),
    # Long jobs (job_faults.py): the kill -9 of the instance that took them and of the runner (they
    # run on), of the job processes that run them (their leases), and cancels of running and queued
    # ones (their processes killed: none of the steady load's requests).
    Fault("kill-slow-long-jobs", job_faults.kill_slow_and_runner_under_long_jobs, frozenset({"slow"})),
    Fault("kill-job-process", job_faults.kill_job_processes, frozenset()),
    Fault("reload-long-jobs", job_faults.reload_under_long_jobs, frozenset()),
    Fault("cancel-under-load", job_faults.cancel_under_load, frozenset()),
)
# Faults of the managed Dask cluster (slow.backend = "dask"): a job on the killed process, or in
# flight while the scheduler is away, is hit (502 / 503 backend_unavailable, JSON).
DASK_SCENARIOS = (
    Fault("kill-dask-worker", faults.kill_dask_worker, frozenset({"slow"})),
    Fault("kill-dask-scheduler", faults.kill_dask_scheduler, frozenset({"slow"})),
)
# Faults of the fleet's own job store: only a job submitted or read while it is away is refused
# (503 store_unavailable); the steady load never touches it.
STORE_SCENARIOS = (
    Fault("kill-job-store", job_faults.kill_job_store, frozenset()),
)
# Local-pool faults that a Dask fleet has no counterpart of (its workers are the cluster's).
LOCAL_ONLY = ("abort-storm",)


def scenarios_for(settings: Settings) -> dict[str, Fault]:
    """{name: fault} of the scenarios this fleet can take, in the order they run."""
    if settings.slow.backend == "dask":
        managed = settings.dask.scheduler == "managed"
        chosen = [f for f in SCENARIOS if f.name not in LOCAL_ONLY] + (list(DASK_SCENARIOS) if managed else [])
    else:
        chosen = list(SCENARIOS)
    if store.managed(settings):  # the fleet's own Redis store (jobs.store = "redis", no jobs.redis_url)
        chosen += list(STORE_SCENARIOS)
    return {f.name: f for f in chosen}


def run(settings: Settings, name: str) -> Result:
    faults.wait_whole(settings)
    with SteadyLoad("127.0.0.1", settings.edge.port) as load:
        time.sleep(SETTLE)
        fault = scenarios_for(settings)[name]
        start = time.monotonic()
        note = fault.produce(settings, load)
        faults.wait_whole(settings)
        recovered = time.monotonic() - start
        time.sleep(SETTLE)
    return Result(name, Tally.of(load.outcomes, fault.may_hit, load.reloads), recovered, note, load.reloads)


def print_table(results: list[Result]) -> None:
    w = max([len("scenario"), *(len(r.scenario) for r in results)])  # kill-slow-long-jobs is 19
    header = (f"{'scenario':<{w}} {'sent':>6} {'failed':>7} {'hit by the fault (JSON)':>24} {'lost':>5} "
              f"{'reload races':>13} {'recovered in (s)':>17}  what happened")
    print(header)
    print("-" * len(header))
    for r in results:
        t = r.tally
        print(f"{r.scenario:<{w}} {t.sent:>6} {t.failed:>7} {t.hit:>24} {t.lost:>5} {t.reload_races:>13} "
              f"{r.recovered_in:>17.2f}  {r.note}")
        for example in t.examples if not r.passed or t.reload_races else []:
            print(f"{'':<{w}} {example}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m drills.chaos", description=__doc__.split("\n")[0])
    parser.add_argument("--only", help="comma-separated scenarios, of: "
                        f"{', '.join(f.name for f in SCENARIOS)}; on a Dask fleet also "
                        f"{', '.join(f.name for f in DASK_SCENARIOS)}")
    options = parser.parse_args(argv)
    try:
        settings = load()
        if (settings.run_dir / "settings.json").exists():  # the fleet as it was deployed
            settings = Settings.from_snapshot(settings.run_dir / "settings.json")
        if not fleet.supervisord_pid(settings):
            raise fleet.FleetError(f"no fleet running in {settings.run_dir}: run make deploy-local first")
        known = scenarios_for(settings)
        names = options.only.split(",") if options.only else list(known)
        unknown = [n for n in names if n not in known]
        if unknown:
            parser.error(f"unknown scenario {unknown[0]} for this fleet; known: {', '.join(known)}")
        results = []
        for name in names:
            print(f"running {name} ...", flush=True)
            results.append(run(settings, name))
    except (SettingsError, fleet.FleetError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print()
    print_table(results)
    failed = [r.scenario for r in results if not r.passed]
    print("\n" + (f"FAILED: {', '.join(failed)}" if failed else
                  "every scenario: no request failed or was lost; only requests the fault itself hit got (JSON) errors"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
