"""The long jobs' faults for `make chaos` (chaos.py), each under the steady load: kill -9 of the slow
instance and of the runner while long jobs run, kill -9 of the job processes that run them, and
cancels of running and queued long jobs.

Each drives its jobs through the edge as a client of its own loopback address (JobClient, as
faults.py's own clients do), follows every job's fate in its record (GET /jobs/<id>, its events)
and the processes that ran them in /proc, and raises FleetError if a promise of README.md's "Long
jobs" does not hold:

    kill-slow-long-jobs   kill -9 of slow-01 and of the runner while long jobs run and wait: every
                          one succeeds, in one attempt, its events gap-free; no record lost
    kill-job-process      kill -9 of the job processes: each of their jobs leaves `running` within
                          15 s (a lease and a beat): failed `worker_lost`, retryable, or, for a task
                          declaring retries (the shipped `report`), queued again and then finished;
                          a cancel made just before the kill ends `cancelled`; their workers gone
    reload-long-jobs      `make reload` while long jobs run, each followed by a stream: every job
                          succeeds in one attempt; every stream, reconnected with Last-Event-ID
                          after each cut, got every event once and in order
    kill-job-store        kill -9 of the fleet's own Redis store: 503 store_unavailable at once, the
                          fast path untouched, every acknowledged job there when it is back, a job
                          that ended meanwhile recorded
    cancel-under-load     DELETE of running jobs: their processes gone within 2.5 s; of a queued
                          one: `cancelled` in the DELETE's own answer
"""

from __future__ import annotations

import datetime
import http.client
import json
import os
import signal
import threading
import time
from dataclasses import dataclass
from typing import Callable

from deploy import fleet
from deploy.procs import processes_of
from drills.faults import pid_of, survivors, wait_whole
from drills.loadgen import SteadyLoad
from services.common import procfs
from services.common.settings import Settings

LOST_WITHIN = 15.0  # seconds after a kill -9 of its job process by which a job has left `running` (issue 26's promise)
CANCEL_KILLS_WITHIN = 2.5  # seconds from a running job's DELETE to its process gone (issue 26's target)
RATE_LIMITED_TRIES = 30  # a request refused 429 is asked again after Retry-After, up to this many times
POLL = 0.2  # seconds between two looks at a job's record: 5 a second per job, far under the edge's rate per client
# A retried job (its task declares retries) runs again after the kill: this many seconds, so that it
# is still running at the kill and ends soon after its second start.
RETRIED_SECONDS = 4


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> dict:
        try:
            return json.loads(self.body)
        except ValueError:
            return {"not JSON": self.body[:200].decode("latin-1")}


