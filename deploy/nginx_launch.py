"""Run nginx for a run dir so that a killed master costs no connection and leaves no stale worker.

    python -m deploy.nginx_launch RUN_DIR NGINX_BINARY [nginx arguments...]

supervisor starts nginx through this small launcher. It binds the edge's listening socket itself
(the address nginx.conf's `listen ... default_server` names) and hands it to nginx the way nginx's
own binary upgrade does (the NGINX environment variable names inherited sockets), then watches
the master:

- First start: clients already wait in the socket's backlog while the launcher waits (up to
  UPSTREAM_WAIT seconds) for every instance of its host to answer; only then does nginx start, so
  it never marks an instance failed that was still starting, nor answers "no live upstreams".
- The master dies (kill -9, a crash): its workers would live on, serving the old config, and a
  new master could not bind the port. Here the workers are re-parented to the launcher (it is a
  child subreaper), get SIGQUIT (stop accepting, finish what they have, exit), and a new master
  starts at once on the same socket: connections wait in its backlog instead of being refused.
- HUP (a reload): if the config's listen address is unchanged, the master reloads. If it moved,
  the launcher binds the new address, starts a new master on it, and only once that master runs
  retires the old one and closes the old socket, so the old port stops accepting at once and
  the new one never refused a connection. A new master that fails leaves everything as it was.
- supervisor's other signals (QUIT to stop, USR1 to reopen logs) are passed to the master.
- nginx's access and error logs are rotated by size (deploy/log_rotation.py).
- The launcher itself was killed: the next one first retires every nginx process of this run dir.
"""

from __future__ import annotations

import ctypes
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from deploy import log_rotation, programs
from deploy.procs import processes_of
from services.common import cpu_slice, procfs
from services.common.settings import Settings

PR_SET_CHILD_SUBREAPER = 36
FORWARDED = (signal.SIGQUIT, signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGWINCH)
STOPPING = (signal.SIGQUIT, signal.SIGTERM, signal.SIGINT)
MAX_RESTARTS = 5  # in RESTART_WINDOW seconds; beyond that exit and let supervisor back off
RESTART_WINDOW = 10
UPSTREAM_WAIT = 60  # seconds the first start waits for the instances to answer
NEW_MASTER_WAIT = 10  # seconds a new master (moved listen address) has to start its workers
LISTEN = re.compile(r"^\s*listen\s+(\S+)\s+default_server\s*;", re.MULTILINE)


def say(message: str) -> None:
    print(f"nginx_launch: {message}", file=sys.stderr, flush=True)


def listen_address(conf: Path) -> tuple[str, int]:
    """(host, port) of the config's `listen <address> default_server;` line."""
    match = LISTEN.search(conf.read_text())
    if match is None:
        raise ValueError(f"{conf} has no 'listen ... default_server;' line")
    host, _, port = match[1].rpartition(":")
    return host.strip("[]"), int(port)


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
        if procfs.alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def nginx_processes(run_dir: Path) -> list[int]:
    return [pid for pid in processes_of(run_dir) if procfs.cmdline(pid).startswith("nginx:")]


def listening_socket(address: tuple[str, int], patience: float = 10) -> socket.socket:
    host, port = address
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    deadline = time.monotonic() + patience
    while True:
        try:
            sock.bind((host, port))
            break
        except OSError:
            if time.monotonic() > deadline:
                sock.close()
                raise
            time.sleep(0.05)  # a retiring nginx still holds the port
    sock.listen(4096)  # backlog: connections wait here while a master (re)starts
    sock.set_inheritable(True)
    return sock


def wait_for_upstreams(settings: Settings, timeout: float = UPSTREAM_WAIT) -> None:
    """Wait until every instance of the edge's own host answers HTTP (any status: it is up), or
    `timeout` passes. Other hosts' are not waited for: hosts may be deployed in any order, and one
    not deployed yet would hold the edge back for the whole wait (nginx tries such an instance,
    finds it refusing, and passes the request to the next: max_fails)."""
    own = settings.address
    waiting = [where for role in ("fast", "slow") for _, where in programs.upstream(settings, role)
               if where.rsplit(":", 1)[0].strip("[]") == own]
    if settings.edge_tls:
        # Imported here: deploy.control brings the renderers, jinja2, tornado and cryptography, 18 MB
        # of a process that lives as long as nginx, for one TLS context needed only across hosts.
        from deploy import control
        scheme, context = "https", control.client_context(settings)
    else:
        scheme, context = "http", None
    deadline = time.monotonic() + timeout
    while waiting and time.monotonic() < deadline:
        waiting = [w for w in waiting if not _answers(f"{scheme}://{w}/healthz", context)]
        if waiting:
            time.sleep(0.1)
    if waiting:
        say(f"instances at {', '.join(waiting)} still do not answer after {timeout:.0f} s; starting nginx anyway")


def _answers(url: str, context: ssl.SSLContext | None) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1, context=context):
            return True
    except urllib.error.HTTPError:
        return True  # it answered, if not 200 (draining, degraded)
    except OSError:
        return False


