"""Long jobs all along a soak (drills/soak.py): one submitted every `every` seconds through the edge
(`Prefer: respond-async`, the shipped `report` task, which reports progress and declares a retry),
each followed by an event stream that reconnects with Last-Event-ID when a fault cuts it, as a
browser's EventSource does; every third one cancelled once it runs. The soak's faults strike them
as they strike the synchronous load (restarts of the instance that took them, of the runner, a
rolling reload, on Dask a killed Dask worker), and its job-process fault kills their processes.

    with LongJobLoad(settings, steady) as long_jobs:   # beside the SteadyLoad
        ...                                             # the faults
    figures = long_jobs.finish(windows)

Each submit is an outcome of the steady load's (route "long job submit", kind slow), so a refusal
counts as make chaos counts any request: answered with the contract's JSON error inside a fault's
window is a hit, anything else failed or lost. Each accepted job must then end as promised:
succeeded; cancelled if it was cancelled; or, when a fault that reaches the slow path struck it,
failed with a retryable error (its worker died, its process was lost) or succeeded after a retry.
Its stream must have got every event exactly once, in order, whatever the reconnects.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass, field

from deploy import fleet
from drills.faults import pid_of
from drills.job_faults import JobClient, follow, runners, wall_time
from drills.loadgen import Outcome, Route, SteadyLoad
from services.common import procfs
from services.common.settings import Settings

SOURCE = "127.0.3.1"  # the long jobs' client: an address of its own, apart from the steady load's
SUBMIT = Route("long job submit", "slow", "GET", "/slow/report/{seconds}", rate=0)
ENDED = ("succeeded", "failed", "cancelled")
RETRYABLE = ("worker_lost", "worker_died", "shutting_down")  # what a fault that reaches the slow path may leave


@dataclass
class Figures:
    """What the long jobs of a soak did."""
    submitted: int = 0
    accepted: int = 0
    succeeded: int = 0
    retried: int = 0  # succeeded after a fault took its first run (an attempt event)
    cancelled: int = 0
    failed_by_faults: int = 0  # failed, retryable, inside a fault's window that reaches the slow path
    stream_reconnects: int = 0
    problems: list[str] = field(default_factory=list)


class LongJobLoad:
    def __init__(self, settings: Settings, steady: SteadyLoad, every: float = 5.0, seconds: int = 6):
        self.settings, self.steady, self.every, self.seconds = settings, steady, every, seconds
        self.client = JobClient(settings, SOURCE, timeout=30)
        self.route = Route(SUBMIT.name, SUBMIT.kind, SUBMIT.method, SUBMIT.path.format(seconds=seconds), rate=0)
        self.jobs: dict[str, int] = {}  # job id -> its number (every third one is cancelled)
        self.cancels: dict[str, dict] = {}  # job id -> the DELETE's answer
        self.seen: dict[str, list[int]] = {}
        self.reconnects: dict[str, list[int]] = {}
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._submitter = threading.Thread(target=self._submit_all, daemon=True)

    def __enter__(self) -> "LongJobLoad":
        self._submitter.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._submitter.join(60)

    def _submit_all(self) -> None:
        number = 0
        while not self._stop.wait(self.every if number else 0):
            number += 1
            job_id = self._submit()
            if job_id is None:
                continue
            self.jobs[job_id] = number
            self.seen[job_id], self.reconnects[job_id] = [], []
            follower = threading.Thread(target=follow, args=(("127.0.0.1", self.settings.edge.port), job_id, SOURCE,
                                                             self.seen[job_id], self.reconnects[job_id]), daemon=True)
            follower.start()
            self._threads.append(follower)
            if number % 3 == 0:
                canceller = threading.Thread(target=self._cancel_once_running, args=(job_id,), daemon=True)
                canceller.start()
                self._threads.append(canceller)

    def _submit(self) -> str | None:
        """One submit, recorded as an outcome of the steady load; the job's id if accepted (202)."""
        started = time.monotonic()
        try:
            answer = self.client.call("GET", self.route.path, {"Prefer": "respond-async"})
        except OSError as exc:
            self._record(Outcome(self.route, started, None, type(exc).__name__))
            return None
        seconds = time.monotonic() - started
        if answer.status == 202:
            self._record(Outcome(self.route, started, 200, seconds=seconds))  # accepted: ok for the tally
            return answer.json()["id"]
        body = answer.json()
        self._record(Outcome(self.route, started, answer.status, body.get("error", "non-JSON error body"),
                             json_error="error" in body, seconds=seconds))
        return None

    def _record(self, outcome: Outcome) -> None:
        with self.steady._lock:
            self.steady.outcomes.append(outcome)

    def _cancel_once_running(self, job_id: str) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not self._stop.is_set():
            try:
                doc = self.client.job(job_id)
                if doc is not None and doc["state"] in ENDED:
                    return  # ended first (a fault failed it): nothing to cancel
                if doc is not None and doc["state"] == "running" and doc["progress"]:
                    self.cancels[job_id] = self.client.cancel(job_id)
                    return
            except (OSError, fleet.FleetError):
                pass  # an instance restarting: look again
            time.sleep(0.5)

    def finish(self, windows: list[tuple[float, float, frozenset[str]]], timeout: float = 120) -> Figures:
        """Waits for every accepted job's end and its stream's (bounded), and judges them."""
        figures = Figures(submitted=self.route_count(), accepted=len(self.jobs))
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        for job_id in self.jobs:
            try:
                doc = self.client.wait(job_id, lambda d: d["state"] in ENDED, deadline, "ended")
                states = [e["data"] for e in self.client.events(job_id) if e["event"] == "state"]
            except (OSError, fleet.FleetError) as exc:
                figures.problems.append(f"job {job_id}: {exc}")
                continue
            self._judge(job_id, doc, states, windows, figures)
        for job_id, ids in self.seen.items():
            figures.stream_reconnects += len(self.reconnects[job_id])
            if not ids or ids != list(range(1, len(ids) + 1)):
                figures.problems.append(f"the stream of job {job_id} got events {ids[:5]}...{ids[-5:]} "
                                        f"({len(ids)}), reconnecting after {self.reconnects[job_id]}: a gap or repeat")
        return figures

    def route_count(self) -> int:
        with self.steady._lock:
            return sum(o.route.name == SUBMIT.name for o in self.steady.outcomes)

    def _judge(self, job_id: str, doc: dict, states: list[dict], windows, figures: Figures) -> None:
        retried = any(s.get("attempt") for s in states)
        state, error = doc["state"], (doc.get("error") or {})
        if state == "succeeded":
            figures.succeeded += 1
            figures.retried += retried
            if retried and not self._struck(doc, windows):
                figures.problems.append(f"job {job_id} ran again ({states}) though no fault reached it")
        elif state == "cancelled" and job_id in self.cancels:
            figures.cancelled += 1
        elif (state == "failed" and error.get("error") in RETRYABLE and error.get("retryable")
              and self._struck(doc, windows)):
            figures.failed_by_faults += 1
        else:
            figures.problems.append(f"job {job_id} ended {state} {error or ''}"
                                    f"{' (cancelled)' if job_id in self.cancels else ''}")

    @staticmethod
    def _struck(doc: dict, windows) -> bool:
        """Whether a fault that reaches the slow path struck while the job ran (its windows are
        monotonic; the record's times are wall clock)."""
        offset = time.time() - time.monotonic()
        started = wall_time(doc.get("created"))
        ended = wall_time(doc.get("finished")) or time.time()
        return any(("slow" in hit or LONG_JOBS in hit) and lo + offset <= ended and hi + offset >= (started or 0)
                   for lo, hi, hit in windows)




# the soak's own long-job faults --------------------------------------------------------------------

LONG_JOBS = "long jobs"  # what the next faults reach: the soak's long jobs only, never a synchronous request


def kill_a_job_process(settings: Settings, load: SteadyLoad) -> str:
    """kill -9 of one job process running a long job: the job leaves `running` a lease later, queued
    again for its second attempt (the report task declares a retry), or failed worker_lost."""
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        running = runners(settings)
        if running:
            job_id, pid = sorted(running.items())[0]
            os.kill(pid, signal.SIGKILL)
            return f"kill -9 of job process {pid}, running job {job_id[:8]}…"
        time.sleep(0.2)
    raise fleet.FleetError("no job process ran a long job for 15 s")


def kill_runner(settings: Settings, load: SteadyLoad) -> str:
    """kill -9 of the job runner: supervisor starts it again; its job processes run on."""
    before = set(runners(settings).values())
    os.kill(pid_of(settings, "runner-01"), signal.SIGKILL)
    time.sleep(1)
    left = [pid for pid in before if procfs.stat(pid) is not None]
    return f"kill -9 runner-01; {len(left)} of its {len(before)} job processes ran on"
