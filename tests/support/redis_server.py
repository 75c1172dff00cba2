"""A real redis-server for the store tests: started from the config the fleet renders for its own
store (deploy/store.py: append-only log, fsync always, a password), in a temp dir, on a free
loopback port; stopped, killed (-9) and started again by the tests that need it.

    server = RedisServer(tmp_path); server.start()
    store = RedisStore(server.url, prefix="t1", password=server.password)

Debian's package: `apt-get install -y redis-server` (deploy/bootstrap.sh installs it when root).
Without the binary the tests that need it are skipped, saying that command.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from bench.procs import free_port_block
from deploy import store as managed_store

INSTALL = "apt-get install -y redis-server"


def binary_or_skip() -> str:
    found = managed_store.binary()
    if found is None:
        pytest.skip(f"redis-server is not installed: {INSTALL} (as root; deploy/bootstrap.sh does it)")
    return found


class RedisServer:
    def __init__(self, directory: Path, appendonly: bool = True, maxmemory_mb: int = 64):
        self.binary = binary_or_skip()
        self.directory = directory
        self.port = free_port_block(1)
        self.password = managed_store.new_password()
        self.process: subprocess.Popen | None = None
        auth = directory / "auth.conf"
        auth.write_bytes(managed_store.auth_conf(self.password))
        text = managed_store.conf("127.0.0.1", self.port, directory, auth, maxmemory_mb)
        if not appendonly:  # the negative control: what a store without the log loses
            text = text.replace("appendonly yes", "appendonly no")
        (directory / "redis.conf").write_text(text)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        log = open(self.directory / "redis.log", "ab")
        self.process = subprocess.Popen([self.binary, str(self.directory / "redis.conf")], stdout=log,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.monotonic() + 10
        while not self._answers():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start: {(self.directory / 'redis.log').read_text()[-2000:]}")
            time.sleep(0.02)
        return self

    def _answers(self) -> bool:
        """It answers PING (with NOAUTH: it has loaded its data and listens)."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith((b"+PONG", b"-NOAUTH"))
        except OSError:
            return False

    def kill(self) -> None:
        """kill -9: no shutdown, no last write."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