class Launcher:
    def __init__(self, run_dir: Path, binary: str, args: list[str]):
        self.run_dir = run_dir
        self.binary = binary
        self.args = args
        self.conf = run_dir / "nginx" / "conf" / "nginx.conf"
        self.pid_file = run_dir / "nginx" / "nginx.pid"
        self.address = listen_address(self.conf)
        self.sock = listening_socket(self.address)
        self.master: subprocess.Popen | None = None
        self.stopping = False
        self.reload_asked = False
        self.retiring: set[int] = set()  # workers of a dead master, and masters of a moved address
        self.next_rotation_check = 0.0

    def start_master(self, sock: socket.socket) -> subprocess.Popen:
        env = {**os.environ, "NGINX": f"{sock.fileno()};"}
        return subprocess.Popen([self.binary, *self.args], env=env, pass_fds=(sock.fileno(),))

    def on_signal(self, signum: int, frame) -> None:
        if signum == signal.SIGHUP:
            self.reload_asked = True  # handled in the main loop, not in a signal handler
            return
        self.stopping = self.stopping or signum in STOPPING
        if self.master is not None and self.master.poll() is None:
            self.master.send_signal(signum)

    def reload(self) -> None:
        try:
            address = listen_address(self.conf)
        except (OSError, ValueError):
            address = self.address  # nginx itself reports the broken config
        if address == self.address:
            self.master.send_signal(signal.SIGHUP)
            return
        say(f"the edge moves from {self.address} to {address}: starting a master on the new address")
        try:
            sock = listening_socket(address, patience=2)
        except OSError as exc:
            self.log_emerg(f"cannot listen on {address[0]}:{address[1]} ({exc}); nginx keeps {self.address}")
            return
        master = self.start_master(sock)
        deadline = time.monotonic() + NEW_MASTER_WAIT
        while master.poll() is None and not procfs.children(master.pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        if master.poll() is not None or not procfs.children(master.pid):
            if master.poll() is None:
                master.send_signal(signal.SIGQUIT)
                self.retiring.add(master.pid)
            sock.close()
            self.log_emerg(f"the new master for {address[0]}:{address[1]} did not start; nginx keeps {self.address}")
            return
        old = self.master
        old.send_signal(signal.SIGQUIT)  # it closes the old socket now and finishes its requests
        self.retiring.add(old.pid)
        self.sock.close()
        self.master, self.sock, self.address = master, sock, address

    def rotate_logs(self) -> None:
        now = time.monotonic()
        if now < self.next_rotation_check:
            return
        self.next_rotation_check = now + log_rotation.CHECK_INTERVAL
        log_rotation.rotate(self.run_dir / "logs", self.run_dir / "settings.json")

    def log_emerg(self, message: str) -> None:
        """Tell deploy's reload check, which reads nginx's error log, that this reload failed."""
        say(message)
        with open(self.run_dir / "logs" / "nginx-error.log", "a") as log:
            log.write(f"{time.strftime('%Y/%m/%d %H:%M:%S')} [emerg] {os.getpid()}#0: nginx_launch: {message}\n")

    def reap_retiring(self) -> None:
        done = {pid for pid in self.retiring if _reaped(pid)}
        if done:
            self.retiring -= done
            # An old master deletes the pid file as it exits, though the new master runs on.
            if self.master is not None and self.master.poll() is None:
                self.pid_file.write_text(f"{self.master.pid}\n")

    def run(self) -> None:
        restarts: list[float] = []
        while True:
            self.master = self.start_master(self.sock)
            if self.stopping:  # a stop signal came while the previous master was being replaced
                self.master.send_signal(signal.SIGQUIT)
            while True:
                try:
                    code = self.master.wait(timeout=0.1)
                    break
                except subprocess.TimeoutExpired:
                    self.reap_retiring()
                    self.rotate_logs()
                    if self.reload_asked and not self.stopping:
                        self.reload_asked = False
                        self.reload()
            if self.stopping:
                retire(list(self.retiring), grace=5)
                sys.exit(code)
            now = time.monotonic()
            restarts = [t for t in restarts if now - t < RESTART_WINDOW] + [now]
            orphans = [p for p in procfs.children(os.getpid()) if p != self.master.pid and p not in self.retiring]
            say(f"nginx master {self.master.pid} exited ({code}); retiring its workers {orphans}, "
                "starting a new master")
            for pid in orphans:  # they stop accepting at once and finish what they have
                try:
                    os.kill(pid, signal.SIGQUIT)
                except ProcessLookupError:
                    pass
            self.retiring.update(orphans)
            if len(restarts) > MAX_RESTARTS:
                say(f"nginx exited {len(restarts)} times in {RESTART_WINDOW} s; leaving it to supervisor")
                retire(list(self.retiring), grace=5)
                sys.exit(1)


def main() -> None:
    run_dir, binary, *args = sys.argv[1:]
    run_dir_path = Path(run_dir)
    leftovers = nginx_processes(run_dir_path)
    if leftovers:
        say(f"retiring nginx processes of a previous launcher: {leftovers}")
        retire(leftovers, grace=10)
    launcher = Launcher(run_dir_path, binary, args)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)  # orphaned workers become our children
    for signum in FORWARDED + (signal.SIGHUP,):
        signal.signal(signum, launcher.on_signal)
    settings = Settings.from_snapshot(run_dir_path / "settings.json")
    # nginx's master and workers inherit this process's time slice: the edge is on the fast path
    # as much as the fast instances are (services/common/cpu_slice.py).
    cpu_slice.request(settings.fast.sched_slice_us)
    wait_for_upstreams(settings)
    launcher.run()


def _reaped(pid: int) -> bool:
    """Reap `pid` if it has exited (it is our child: we are a subreaper); True once it is gone."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return not procfs.alive(pid)
    return done == pid


if __name__ == "__main__":
    main()
