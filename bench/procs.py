"""Processes the bench starts: spawn, find their descendants, stop them by pid; ports; HTTP waits.

Every process is identified by (pid, start time) so that a pid reused by an unrelated process
after ours exited is never signalled.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Iterable

from deploy.control import ephemeral_ports
from services.common import procfs

Proc = tuple[int, int]  # (pid, start time in clock ticks since boot: procfs.Stat.starttime)


def start_time(pid: int) -> int | None:
    stat = procfs.stat(pid)
    return stat.starttime if stat else None


def alive(proc: Proc) -> bool:
    stat = procfs.stat(proc[0])
    return stat is not None and stat.starttime == proc[1] and stat.state != "Z"


def identify(pids: Iterable[int]) -> list[Proc]:
    found = []
    for pid in pids:
        started = start_time(pid)
        if started is not None:
            found.append((pid, started))
    return found


def tree(root: int) -> list[int]:
    """root and every descendant of it that is alive now."""
    return [root, *procfs.descendants(root)] if procfs.stat(root) else []


def spawn(cmd: list[str], log: Path, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.Popen:
    """Start a server in its own session (Ctrl-C in the terminal reaches only the bench, which
    then stops it), its output in `log`."""
    with open(log, "ab") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, cwd=cwd, start_new_session=True)


def stop(procs: list[Proc], first: signal.Signals = signal.SIGTERM, grace: float = 5.0) -> list[Proc]:
    """Send `first` to the first process (the root), wait up to `grace` for all of `procs` to
    exit, then SIGKILL whatever is left. Returns the processes that had to be killed."""
    if procs and alive(procs[0]):
        _signal(procs[0], first)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(alive(p) for p in procs):
        time.sleep(0.05)
    killed = [p for p in procs if alive(p)]
    for p in killed:
        _signal(p, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(alive(p) for p in killed):
        time.sleep(0.05)
    return killed


def _signal(proc: Proc, signum: signal.Signals) -> None:
    if start_time(proc[0]) == proc[1]:
        try:
            os.kill(proc[0], signum)
        except ProcessLookupError:
            pass


def reap(popen: subprocess.Popen | None) -> None:
    if popen is not None:
        try:
            popen.wait(timeout=1)
        except subprocess.TimeoutExpired:
            pass


# ports -------------------------------------------------------------------------------------------

def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port_block(size: int) -> int:
    """A base port such that base..base+size-1 are all free on loopback.

    Below the kernel's ephemeral range: a port in it can be taken, between a program's stop and
    its restart, as the local end of some outgoing connection (a Dask worker then fails to start
    with "Address already in use"; seen in CI)."""
    first, last = _port_slice(10000, ephemeral_ports().start - size)
    for _ in range(500):
        base = random.randrange(first, last)
        block = range(base, base + size)
        if any(block.start < r.stop and r.start < block.stop for r in _HANDED_OUT):
            continue  # given to a fleet of this process that does not listen on all of it yet (spares)
        if all(port_is_free(port) for port in block):
            _HANDED_OUT.append(block)
            return base
    raise RuntimeError(f"no block of {size} free ports on 127.0.0.1")


_HANDED_OUT: list[range] = []  # free_port_block's answers so far


def _port_slice(first: int, last: int) -> tuple[int, int]:
    """The bases this process may draw from: all of them, or under pytest-xdist (the integration
    tests that share the machine run two at a time) its worker's own slice, so that two workers'
    fleets never draw overlapping blocks (a block's spare ports stay free until they are used)."""
    worker, count = os.environ.get("PYTEST_XDIST_WORKER", ""), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if not worker.startswith("gw") or count <= 1:
        return first, last
    width = (last - first) // count
    start = first + int(worker[2:]) * width
    return start, start + width


# HTTP --------------------------------------------------------------------------------------------

def http_ok(url: str, timeout: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            response.read()
            return response.status == 200
    except OSError:
        return False


def wait_http(url: str, timeout: float, popen: subprocess.Popen | None = None, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if http_ok(url):
            return
        if popen is not None and popen.poll() is not None:
            break
        time.sleep(0.05)
    tail = ""
    if log is not None and log.exists():
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-10:])
    how = f"exited with {popen.returncode}" if popen is not None and popen.poll() is not None else f"not answering after {timeout:.0f} s"
    raise RuntimeError(f"{url}: {how}\n{tail}")
