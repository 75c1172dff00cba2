"""Run nginx for a run dir so that a killed master costs no connection and leaves no stale worker.

    python -m deploy.nginx_launch RUN_DIR NGINX_BINARY [nginx arguments...]

supervisor starts nginx through this small launcher. It binds the edge's listening socket itself
and hands it to nginx the way nginx's own binary upgrade does (the NGINX environment variable
names inherited sockets), then watches the master:

- The master dies (kill -9, a crash): its workers would live on, serving the old config, and a
  new master could not bind the port. Here the workers are re-parented to the launcher (it is a
  child subreaper), get SIGQUIT (stop accepting, finish what they have, exit), and a new master
  starts at once on the same socket: connections wait in its backlog instead of being refused.
- supervisor's signals (QUIT to stop, HUP to reload, USR1 to reopen logs) are passed to the master.
- The launcher itself was killed: the next one first retires every nginx process of this run dir.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from deploy.procs import alive, children_of, processes_of
from services.common.settings import Settings

PR_SET_CHILD_SUBREAPER = 36
FORWARDED = (signal.SIGHUP, signal.SIGQUIT, signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGWINCH)
STOPPING = (signal.SIGQUIT, signal.SIGTERM, signal.SIGINT)
MAX_RESTARTS = 5  # in RESTART_WINDOW seconds; beyond that exit and let supervisor back off
RESTART_WINDOW = 10


def say(message: str) -> None:
    print(f"nginx_launch: {message}", file=sys.stderr, flush=True)


def retire(pids: list[int], grace: float) -> None:
    """SIGQUIT nginx processes (graceful), SIGKILL whatever is left after `grace` seconds."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGQUIT)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and not all(_reaped(p) for p in pids):
        time.sleep(0.02)
    for pid in pids:
        if alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def nginx_processes(run_dir: Path) -> list[int]:
    found = []
    for pid in processes_of(run_dir):
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"nginx:"):
                found.append(pid)
        except OSError:
            pass
    return found


def listening_socket(settings: Settings) -> socket.socket:
    family = socket.AF_INET6 if ":" in settings.edge.bind else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    deadline = time.monotonic() + 10
    while True:
        try:
            sock.bind((settings.edge.bind, settings.edge.port))
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)  # a retiring nginx still holds the port
    sock.listen(4096)  # backlog: connections wait here while a master restarts
    sock.set_inheritable(True)
    return sock


def main() -> None:
    run_dir, binary, *args = sys.argv[1:]
    run_dir_path = Path(run_dir)
    leftovers = nginx_processes(run_dir_path)
    if leftovers:
        say(f"retiring nginx processes of a previous launcher: {leftovers}")
        retire(leftovers, grace=10)
    settings = Settings.from_snapshot(run_dir_path / "settings.json")
    sock = listening_socket(settings)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)  # orphaned workers become our children
    env = {**os.environ, "NGINX": f"{sock.fileno()};"}

    master: subprocess.Popen | None = None
    stopping = False

    def forward(signum: int, frame) -> None:
        nonlocal stopping
        stopping = stopping or signum in STOPPING
        if master is not None and master.poll() is None:
            master.send_signal(signum)

    for signum in FORWARDED:
        signal.signal(signum, forward)

    restarts: list[float] = []
    retiring: set[int] = set()  # workers of a dead master, finishing their requests
    while True:
        master = subprocess.Popen([binary, *args], env=env, pass_fds=(sock.fileno(),))
        if stopping:  # a stop signal came while the previous master was being replaced
            master.send_signal(signal.SIGQUIT)
        while True:
            try:
                code = master.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                retiring = {pid for pid in retiring if not _reaped(pid)}
        if stopping:
            sys.exit(code)
        now = time.monotonic()
        restarts = [t for t in restarts if now - t < RESTART_WINDOW] + [now]
        orphans = [p for p in children_of(os.getpid()) if p != master.pid and p not in retiring]
        say(f"nginx master {master.pid} exited ({code}); retiring its workers {orphans}, starting a new master")
        for pid in orphans:  # they stop accepting at once and finish what they have
            try:
                os.kill(pid, signal.SIGQUIT)
            except ProcessLookupError:
                pass
        retiring.update(orphans)
        if len(restarts) > MAX_RESTARTS:
            say(f"nginx exited {len(restarts)} times in {RESTART_WINDOW} s; leaving it to supervisor")
            retire(list(retiring), grace=5)
            sys.exit(1)


def _reaped(pid: int) -> bool:
    """Reap `pid` if it has exited (it is our child: we are a subreaper); True once it is gone."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return not alive(pid)
    return done == pid


if __name__ == "__main__":
    main()