class JobClient:
    """Long jobs through the edge, from the loopback address `source`: a client of its own."""

    def __init__(self, settings: Settings, source: str, timeout: float = 10):
        self.port, self.source, self.timeout = settings.edge.port, source, timeout

    def call(self, method: str, path: str, headers: dict | None = None) -> Answer:
        """One request; refused for its rate (429), it backs off as Retry-After says and asks again,
        as a well-made client does (the soak's last look at hundreds of jobs met the edge's limit)."""
        for _ in range(RATE_LIMITED_TRIES):
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout,
                                              source_address=(self.source, 0))
            try:
                conn.request(method, path, headers=headers or {})
                response = conn.getresponse()
                answer = Answer(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
            finally:
                conn.close()
            if answer.status != 429:
                return answer
            time.sleep(float(answer.headers.get("retry-after", "1")))
        return answer

    def submit(self, path: str) -> tuple[str, str]:
        """A job of `path` (Prefer: respond-async): its id, and the instance that took it (its owner)."""
        answer = self.call("GET", path, {"Prefer": "respond-async"})
        if answer.status != 202:
            raise fleet.FleetError(f"{path} with Prefer: respond-async was answered {answer.status} {answer.json()}")
        return answer.json()["id"], answer.headers.get("x-served-by", "")

    def job(self, job_id: str) -> dict | None:
        """The job's status document; None while no slow instance answers (a restart: 502, 503,
        504). A record the store no longer has (404, 410) was lost: FleetError."""
        answer = self.call("GET", f"/jobs/{job_id}")
        if answer.status == 200:
            return answer.json()
        if answer.status in (502, 503, 504):
            return None
        raise fleet.FleetError(f"job {job_id}: {answer.status} {answer.json()}: its record was lost")

    def cancel(self, job_id: str) -> dict:
        answer = self.call("DELETE", f"/jobs/{job_id}")
        if answer.status != 200:
            raise fleet.FleetError(f"DELETE of job {job_id} was answered {answer.status} {answer.json()}")
        return answer.json()

    def events(self, job_id: str) -> list[dict]:
        """Every event of an ended job (its stream replays them all, then closes): {"id", "event", "data"}."""
        answer = self.call("GET", f"/jobs/{job_id}/events", {"Accept": "text/event-stream"})
        if answer.status != 200:
            raise fleet.FleetError(f"the events of job {job_id}: {answer.status} {answer.json()}")
        events = []
        for block in answer.body.decode().split("\n\n"):
            fields = dict(line.partition(": ")[::2] for line in block.split("\n") if line and not line.startswith(":"))
            if "id" in fields:
                events.append({"id": int(fields["id"]), "event": fields.get("event", ""),
                               "data": json.loads(fields.get("data", "null"))})
        return events

    def wait(self, job_id: str, done: Callable[[dict], bool], deadline: float, what: str) -> dict:
        """Polls the job until done(its status document); FleetError past the monotonic `deadline`."""
        while True:
            doc = self.job(job_id)
            if doc is not None and done(doc):
                return doc
            if time.monotonic() > deadline:
                raise fleet.FleetError(f"job {job_id} not {what} in time: {doc}")
            time.sleep(POLL)


def slots(settings: Settings) -> int:
    """Long jobs the host's runner runs at once (runner.workers)."""
    return settings.runner.workers


def runners(settings: Settings) -> dict[str, int]:
    """{job id: the pid of the job process that runs it} (services/slow/job_process.py)."""
    found = {}
    for pid in processes_of(settings.run_dir):
        words = procfs.cmdline(pid).split()
        if "services.slow.job_process" in words:
            found.update({word[len("--job="):]: pid for word in words if word.startswith("--job=")})
    return found


def job_processes(settings: Settings) -> set[int]:
    """The processes that compute jobs: the job processes' workers, or on a Dask cluster the job
    processes of its workers (each worker's pool is pool.py's: the children of its forkserver)."""
    if settings.slow.backend != "dask":
        return {child for pid in set(runners(settings).values()) for child in procfs.descendants(pid)
                if (stat := procfs.stat(child)) is not None and stat.ppid != pid}  # not the forkserver
    found = set()
    for p in fleet.process_infos(settings):
        if p["name"].startswith("dask-worker-") and p["pid"]:
            found |= {pid for pid in procfs.descendants(p["pid"])
                      if (stat := procfs.stat(pid)) is not None and stat.ppid != p["pid"]}
    return found


def all_running(client: JobClient, jobs: list[str], progressed: list[str] = (), within: float = 20) -> None:
    """Every job of `jobs` running; those of `progressed` reported progress too (from their process:
    on a Dask cluster a job is `running` once its instance admits it, before a worker starts it)."""
    deadline = time.monotonic() + within
    for job_id in jobs:
        client.wait(job_id, lambda doc: doc["state"] == "running" and (job_id not in progressed or doc["progress"]),
                    deadline, "running" + (" and reporting progress" if job_id in progressed else ""))


def computing(settings: Settings, looks: int = 3) -> set[int]:
    """The job processes computing (state R: running or waiting for a CPU) at each of `looks` looks,
    0.1 s apart: those of CPU-bound jobs, never an idle one."""
    found = job_processes(settings)
    for _ in range(looks):
        time.sleep(0.1)
        found = {pid for pid in found if procfs.state(pid) == "R"}
    return found


def wall_time(stamp: str | None) -> float | None:
    """A status document's time ("2026-12-06T16:45:04.765Z") as a Unix time."""
    if stamp is None:
        return None
    return datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def _worker_lost(doc: dict) -> bool:
    error = doc.get("error") or {}
    return doc["state"] == "failed" and error.get("error") == "worker_lost" and error.get("retryable") is True


# the faults ------------------------------------------------------------------------------------

def kill_slow_and_runner_under_long_jobs(settings: Settings, load: SteadyLoad) -> str:
    """Every running place taken by a long job and one more waiting, then kill -9 of the slow
    instance that took them and of the runner that started them: the jobs run on in their own
    processes, and the restarted runner starts the waiting one."""
    client = JobClient(settings, "127.0.0.6")
    seconds = RETRIED_SECONDS + 2
    taken = [client.submit(f"/slow/report/{seconds}") for _ in range(slots(settings))]
    running, owner = [job_id for job_id, _ in taken], taken[0][1]  # the instance that took the first
    all_running(client, running, progressed=running)
    waiting = client.submit(f"/slow/report/{seconds}")[0]
    for name in (owner, "runner-01"):
        os.kill(pid_of(settings, name), signal.SIGKILL)
    killed = time.monotonic()
    deadline = killed + 30 + 2 * seconds
    for job_id in [*running, waiting]:
        client.wait(job_id, lambda doc: doc["state"] == "succeeded", deadline, "succeeded")
        events = client.events(job_id)
        if [e["id"] for e in events] != list(range(1, len(events) + 1)):
            raise fleet.FleetError(f"job {job_id}: its events were not numbered 1..n: {[e['id'] for e in events]}")
        states = [e["data"] for e in events if e["event"] == "state"]
        if states != [{"state": "queued"}, {"state": "running"}]:
            raise fleet.FleetError(f"job {job_id} ran more than once: its state events were {states}")
    return (f"kill -9 {owner} and runner-01 with {len(running)} long jobs running, 1 waiting: all "
            f"{len(running) + 1} succeeded, each in one attempt, events gap-free, within "
            f"{time.monotonic() - killed:.1f} s of the kill")


def kill_job_processes(settings: Settings, load: SteadyLoad) -> str:
    """Every running place taken by a long job (one of a task without retries, the shipped
    report's, which declares one retry, in the others), one of each kind waiting behind them and
    one more cancelled, then kill -9 of the job processes that run them."""
    client = JobClient(settings, "127.0.0.6")
    report = f"/slow/report/{RETRIED_SECONDS}"
    # One running place to a sleep job (no retries), the others to reports, which say they run by
    # their progress (on Dask a job is `running` once its process starts, before the cluster does):
    # with one place only (Dask's default), a report.
    sleeping = 1 if slots(settings) >= 2 else 0
    lost = [client.submit("/slow/sleep/10")[0] for _ in range(sleeping)]  # sleep declares no retries
    retried = [client.submit(report)[0] for _ in range(slots(settings) - sleeping)]
    all_running(client, [*retried, *lost], progressed=retried)
    lost.append(client.submit("/slow/sleep/10")[0])  # these wait
    retried.append(client.submit(report)[0])
    cancelled = client.submit("/slow/report/60")[0]
    cancel = client.cancel(cancelled)
    before = {job_id: client.job(job_id) for job_id in [*lost, *retried]}
    waiting = sum(doc["state"] == "queued" for doc in before.values()) + (cancel["started"] is None)
    killed_jobs = {job_id for job_id, doc in before.items() if doc["state"] == "running"}
    targets = {pid for job_id, pid in runners(settings).items() if job_id in killed_jobs}
    workers = job_processes(settings)  # the cluster's job processes too, on Dask
    for pid in targets:
        os.kill(pid, signal.SIGKILL)
    killed, killed_at = time.monotonic(), time.time()

    def requeued(job_id: str) -> Callable[[dict], bool]:
        # queued again (its start forgotten, a new event), or started again after the kill
        return lambda doc: ((doc["state"] == "queued" and doc["started"] is None and doc["seq"] > before[job_id]["seq"])
                            or (wall_time(doc["started"]) or 0) > killed_at)

    lost_run = [j for j in lost if j in killed_jobs]
    retried_run = [j for j in retried if j in killed_jobs]
    expected = {cancelled: (lambda doc: doc["state"] == "cancelled", "cancelled"),
                **{job_id: (_worker_lost, "failed worker_lost, retryable") for job_id in lost_run},
                **{job_id: (requeued(job_id), "queued again") for job_id in retried_run}}
    left: dict[str, float] = {}  # job -> seconds after the kill when it had left `running`
    while len(left) < len(expected):
        for job_id, (done, what) in expected.items():
            doc = None if job_id in left else client.job(job_id)
            if doc is None:
                continue
            if done(doc):
                left[job_id] = time.monotonic() - killed
            elif doc["state"] in ("succeeded", "failed", "cancelled"):
                raise fleet.FleetError(f"job {job_id} of a killed job process ended {doc['state']} "
                                       f"{doc.get('error')}, not {what}")
        if time.monotonic() - killed > LOST_WITHIN:
            stuck = {job_id: what for job_id, (_, what) in expected.items() if job_id not in left}
            raise fleet.FleetError(f"{len(stuck)} job(s) of killed job processes not out of `running` within "
                                   f"{LOST_WITHIN:g} s: {stuck}")
        time.sleep(POLL)
    within = max(0.0, LOST_WITHIN - (time.monotonic() - killed))
    if settings.slow.backend == "dask":
        # The cluster's pool workers outlive any one job: the one that ran each killed job process's
        # job is killed when the scheduler hears that job's client is gone (its job stops); the
        # others run on, the steady load's jobs included.
        deadline = time.monotonic() + within
        while len(workers) - len(running_on := [p for p in workers if procfs.alive(p)]) < len(killed_jobs):
            if time.monotonic() > deadline:
                raise fleet.FleetError(f"{len(workers) - len(running_on)} of the cluster's {len(workers)} job "
                                       f"processes stopped within {LOST_WITHIN:g} s of the kill, for "
                                       f"{len(killed_jobs)} killed jobs: some still computed")
            time.sleep(0.05)
    else:
        running_on = survivors(sorted(workers), within=within)
        if running_on:
            raise fleet.FleetError(f"processes {running_on} still computed the killed job processes' jobs "
                                   f"{LOST_WITHIN:g} s after the kill")
    # The retried ones run again, and finish; the waiting ones run as ever; the cancelled one never runs.
    deadline = time.monotonic() + 30 + RETRIED_SECONDS * len(retried) + 10 * len(lost)
    for job_id in retried:
        client.wait(job_id, lambda doc: doc["state"] == "succeeded", deadline, "succeeded")
        attempts = [e["data"] for e in client.events(job_id) if e["event"] == "state" and e["data"].get("attempt")]
        wanted = [{"state": "queued", "attempt": 2, "after": "worker_lost"}] if job_id in retried_run else []
        if attempts != wanted:
            raise fleet.FleetError(f"job {job_id}: its attempts' events were {attempts}")
    for job_id in lost:
        if job_id not in lost_run:
            client.wait(job_id, lambda doc: doc["state"] == "succeeded", deadline, "succeeded")
    if (client.job(cancelled)["started"] != cancel["started"]
            or any(e["data"].get("attempt") for e in client.events(cancelled))):
        raise fleet.FleetError(f"job {cancelled}, cancelled before the kill, ran or was queued again after it")
    lost_in = max((left[job_id] for job_id in lost_run), default=0.0)
    requeued_in = max((left[job_id] for job_id in retried_run), default=0.0)
    return (f"kill -9 of {len(targets)} job processes running {len(killed_jobs)} long jobs, {waiting} waiting: "
            f"{_count(lost_run, 'sleep job')} (no retries) failed worker_lost, retryable, within {lost_in:.1f} s; "
            f"{_count(retried_run, 'report')} (retries=1) queued again within {requeued_in:.1f} s, then succeeded; "
            f"the waiting ones ran; one cancelled before the kill stayed cancelled; every record kept; "
            + (f"the cluster's {len(killed_jobs)} processes that computed them gone" if settings.slow.backend == "dask"
               else f"{_count(workers, 'process', 'processes')} that computed them gone"))


def follow(edge: tuple[str, int], job_id: str, source: str | None, seen: list[int], reconnects: list[int],
           hang_up_after: int | None = None) -> None:
    """Follow a job's events through the edge (address, port) as a browser's EventSource does: a
    stream cut (its instance restarted) is opened again with Last-Event-ID; until the end event, or
    a 204. `hang_up_after`: the client itself closes its first stream after that many events."""
    last = 0
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        conn = http.client.HTTPConnection(*edge, timeout=30, source_address=(source, 0) if source else None)
        try:
            headers = {"Accept": "text/event-stream", **({"Last-Event-ID": str(last)} if last else {})}
            conn.request("GET", f"/jobs/{job_id}/events", headers=headers)
            response = conn.getresponse()
            if response.status == 204:
                return
            if response.status != 200:
                raise OSError(f"answered {response.status}")
            event_id, kind = None, None
            for raw in response:
                line = raw.decode().rstrip("\r\n")
                if line.startswith("id: "):
                    event_id = int(line[4:])
                elif line.startswith("event: "):
                    kind = line[7:]
                elif not line and event_id is not None:
                    seen.append(event_id)
                    last = event_id
                    if kind == "end":
                        return
                    event_id, kind = None, None
                    if hang_up_after is not None and len(seen) == hang_up_after:
                        break  # the client's own reconnect
        except (OSError, http.client.HTTPException):
            pass
        finally:
            conn.close()
        reconnects.append(last)
        time.sleep(0.2)  # EventSource's retry (the stream says 1 s; quicker here, as impatient clients are)


def reload_under_long_jobs(settings: Settings, load: SteadyLoad) -> str:
    """Every running place of the runner taken by a long job, one more waiting, each followed by a
    stream that reconnects when cut; then a rolling restart of every instance and of the runner
    (`make reload`): each job succeeds in one attempt, and each stream got every event exactly
    once, in order."""
    client = JobClient(settings, "127.0.0.8")
    seconds = 8
    jobs = [client.submit(f"/slow/report/{seconds}")[0] for _ in range(slots(settings) + 1)]
    seen: dict[str, list[int]] = {job_id: [] for job_id in jobs}
    reconnects: dict[str, list[int]] = {job_id: [] for job_id in jobs}
    edge = ("127.0.0.1", settings.edge.port)
    followers = [threading.Thread(target=follow, args=(edge, job_id, "127.0.0.8", seen[job_id], reconnects[job_id]),
                                  daemon=True) for job_id in jobs]
    for thread in followers:
        thread.start()
    all_running(client, jobs[:-1], progressed=jobs[:-1])
    before = {p["name"]: p["pid"] for p in fleet.process_infos(settings)}
    load.reloads += fleet.rolling_restart(settings)
    restarted = [n for n, pid in before.items() if n in ("slow-01", "runner-01") and
                 fleet.process_info(settings, n)["pid"] != pid]
    deadline = time.monotonic() + 60 + 2 * seconds
    for job_id in jobs:
        client.wait(job_id, lambda doc: doc["state"] == "succeeded", deadline, "succeeded")
        states = [e["data"] for e in client.events(job_id) if e["event"] == "state"]
        if states != [{"state": "queued"}, {"state": "running"}]:
            raise fleet.FleetError(f"job {job_id} ran more than once over the reload: {states}")
    for thread in followers:
        thread.join(timeout=max(0.0, deadline - time.monotonic()))
    for job_id, ids in seen.items():
        if ids != list(range(1, len(ids) + 1)) or not ids:
            raise fleet.FleetError(f"the stream of job {job_id} got events {ids[:5]}...{ids[-5:]} "
                                   f"({len(ids)}), reconnecting after {reconnects[job_id]}: a gap or a repeat")
    cut = sum(len(r) for r in reconnects.values())
    return (f"{len(jobs)} long jobs (one waiting), each followed by a stream, through a rolling restart of "
            f"{', '.join(restarted) or 'nothing'} and the rest: all succeeded in one attempt; the streams were "
            f"cut {cut} times and resumed with Last-Event-ID, every event once and in order")


def kill_job_store(settings: Settings, load: SteadyLoad) -> str:
    """A long job running, then kill -9 of the fleet's own job store (jobs.store = "redis"): while it
    is away a submit and a status read answer 503 store_unavailable at once, the steady load is
    untouched; supervisor starts it again from its log, where the job is; the job, which ended
    meanwhile, is recorded succeeded; nothing acknowledged is lost."""
    client = JobClient(settings, "127.0.0.9")
    job_id = client.submit("/slow/report/3")[0]
    acknowledged = [client.submit("/slow/fib/5")[0] for _ in range(5)]  # 202s before the kill
    all_running(client, [job_id], progressed=[job_id])
    os.kill(pid_of(settings, "job-store"), signal.SIGKILL)
    killed = time.monotonic()
    refused = []
    for method, path, headers in (("GET", "/slow/report/1", {"Prefer": "respond-async"}), ("GET", f"/jobs/{job_id}", {})):
        sent = time.monotonic()
        answer = client.call(method, path, headers)
        took = time.monotonic() - sent
        if answer.status == 200 and time.monotonic() - killed > 1:  # supervisor restarted it meanwhile
            continue
        if answer.status != 503 or answer.json().get("error") != "store_unavailable" or took > 1.5:
            raise fleet.FleetError(f"{method} {path} with the store killed: {answer.status} {answer.json()} "
                                   f"in {took:.2f} s, not 503 store_unavailable at once")
        refused.append(took)
    deadline = time.monotonic() + 30
    doc = client.wait(job_id, lambda d: d["state"] == "succeeded", deadline, "succeeded after the store came back")
    for other in acknowledged:
        client.wait(other, lambda d: d["state"] == "succeeded", deadline, "kept and run")
    return (f"kill -9 job-store with a long job running and 5 acknowledged: {len(refused)} calls answered 503 "
            f"store_unavailable within {max(refused, default=0):.2f} s; back within "
            f"{time.monotonic() - killed:.1f} s with every job; the long job recorded {doc['state']}")


def _count(items, noun: str, plural: str = "") -> str:
    return f"{len(items)} {noun if len(items) == 1 else plural or noun + 's'}"


def cancel_under_load(settings: Settings, load: SteadyLoad, rounds: int = 3) -> str:
    """Each round: every running slot taken by a long job, one more waiting in line; the waiting
    one cancelled (in the DELETE's own answer), then the running ones (their processes killed)."""
    client = JobClient(settings, "127.0.0.7")
    gone_in: list[float] = []  # from the first running job's DELETE to the last of their processes gone
    queued_ms: list[float] = []
    for _ in range(rounds):
        wait_whole(settings)  # every instance whole, whatever the last round did
        jobs = [client.submit("/slow/report/60")[0] for _ in range(slots(settings))]
        all_running(client, jobs, progressed=jobs)
        # Their job processes (each exits once its job is cancelled), and on the local pool their workers.
        ran_by = {job_id: pid for job_id, pid in runners(settings).items() if job_id in jobs}
        if len(ran_by) < len(jobs):
            raise fleet.FleetError(f"{len(jobs)} jobs hold every running place, but only {len(ran_by)} have a "
                                   f"job process: {ran_by}")
        processes = set(ran_by.values())
        if settings.slow.backend != "dask":
            processes |= {child for pid in ran_by.values() for child in procfs.descendants(pid)}
        waiting = client.submit("/slow/report/60")[0]
        sent = time.monotonic()
        doc = client.cancel(waiting)
        queued_ms.append((time.monotonic() - sent) * 1000)
        if doc["state"] != "cancelled" or doc["started"] is not None:
            raise fleet.FleetError(f"a queued job's DELETE answered {doc['state']}, started {doc['started']}")
        sent = time.monotonic()
        for job_id in jobs:
            state = client.cancel(job_id)["state"]
            if state not in ("cancelling", "cancelled"):
                raise fleet.FleetError(f"a running job's DELETE answered {state}")
        alive = set(processes)
        while alive and time.monotonic() - sent <= CANCEL_KILLS_WITHIN:
            alive = {pid for pid in alive if procfs.alive(pid)}
            time.sleep(0.01)
        if alive:
            raise fleet.FleetError(f"processes {sorted(alive)} of cancelled jobs still ran {CANCEL_KILLS_WITHIN} s "
                                   "after their DELETE")
        gone_in.append(time.monotonic() - sent)
        deadline = time.monotonic() + 5
        for job_id in jobs:
            client.wait(job_id, lambda doc: doc["state"] == "cancelled", deadline, "cancelled")
    return (f"{rounds} x: {len(jobs)} running long jobs and 1 waiting cancelled; the waiting one cancelled in "
            f"the DELETE's answer ({max(queued_ms):.0f} ms at most), the running ones' {len(jobs)} processes gone "
            f"within {max(gone_in):.2f} s of the first DELETE")
