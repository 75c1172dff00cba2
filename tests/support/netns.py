"""Simulated hosts: network namespaces joined by veth pairs on a bridge, with addresses that exist
only inside them. Needs root and iproute2; removes everything it made.

    with SimulatedHosts({"web1": "10.77.0.1", "heavy1": "10.77.0.2"}) as net:
        net.run("web1", ["make", "deploy-local"], env)      # a process inside web1's namespace
        with net.inside("web1"):                            # this thread's sockets are web1's
            urllib.request.urlopen("http://10.77.0.1:8080/fast")
        net.link("heavy1", up=False)                        # heavy1's cable pulled

The bridge lives in a namespace of its own, so the machine's own network is never touched: no
interface, address or route of the root namespace changes.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import subprocess
import threading
import uuid
from typing import Iterator, Mapping, Sequence

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def available() -> str | None:
    """None if simulated hosts can be made here; else why not."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    for tool in ("ip", "nsenter"):
        if not shutil.which(tool):
            return f"needs {tool} (iproute2, util-linux)"
    probe = f"fleet-probe-{uuid.uuid4().hex[:6]}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=10)


class SimulatedHosts:
    def __init__(self, hosts: Mapping[str, str], prefix_length: int = 24):
        self.hosts = dict(hosts)  # name -> address
        self.prefix_length = prefix_length
        tag = uuid.uuid4().hex[:5]
        self.namespaces = {name: f"fleet-{tag}-{name}" for name in self.hosts}
        self.switch = f"fleet-{tag}-switch"
        self.made: list[str] = []

    def __enter__(self) -> "SimulatedHosts":
        try:
            self._build()
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def _build(self) -> None:
        ip("netns", "add", self.switch)
        self.made.append(self.switch)
        ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        ip("-n", self.switch, "link", "set", "br0", "up")
        for name, address in self.hosts.items():
            ns = self.namespaces[name]
            ip("netns", "add", ns)
            self.made.append(ns)
            ip("-n", ns, "link", "set", "lo", "up")
            # One cable per host: eth0 in the host, its other end (named after the host) on the bridge.
            ip("-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", self.port(name), "netns", self.switch)
            ip("-n", self.switch, "link", "set", self.port(name), "master", "br0", "up")
            ip("-n", ns, "addr", "add", f"{address}/{self.prefix_length}", "dev", "eth0")
            ip("-n", ns, "link", "set", "eth0", "up")

    @staticmethod
    def port(name: str) -> str:
        return f"p-{name}"[:15]

    def link(self, name: str, up: bool) -> None:
        """Plug or pull host `name`'s cable (its bridge port): its packets are lost while down."""
        ip("-n", self.switch, "link", "set", self.port(name), "up" if up else "down")

    def command(self, name: str, argv: Sequence[str]) -> list[str]:
        """argv run inside host `name`'s network namespace (only the network: mounts stay shared)."""
        return ["nsenter", f"--net=/run/netns/{self.namespaces[name]}", "--", *argv]

    def run(self, name: str, argv: Sequence[str], env: Mapping[str, str] | None = None, timeout: float = 300,
            cwd: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run(self.command(name, argv), env=env, cwd=cwd, capture_output=True, text=True,
                                timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} on {name} failed ({result.returncode}):\n"
                                 f"{result.stdout}\n{result.stderr}")
        return result

    @contextlib.contextmanager
    def inside(self, name: str) -> Iterator[None]:
        """The calling thread enters host `name`'s network namespace (sockets it opens belong to
        it) and comes back to the one it was in when the block ends. setns(2) is per thread."""
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        target = os.open(f"/run/netns/{self.namespaces[name]}", os.O_RDONLY)
        try:
            if _libc.setns(target, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), f"setns into {name}")
            try:
                yield
            finally:
                if _libc.setns(own, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns back")
        finally:
            os.close(own)
            os.close(target)

    def in_thread(self, name: str, work, *args):
        """Run work(*args) in a new thread inside host `name`'s namespace; return its result."""
        result: dict = {}

        def body() -> None:
            try:
                with self.inside(name):
                    result["value"] = work(*args)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                result["error"] = exc

        thread = threading.Thread(target=body, daemon=True)
        thread.start()
        thread.join()
        if "error" in result:
            raise result["error"]
        return result["value"]

    def remove(self) -> None:
        """Delete every namespace made (their veths and the bridge go with them)."""
        for ns in reversed(self.made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)
        self.made.clear()
